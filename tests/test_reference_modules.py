"""Modules kept at the reference library's paths: Conv1dFlatWeights, row_norm_fn, the hook package, utils, package_info.

Conv1dFlatWeights is compared with the nn.Conv1d it replaces (float64, forward and gradients), row_norm_fn with
a plain float64 formula, and every hook import path with the others (they must be the same objects).
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from emerging_optimizers.utils.modules import Conv1dFlatWeights

TOL64 = dict(rtol=1e-12, atol=1e-12)

CONV_CASES = [
    dict(in_channels=3, out_channels=4, kernel_size=2),
    dict(in_channels=3, out_channels=4, kernel_size=3, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, groups=2),
    dict(in_channels=4, out_channels=4, kernel_size=4, groups=4, padding=3, bias=False),  # depthwise, as in Mamba
    dict(in_channels=5, out_channels=2, kernel_size=3, stride=2, padding=1, dilation=2),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding="same"),
]


def _split(conv: Conv1dFlatWeights, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(kernel, bias) read back from the flat ``w`` (default: ``conv.weight``; e.g. its gradient)."""
    w = conv.weight if w is None else w
    if conv.has_bias:
        return w[:, :-1].reshape(conv.weight_shape), w[:, -1]
    return w.reshape(conv.weight_shape), None


# ---------------------------------------------------------------------------------------------- Conv1dFlatWeights
@pytest.mark.parametrize("kwargs", CONV_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_conv1d_flat_matches_conv1d(kwargs):
    torch.manual_seed(3)
    ref = nn.Conv1d(**kwargs, dtype=torch.float64)
    torch.manual_seed(3)
    flat = Conv1dFlatWeights(**kwargs, dtype=torch.float64)  # same seed -> same initial values

    has_bias = kwargs.get("bias", True)
    per_row = kwargs["in_channels"] // kwargs.get("groups", 1) * kwargs["kernel_size"]
    assert flat.has_bias is has_bias and flat.bias is None
    assert flat.weight.shape == (kwargs["out_channels"], per_row + has_bias)
    assert flat.weight_shape == tuple(ref.weight.shape)
    assert [name for name, _ in flat.named_parameters()] == ["weight"]
    kernel, bias = _split(flat)
    torch.testing.assert_close(kernel, ref.weight, rtol=0, atol=0)
    if has_bias:
        torch.testing.assert_close(bias, ref.bias, rtol=0, atol=0)

    x = torch.randn(3, kwargs["in_channels"], 11, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_ref, y = ref(x), flat(x2)
    torch.testing.assert_close(y, y_ref, **TOL64)
    g_out = torch.randn_like(y_ref)
    y_ref.backward(g_out)
    y.backward(g_out)
    torch.testing.assert_close(x2.grad, x.grad, **TOL64)
    g_kernel, g_bias = _split(flat, flat.weight.grad)
    torch.testing.assert_close(g_kernel, ref.weight.grad, **TOL64)
    if has_bias:
        torch.testing.assert_close(g_bias, ref.bias.grad, **TOL64)


@pytest.mark.parametrize("bias", [True, False])
def test_conv1d_flat_from_conv1d_copies_exactly(bias):
    ref = nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=bias, dtype=torch.float64)
    flat = Conv1dFlatWeights.from_conv1d(ref)
    assert type(flat) is Conv1dFlatWeights
    assert (flat.stride, flat.padding, flat.dilation, flat.groups) == (ref.stride, ref.padding, ref.dilation, 2)
    assert flat.weight.dtype == torch.float64 and flat.has_bias is bias
    kernel, b = _split(flat)
    assert torch.equal(kernel, ref.weight)
    if bias:
        assert torch.equal(b, ref.bias)
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    torch.testing.assert_close(flat(x), ref(x), **TOL64)
    # copying does not alias: changing the copy leaves the source alone
    with torch.no_grad():
        flat.weight.add_(1.0)
    assert not torch.equal(_split(flat)[0], ref.weight)
    # a flat layer converts to an equal flat layer
    again = Conv1dFlatWeights.from_conv1d(flat)
    assert torch.equal(again.weight, flat.weight) and again.weight is not flat.weight


def test_conv1d_flat_reset_parameters_matches_conv1d():
    ref = nn.Conv1d(4, 6, 3, groups=2)
    flat = Conv1dFlatWeights(4, 6, 3, groups=2)
    torch.manual_seed(11)
    ref.reset_parameters()
    torch.manual_seed(11)
    flat.reset_parameters()
    kernel, bias = _split(flat)
    assert torch.equal(kernel, ref.weight) and torch.equal(bias, ref.bias)


def test_conv1d_flat_repr_and_errors():
    text = repr(Conv1dFlatWeights(3, 4, 2, bias=False, groups=1, padding=1))
    assert "Conv1dFlatWeights(3, 4" in text and "bias=False" in text and "(4, 6)" in text
    assert "bias=True" in repr(Conv1dFlatWeights(3, 4, 2))
    for mode in ("reflect", "circular", "replicate"):
        with pytest.raises(ValueError, match="padding_mode"):
            Conv1dFlatWeights(3, 4, 2, padding=1, padding_mode=mode)
        with pytest.raises(ValueError, match="padding_mode"):
            Conv1dFlatWeights.from_conv1d(nn.Conv1d(3, 4, 2, padding=1, padding_mode=mode))
    with pytest.raises(TypeError, match="nn.Conv1d"):
        Conv1dFlatWeights.from_conv1d(nn.Linear(3, 4))


def test_conv1d_flat_trains_with_muon():
    from emerging_optimizers.orthogonalized_optimizers import Muon

    conv = Conv1dFlatWeights(4, 8, 3, padding=1)
    before = conv.weight.detach().clone()
    opt = Muon(conv.parameters(), lr=0.02, momentum=0.9, weight_decay=0.0)
    x = torch.randn(2, 4, 16)
    conv(x).square().mean().backward()
    opt.step()
    assert conv.weight.shape == before.shape == (8, 4 * 3 + 1)
    assert torch.isfinite(conv.weight).all()
    assert not torch.equal(conv.weight, before)
    assert opt.state[conv.weight]["momentum_buffer"].shape == (8, 13)


# ---------------------------------------------------------------------------------------------- row_norm_fn
def _row_norm_paths():
    from emerging_optimizers import contrib
    from emerging_optimizers.contrib import muown, row_norm

    return [row_norm.row_norm_fn, muown.row_norm_fn, contrib.row_norm_fn]


def test_row_norm_fn_same_object_at_every_path():
    fns = _row_norm_paths()
    assert all(f is fns[0] for f in fns)
    from emerging_optimizers.contrib import row_norm

    assert row_norm.__all__[0] == "row_norm_fn"


def test_row_norm_fn_values():
    from emerging_optimizers.contrib.row_norm import row_norm_fn

    g = torch.randn(6, 5, dtype=torch.float64)
    u = row_norm_fn(g)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(6, dtype=torch.float64), **TOL64)
    torch.testing.assert_close(u, g / g.norm(dim=1, keepdim=True), **TOL64)
    torch.testing.assert_close(row_norm_fn(g, extra_scale_factor=0.5), 0.5 * u, **TOL64)

    # centring: columns centred before and after, so the update's columns have mean zero
    c = g - g.mean(0)
    expected = c / c.norm(dim=1, keepdim=True)
    expected = expected - expected.mean(0)
    centred = row_norm_fn(g, center_rows=True)
    torch.testing.assert_close(centred, expected, **TOL64)
    torch.testing.assert_close(centred.mean(0), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)

    # eps floors the norm: a tiny row is divided by eps, a zero row stays zero
    tiny = torch.zeros(3, 4, dtype=torch.float64)
    tiny[0, 0] = 1e-10
    out = row_norm_fn(tiny, eps=1e-6)
    torch.testing.assert_close(out[0, 0], torch.tensor(1e-4, dtype=torch.float64), **TOL64)
    assert out[1:].abs().max() == 0
    assert row_norm_fn(torch.zeros(3, 4)).abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_row_norm_fn_keeps_dtype(dtype):
    from emerging_optimizers.contrib.row_norm import row_norm_fn

    for fn in _row_norm_paths():
        out = fn(torch.randn(4, 8).to(dtype))
        assert out.dtype == dtype and out.shape == (4, 8)
    assert fn is row_norm_fn


def test_row_norm_fn_errors():
    for fn in _row_norm_paths():
        for bad in (torch.randn(3), torch.randn(2, 3, 4), torch.ones(3, 3, dtype=torch.int64)):
            with pytest.raises(ValueError, match="2D"):
                fn(bad)
        with pytest.raises(ValueError, match="eps"):
            fn(torch.randn(3, 3), eps=0.0)
        with pytest.raises(TypeError):
            fn(torch.randn(3, 3), True)  # center_rows and the rest are keyword-only


# ---------------------------------------------------------------------------------------------- hooks package
def test_hooks_importable_from_every_path():
    from emerging_optimizers import weight_update_hooks as pkg
    from emerging_optimizers.orthogonalized_optimizers import orthogonalized_optimizer as old
    from emerging_optimizers.weight_update_hooks import base, hyperball, radial_brake, relative_update

    assert pkg.WeightUpdateHook is base.WeightUpdateHook is old.WeightUpdateHook
    assert pkg.NoOpWeightUpdateHook is base.NoOpWeightUpdateHook is old.NoOpWeightUpdateHook
    assert base.HookStateT is old.HookStateT
    assert pkg.HyperballHook is hyperball.HyperballHook
    assert pkg.RadialBrakeHook is radial_brake.RadialBrakeHook
    assert pkg.RelativeUpdateHook is relative_update.RelativeUpdateHook
    assert pkg.scale_to_norm_ is hyperball.scale_to_norm_

    assert base.__all__ == ["NoOpWeightUpdateHook", "WeightUpdateHook"]
    assert hyperball.__all__ == ["HyperballHook"]
    assert radial_brake.__all__ == ["RadialBrakeHook"]
    assert relative_update.__all__ == ["RelativeUpdateHook"]
    for name in ("HyperballHook", "NoOpWeightUpdateHook", "RadialBrakeHook", "RelativeUpdateHook", "WeightUpdateHook"):
        assert name in pkg.__all__
    for name in ("HookStateT", "NoOpWeightUpdateHook", "OrthogonalizedOptimizer", "WeightUpdateHook"):
        assert name in old.__all__
    for hook in (pkg.HyperballHook(1.0), pkg.RadialBrakeHook(), pkg.RelativeUpdateHook(), pkg.NoOpWeightUpdateHook()):
        assert isinstance(hook, pkg.WeightUpdateHook)


# Importing any submodule first runs the package __init__ first, which fixes most of the import order; these are the
# modules on the hooks <-> optimizer boundary, where a cycle would show (one fresh interpreter each: ~1.5 s apiece).
FIRST_IMPORTS = [
    "emerging_optimizers.weight_update_hooks.base",
    "emerging_optimizers.orthogonalized_optimizers.orthogonalized_optimizer",
    "emerging_optimizers.contrib.row_norm",
]


def test_each_new_module_imports_first_in_a_fresh_interpreter():
    """No circular import, whichever module a user imports first."""
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    for module in FIRST_IMPORTS:
        subprocess.run([sys.executable, "-c", code, module, "emerging_optimizers"], check=True)


# ---------------------------------------------------------------------------------------------- utils, package_info
def test_pg_size_and_rank_without_distributed():
    from emerging_optimizers import utils

    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    assert utils.get_pg_size() == 1 and utils.get_pg_size(None) == 1
    assert utils.get_pg_rank() == 0 and utils.get_pg_rank(None) == 0
    assert {"get_pg_size", "get_pg_rank", "fp32_matmul_precision", "FP32MatmulPrecT"} <= set(utils.__all__)


def test_package_info():
    import emerging_optimizers
    from emerging_optimizers import package_info as info

    assert info.__version__ == emerging_optimizers.__version__ == "0.1.0"
    assert info.__shortversion__ == "0.1.0"
    assert info.VERSION == (info.MAJOR, info.MINOR, info.PATCH, info.PRE_RELEASE) == (0, 1, 0, "")
    assert info.__package_name__ == "emerging_optimizers"
    assert info.__license__ == "Apache-2.0"
    for name in (
        "__description__",
        "__keywords__",
        "__homepage__",
        "__repository_url__",
        "__download_url__",
        "__contact_names__",
        "__contact_emails__",
    ):
        assert isinstance(getattr(info, name), str)
    assert "nvidia" not in " ".join(str(v) for v in vars(info).values()).lower()
    assert importlib.import_module("emerging_optimizers.package_info") is info
