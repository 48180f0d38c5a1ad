"""Registry, weight-decay mixin and the matmul-precision context manager."""

import pytest
import torch

import emerging_optimizers as eo
from emerging_optimizers import registry
from emerging_optimizers.mixin import WeightDecayMixin
from emerging_optimizers.utils import fp32_matmul_precision

SCALAR_NAMES = {"adam", "adamw", "ademamix", "sim_ademamix", "laprop", "lion", "signum", "rmsprop", "madam",
                "mxnet_signum"}


def test_import_registers_everything():
    names = registry.get_optimizer_name_list()
    assert SCALAR_NAMES <= set(names)
    assert names == sorted(names)
    assert registry.get_optimizer_cls("lion") is eo.Lion


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="Unknown optimizer 'lionn'.*lion"):
        registry.get_optimizer_cls("lionn")


def test_configured_class_binds_defaults():
    cls = registry.get_configured_optimizer_cls("lion", lr=3e-4, weight_decay=0.1)
    assert issubclass(cls, eo.Lion)
    opt = cls([torch.nn.Parameter(torch.zeros(2))], betas=(0.8, 0.9))
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_configured_unknown_kwarg_lists_valid_ones():
    with pytest.raises(TypeError, match=r"'Lion' does not accept arguments: momentum; valid arguments: lr, betas"):
        registry.get_configured_optimizer_cls("lion", momentum=0.9)


def test_every_registered_optimizer_is_configurable_with_its_own_kwargs():
    for name in registry.get_optimizer_name_list():
        cls = registry.get_optimizer_cls(name)
        valid = registry.valid_kwargs(cls)
        assert valid, name
        assert "params" not in valid


def test_register_rejects_duplicates_and_bad_names():
    # the reference library's rules: a name registers once, whatever the class; names are case-insensitive
    with pytest.raises(ValueError, match="already registered"):
        registry.register_optimizer("lion")(type("Other", (torch.optim.SGD,), {}))
    with pytest.raises(ValueError, match="already registered"):
        registry.register_optimizer("lion")(eo.Lion)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_optimizer("LION")(type("Other", (torch.optim.SGD,), {}))
    assert registry.get_optimizer_cls("Lion") is eo.Lion
    for bad in ("", "  ", None):
        with pytest.raises(ValueError, match="Invalid optimizer name"):
            registry.register_optimizer(bad)  # type: ignore[arg-type]


def test_validate_optimizer_args():
    registry.validate_optimizer_args(eo.Muon, {"lr": 0.1, "params": [], "num_ns_steps": 3})
    with pytest.raises(TypeError, match="'Muon' does not accept arguments: nonexistent_arg; valid arguments: lr"):
        registry.validate_optimizer_args(eo.Muon, {"nonexistent_arg": 42})
    # a subclass whose constructor forwards *args/**kwargs is checked against what its bases accept
    class Wrapped(eo.Muon):
        def __init__(self, *args, extra: int = 0, **kwargs):
            super().__init__(*args, **kwargs)

    registry.validate_optimizer_args(Wrapped, {"extra": 1, "nesterov": True})
    with pytest.raises(TypeError, match="does not accept arguments: nope"):
        registry.validate_optimizer_args(Wrapped, {"nope": 1})


class _Decayer(WeightDecayMixin):
    def __init__(self, method):
        self.weight_decay_method = method


@pytest.mark.parametrize(
    "method,expected_p,expected_g",
    [("decoupled", 1 - 0.1 * 0.5, 1.0), ("independent", 1 - 0.5, 1.0), ("palm", 1 - 0.01 * 0.5, 1.0),
     ("l2", 1.0, 1.5)],
)
def test_weight_decay_mixin(method, expected_p, expected_g):
    p, g = torch.ones(3), torch.ones(3)
    _Decayer(method)._apply_weight_decay_inplace(p, g, 0.1, 0.5)
    torch.testing.assert_close(p, torch.full((3,), expected_p))
    torch.testing.assert_close(g, torch.full((3,), expected_g))


def test_weight_decay_zero_is_a_no_op_and_bad_method_raises():
    p, g = torch.ones(2), torch.ones(2)
    _Decayer("bogus")._apply_weight_decay_inplace(p, g, 0.1, 0.0)
    assert torch.equal(p, torch.ones(2))
    with pytest.raises(ValueError, match="Invalid weight_decay_method: 'bogus'"):
        _Decayer("bogus")._apply_weight_decay_inplace(p, g, 0.1, 0.5)


def test_mixin_defaults_to_l2():
    p, g = torch.ones(2), torch.ones(2)
    WeightDecayMixin()._apply_weight_decay_inplace(p, g, 0.1, 0.5)
    assert torch.equal(g, torch.full((2,), 1.5))


def test_fp32_matmul_precision_sets_and_restores():
    old = torch.get_float32_matmul_precision()
    with fp32_matmul_precision("medium"):
        assert torch.get_float32_matmul_precision() == "medium"
    assert torch.get_float32_matmul_precision() == old
    with pytest.raises(RuntimeError), fp32_matmul_precision("high"):
        raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == old
    with pytest.raises(ValueError, match="fp32_matmul_prec"):
        with fp32_matmul_precision("low"):
            pass
