"""Drop-in for the reference library's current layout (NVIDIA-NeMo Emerging-Optimizers, v0.4 / main).

Every public name of the reference's modules that this project implements imports from the reference's path;
the newer low-level Newton-Schulz functions compute what the documented ones compute; registry rules,
read-only and assignable attributes, overridable methods and checkpoints behave as code written for the
reference expects. (The scalar ``update_functions`` are in ``test_reference_update_functions.py``; the
modules, hooks and ``row_norm`` in ``test_reference_modules.py``.)
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import logging
import sys

import pytest
import torch
from distributed_helpers import gloo_rank, run_ranks
from torch import nn

import emerging_optimizers as eo
from emerging_optimizers import registry
from emerging_optimizers.orthogonalized_optimizers import muon_utils
from emerging_optimizers.utils import MatrixShapeError, fp32_matmul_precision

# --------------------------------------------------------------------------------------------------------------
# Every public name of the reference's current layout, for the modules this project implements. Not here:
# triton_kernels (CUDA-only Triton kernels; the SYRK steps below run without them) and legacy_soap.tp_rekls
# (tensor-parallel REKLS, with the distributed issue).
# --------------------------------------------------------------------------------------------------------------
_UF = "emerging_optimizers.scalar_optimizers.update_functions"
_OO = "emerging_optimizers.orthogonalized_optimizers"
_HOOKS = ("HyperballHook", "NoOpWeightUpdateHook", "RadialBrakeHook", "RelativeUpdateHook", "WeightUpdateHook")
REFERENCE_NAMES: dict[str, tuple[str, ...]] = {
    "emerging_optimizers": (
        "__contact_emails__", "__contact_names__", "__description__", "__download_url__", "__homepage__",
        "__keywords__", "__license__", "__package_name__", "__repository_url__", "__shortversion__", "__version__",
    ),
    "emerging_optimizers.package_info": (
        "MAJOR", "MINOR", "PATCH", "PRE_RELEASE", "VERSION", "__version__", "__shortversion__", "__package_name__",
    ),
    "emerging_optimizers.registry": (
        "register_optimizer", "get_optimizer_name_list", "get_optimizer_cls", "validate_optimizer_args",
        "get_configured_optimizer_cls",
    ),
    "emerging_optimizers.mixin": ("WeightDecayT", "WeightDecayMixin"),
    "emerging_optimizers.utils": (
        "fp32_matmul_precision", "FP32MatmulPrecT", "get_pg_size", "get_pg_rank", "eigh_with_fallback", "conjugate",
        "orthogonal_iteration",
    ),
    "emerging_optimizers.utils.modules": ("Conv1dFlatWeights",),
    "emerging_optimizers.scalar_optimizers": (
        "LaProp", "Lion", "Signum", "SimplifiedAdEMAMix", "SingleMomentumOptimizer", "TwoMomentsOptimizer",
    ),
    "emerging_optimizers.scalar_optimizers.base": (
        "SingleMomentumOptimizer", "TwoMomentsOptimizer", "_ScalarOptimizerBase", "_validate_common_hparams",
    ),
    _UF: (
        "calculate_adam_update", "calculate_ademamix_update", "calculate_laprop_update", "calculate_lion_update",
        "calculate_madam_update", "calculate_rmsprop_update", "calculate_signum_update",
        "calculate_sim_ademamix_update",
    ),
    f"{_UF}.adam": ("calculate_adam_update",),
    f"{_UF}.ademamix": ("calculate_ademamix_update", "calculate_sim_ademamix_update"),
    f"{_UF}.laprop": ("calculate_laprop_update",),
    f"{_UF}.lion": ("calculate_lion_update",),
    f"{_UF}.madam": ("calculate_madam_update",),
    f"{_UF}.rmsprop": ("calculate_rmsprop_update",),
    f"{_UF}.signum": ("calculate_signum_update",),
    f"{_UF}._schedulers": (
        "_half_life_steps", "_inverse_half_life_beta", "_linear_half_life_warmup_scheduler", "_linear_warmup_scheduler",
    ),
    _OO: (
        "AdaptiveMuon", "Moment2MethodT", "MOP", "Muon", "get_muon_scale_factor", "MuonHyperball",
        "OrthogonalizedOptimizer", "PolarGrad", "left_polargrad_orth_fn", "one_sided_polargrad_orth_fn",
        "right_polargrad_orth_fn", "Scion", "spectral_hardcap", "spectral_clip", "Spel",
    ),
    f"{_OO}.adaptive_muon": ("AdaptiveMuon", "Moment2MethodT"),
    f"{_OO}.mop": ("MOP", "polar_via_svd"),
    f"{_OO}.muon": ("Muon", "MuonScaleT", "get_muon_scale_factor"),
    f"{_OO}.muon_hyperball": ("MuonHyperball",),
    f"{_OO}.muon_utils": (
        "newton_schulz", "newton_schulz_tp", "NSCoeffT", "get_coefficient_iterator", "CoeffIterMode",
        "distributed_normalize_p2", "newton_schulz_step", "batched_newton_schulz_step", "newton_schulz_step_tsyrk",
        "batched_newton_schulz_step_tsyrk", "_COEFFICIENT_SETS",
    ),
    f"{_OO}.orthogonalized_optimizer": ("OrthogonalizedOptimizer",),
    f"{_OO}.polargrad": (
        "PolarGrad", "one_sided_polargrad_orth_fn", "right_polargrad_orth_fn", "left_polargrad_orth_fn",
    ),
    f"{_OO}.scion": ("Scion",),
    f"{_OO}.spectral_clipping_utils": ("spectral_clip", "spectral_hardcap", "spectral_clipped_weight_decay"),
    f"{_OO}.spel": ("Spel",),
    "emerging_optimizers.weight_update_hooks": _HOOKS,
    "emerging_optimizers.weight_update_hooks.base": ("NoOpWeightUpdateHook", "WeightUpdateHook", "HookStateT"),
    "emerging_optimizers.weight_update_hooks.hyperball": ("HyperballHook",),
    "emerging_optimizers.weight_update_hooks.radial_brake": ("RadialBrakeHook",),
    "emerging_optimizers.weight_update_hooks.relative_update": ("RelativeUpdateHook",),
    "emerging_optimizers.psgd": ("PSGDPro",),
    "emerging_optimizers.psgd.psgd": ("PSGDPro",),
    "emerging_optimizers.psgd.psgd_kron_contractions": (
        "partial_contraction", "apply_kronecker_factors", "apply_preconditioner",
    ),
    "emerging_optimizers.psgd.psgd_utils": ("uniformize_q_in_place", "norm_lower_bound_spd", "norm_lower_bound_skew"),
    "emerging_optimizers.psgd.procrustes_step": ("procrustes_step",),
    "emerging_optimizers.riemannian_optimizers": ("ObliqueSGD", "ObliqueAdam", "Iso"),
    "emerging_optimizers.riemannian_optimizers.normalized_optimizer": ("ObliqueSGD", "ObliqueAdam"),
    "emerging_optimizers.riemannian_optimizers.isospectral": ("Iso", "RetractionT"),
    "emerging_optimizers.legacy_soap": ("MOSO", "REKLS", "SOAP", "StackedSoap"),
    "emerging_optimizers.legacy_soap.soap": (
        "SOAP", "project_in", "project_out", "update_kronecker_factors", "update_kronecker_factors_kl_shampoo",
        "update_eigenbasis_and_exp_avgs", "_clip_update_rms_in_place",
    ),
    "emerging_optimizers.legacy_soap.soap_utils": ("get_eigenbasis_eigh", "get_eigenbasis_qr", "get_eigenbasis_svd"),
    "emerging_optimizers.legacy_soap.rekls": ("REKLS",),
    "emerging_optimizers.legacy_soap.stacked_soap": ("StackedSoap", "_stack_2d", "_unstack"),
    "emerging_optimizers.legacy_soap.moso": ("MOSO",),
    "emerging_optimizers.legacy_soap.matrix_root_inverse_utils": ("mat_root_inv_via_scaled_cans", "inv_root_via_eigh"),
    "emerging_optimizers.shampoo.shampoo_base": ("ShampooPreconditionerProtocol", "SoapPreconditionerProtocol",
                                                 "TensorPair"),
    "emerging_optimizers.shampoo.soap_v3": (
        "KlMSoap", "KlSoapPreconditioner", "KlSoapV3", "ReklsPreconditioner", "ReklsV3", "SoapBase",
    ),
    "emerging_optimizers.utils.eig": ("eigh_with_fallback", "conjugate", "orthogonal_iteration"),
    "emerging_optimizers.contrib.muown": ("Muown",),
    "emerging_optimizers.contrib.row_norm": ("row_norm_fn",),
}
# registry names of the reference for the optimizers implemented here
REFERENCE_REGISTRY = {
    "muon": "Muon", "adaptive_muon": "AdaptiveMuon", "mop": "MOP", "polargrad": "PolarGrad", "scion": "Scion",
    "spel": "Spel", "muon_hyperball": "MuonHyperball", "lion": "Lion", "signum": "Signum", "laprop": "LaProp",
    "sim_ademamix": "SimplifiedAdEMAMix",
    "psgd_pro": "PSGDPro", "oblique_sgd": "ObliqueSGD", "oblique_adam": "ObliqueAdam", "iso": "Iso",
    "soap": "SOAP", "rekls": "REKLS", "stacked_soap": "StackedSoap", "moso": "MOSO", "kl_soap": "KlSoapV3",
    "rekls_v3": "ReklsV3", "kl_m_soap": "KlMSoap",
}


@pytest.mark.parametrize("module", sorted(REFERENCE_NAMES))
def test_every_reference_public_name_imports(module):
    mod = importlib.import_module(module)
    missing = [name for name in REFERENCE_NAMES[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lacks {missing}"


def test_reference_registry_names():
    for name, cls_name in REFERENCE_REGISTRY.items():
        assert registry.get_optimizer_cls(name).__name__ == cls_name


def test_reference_docstring_example_of_get_optimizer_cls_runs_unchanged():
    # the Example of the reference's registry.get_optimizer_cls docstring, verbatim
    example = '''
    >>> from emerging_optimizers.orthogonalized_optimizers import muon
    >>> from emerging_optimizers import registry
    >>> opt_cls = registry.get_optimizer_cls("muon")
    >>> opt_cls
    <class 'emerging_optimizers.orthogonalized_optimizers.muon.Muon'>
    '''
    test = doctest.DocTestParser().get_doctest(example, {}, "get_optimizer_cls", None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


# --------------------------------------------------------------------------------------------------------------
# The reference's documented extension example: split a fused QKV matrix in orthogonalize
# --------------------------------------------------------------------------------------------------------------
def _make_split_qkv(base):
    """The reference's "Split QKV example" (OrthogonalizedOptimizer docstring), on top of ``base``."""

    class SplitQkv(base):
        def __init__(self, *args, split_qkv_shapes, **kwargs):
            super().__init__(*args, **kwargs)
            self.qkv_split_shapes = split_qkv_shapes

        def orthogonalize(self, p, grad, **kwargs):
            if getattr(p, "is_qkv", False) or kwargs.get("is_qkv", False):
                qkv_grads = torch.split(grad, self.qkv_split_shapes, dim=0)
                qkv_orthogonalized = [self.scaled_orthogonalize_fn(g) for g in qkv_grads]
                grad = torch.cat([orthogonalized for orthogonalized in qkv_orthogonalized])
            else:
                grad = self.scaled_orthogonalize_fn(grad)
            return grad

    return SplitQkv


@pytest.mark.parametrize("base_name", ["OrthogonalizedOptimizer", "Muon", "PolarGrad", "MOP", "Scion", "Spel",
                                       "AdaptiveMuon"])
@pytest.mark.parametrize("flag", ["attribute", "group"])
def test_reference_split_qkv_example_works_on_every_family_member(base_name, flag):
    """``scaled_orthogonalize_fn`` is the library's math for the class, so each part gets exactly that."""
    base = getattr(eo.orthogonalized_optimizers, base_name)
    cls = _make_split_qkv(base)
    gen = torch.Generator().manual_seed(1)
    w = nn.Parameter(torch.randn(12, 8, generator=gen))
    kwargs = dict(lr=0.05, momentum=0.0, weight_decay=0.0)
    if base_name == "OrthogonalizedOptimizer":
        kwargs.update(nesterov=False, weight_decay_method="decoupled", fp32_matmul_prec="highest",
                      scaled_orthogonalize_fn=lambda g: muon_utils.newton_schulz(g, 5))
    if flag == "attribute":
        w.is_qkv = True
        opt = cls([w], split_qkv_shapes=[4, 4, 4], **kwargs)
    else:
        opt = cls([{"params": [w], "is_qkv": True}], split_qkv_shapes=[4, 4, 4], **kwargs)
    plain = base([nn.Parameter(torch.zeros(4, 8))], **kwargs)  # the library's per-part math
    grad = torch.randn(12, 8, generator=gen)
    expected = torch.cat([plain.scaled_orthogonalize_fn(g) for g in grad.split(4)])
    if base_name == "AdaptiveMuon":  # orthogonalize gives O; the second moment and scale follow in the step
        assert torch.equal(opt.orthogonalize(w, grad, **opt.param_groups[0]), expected)
        return
    before = w.detach().clone()
    w.grad = grad
    opt.step()
    if base_name == "Spel":  # Spel re-orthogonalizes the weight after the update
        expected_w = muon_utils.newton_schulz(before - 0.05 * expected, 5)
        torch.testing.assert_close(w.detach(), expected_w, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(w.detach(), before - 0.05 * expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# muon_utils: the reference's low-level API
# --------------------------------------------------------------------------------------------------------------
def test_coefficient_table_in_the_reference_shape():
    table = muon_utils._COEFFICIENT_SETS
    assert set(table) == set(muon_utils.COEFFICIENT_SETS) and "custom" not in table
    for name, coeffs in table.items():
        assert isinstance(coeffs, list) and coeffs == list(muon_utils.COEFFICIENT_SETS[name][0])
        assert all(isinstance(t, tuple) and len(t) == 3 for t in coeffs)
    assert table["simple"] == [(3.4445, -4.7750, 2.0315)] and len(table["deepseekv4"]) == 10


def _step64(x, a, b, c):
    """The step in float64 by its formula: X <- a X + (b A + c A^2) X with A = X X^T."""
    A = x @ x.T
    return a * x + (b * A + c * A @ A) @ x


@pytest.mark.parametrize("coeffs", [(3.4445, -4.7750, 2.0315), (3.3656576, -3.3420992, 0.0), (2.0, -1.5, 0.5)])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (16, 16)])
def test_newton_schulz_step_functions_match_the_formula(coeffs, shape):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) / 5
    want = _step64(x, *coeffs)
    # float64: the same numbers up to the last bits, whichever product form
    torch.testing.assert_close(muon_utils.newton_schulz_step(x, *coeffs), want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(muon_utils.newton_schulz_step_tsyrk(x, *coeffs), want, rtol=1e-13, atol=1e-13)
    xb = torch.stack([x, 2 * x, -x])
    batched = muon_utils.batched_newton_schulz_step(xb, *coeffs)
    syrk = muon_utils.batched_newton_schulz_step_tsyrk(xb, *coeffs)
    for i in range(3):
        torch.testing.assert_close(batched[i], _step64(xb[i], *coeffs), rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(syrk[i], _step64(xb[i], *coeffs), rtol=1e-13, atol=1e-12)
    # float32: the batched step equals the one-matrix step per item (reference tolerance)
    x32 = xb.float()
    per_item = torch.stack([muon_utils.newton_schulz_step(x32[i], *coeffs) for i in range(3)])
    torch.testing.assert_close(muon_utils.batched_newton_schulz_step(x32, *coeffs), per_item, rtol=0, atol=1e-6)


def test_step_functions_reject_wrong_rank():
    with pytest.raises(ValueError, match="2-D"):
        muon_utils.newton_schulz_step(torch.zeros(2, 3, 4), 1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="3-D"):
        muon_utils.batched_newton_schulz_step_tsyrk(torch.zeros(3, 4), 1.0, 0.0, 0.0)


def test_plain_newton_schulz_is_the_step_function_iterated():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, 20, generator=gen)
    norm = torch.linalg.vector_norm(x, dtype=torch.float64).clamp_min(1e-15)  # newton_schulz's normalisation:
    y = (x.double() * norm.reciprocal()).float()  # a float64 norm (no overflow), one rounding to float32
    for a, b, c in muon_utils.get_coefficients(5, "quintic"):
        y = muon_utils.newton_schulz_step(y, a, b, c)
    assert torch.equal(muon_utils.newton_schulz(x, 5, method="plain"), y)


@contextlib.contextmanager
def _patched_steps(monkeypatch):
    calls: dict[str, int] = {}
    for name in ("newton_schulz_step", "batched_newton_schulz_step", "newton_schulz_step_tsyrk",
                 "batched_newton_schulz_step_tsyrk"):
        original = getattr(muon_utils, name)

        def counted(X, a, b, c, tp_group=None, _name=name, _fn=original):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(X, a, b, c, tp_group=tp_group)

        monkeypatch.setattr(muon_utils, name, counted)
    yield calls


@pytest.mark.parametrize("shape", [(4, 4), (4, 8), (8, 4), (2, 4, 8), (2, 8, 4), (12, 16)])
def test_use_syrk_falls_back_to_gemm_like_the_reference(shape, monkeypatch, caplog):
    x = torch.randn(shape)
    gemm = "newton_schulz_step" if len(shape) == 2 else "batched_newton_schulz_step"
    with _patched_steps(monkeypatch) as calls, caplog.at_level(logging.ERROR), fp32_matmul_precision("medium"):
        out = muon_utils.newton_schulz(x, steps=1, coefficient_type="simple", use_syrk=True)
    assert calls == {gemm: 1}
    assert "[SYRK-SKIP]" in caplog.text
    torch.testing.assert_close(out, muon_utils.newton_schulz(x, 1, "simple", method="plain"), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(16, 24), (24, 16), (3, 8, 16)])
def test_use_syrk_runs_the_symmetric_step_on_aligned_shapes(shape, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen)
    syrk = "newton_schulz_step_tsyrk" if len(shape) == 2 else "batched_newton_schulz_step_tsyrk"
    with _patched_steps(monkeypatch) as calls, fp32_matmul_precision("medium"):
        out = muon_utils.newton_schulz(x, 5, "quintic", use_syrk=True)
    assert calls == {syrk: 5}
    torch.testing.assert_close(out, muon_utils.newton_schulz(x, 5, "quintic", method="plain"), rtol=0, atol=2e-6)


def test_use_syrk_has_no_effect_outside_medium_precision():
    x = torch.randn(16, 32)
    with fp32_matmul_precision("highest"):
        assert torch.equal(muon_utils.newton_schulz(x, 5, use_syrk=True), muon_utils.newton_schulz(x, 5))
    with pytest.raises(ValueError, match="method='auto'"):
        muon_utils.newton_schulz(x, 5, use_syrk=True, method="gram")
    with pytest.raises(TypeError, match="use_syrk"):
        muon_utils.newton_schulz(x, 5, use_syrk="yes")


def test_newton_schulz_positional_order_is_the_references():
    x = torch.randn(8, 12)
    # (x, steps, coefficient_type, custom_coefficient_sets, eps, transpose, tp_group, use_syrk, normalize_in_double)
    out = muon_utils.newton_schulz(x, 3, "custom", [(3.4445, -4.7750, 2.0315)], 1e-15, None, None, False, True)
    torch.testing.assert_close(out, muon_utils.newton_schulz(x, 3, "simple"), rtol=0, atol=1e-6)


def test_normalize_in_double_has_the_references_semantics():
    x = torch.randn(64, 64) * 1e-30
    assert torch.linalg.vector_norm(x) == 0  # the float32 norm underflows
    norm64 = torch.linalg.vector_norm(x, dtype=torch.float64)
    out = muon_utils.newton_schulz(x, steps=0, normalize_in_double=True)
    torch.testing.assert_close(out, (x.double() / norm64).float(), rtol=1e-6, atol=0)
    assert torch.linalg.vector_norm(out).item() == pytest.approx(1.0, rel=1e-5)
    tiny = torch.randn(32, 48) * 2.6e-28 / torch.linalg.vector_norm(torch.randn(32, 48))
    ref = muon_utils.newton_schulz(tiny.double() * 1e28, 5)
    torch.testing.assert_close(muon_utils.newton_schulz(tiny, 5, normalize_in_double=True), ref.float(),
                               rtol=0, atol=1e-5)  # float32 iteration against float64 of the rescaled input
    # no eps floor in double, as in the reference: an all-zero input has no direction
    assert torch.isnan(muon_utils.newton_schulz(torch.zeros(4, 6), 5, normalize_in_double=True)).all()
    assert torch.equal(muon_utils.newton_schulz(torch.zeros(4, 6), 5), torch.zeros(4, 6))


def test_reference_error_types_and_messages():
    x = torch.randn(5, 7)
    with pytest.raises(ValueError, match="Invalid coefficient type.*nonexistent"):
        muon_utils.newton_schulz(x, 5, coefficient_type="nonexistent")
    with pytest.raises(ValueError, match="custom_coefficient_sets must be provided"):
        muon_utils.newton_schulz(x, 5, coefficient_type="custom")
    with pytest.raises(ValueError, match="cubic5.*fixed.*5-step schedule.*steps=5"):
        muon_utils.newton_schulz(x, 4, coefficient_type="cubic5")
    with pytest.raises(ValueError, match="must be non-empty"):
        list(muon_utils.get_coefficient_iterator(5, []))
    with pytest.raises(ValueError, match="Invalid mode.*invalid"):
        list(muon_utils.get_coefficient_iterator(5, [(1.0, 2.0, 3.0)], mode="invalid"))
    with pytest.raises(ValueError, match="Invalid partition_dim.*2"):
        muon_utils.newton_schulz_tp(x, 5, "quintic", tp_group=None, partition_dim=2, tp_mode="distributed")
    with pytest.raises(ValueError, match="Invalid tp_mode.*invalid"):
        muon_utils.newton_schulz_tp(x, 5, "quintic", tp_group=None, partition_dim=0, tp_mode="invalid")
    with pytest.raises(ValueError, match="Invalid mode for Muon update scale factor.*bad"):
        eo.orthogonalized_optimizers.get_muon_scale_factor(4, 4, "bad")
    # the matrix precondition: a ValueError here, a TypeError in the reference; both catch it
    with pytest.raises(MatrixShapeError):
        muon_utils.newton_schulz(torch.zeros(10), 5)
    with pytest.raises(TypeError, match="must be 2d or 3d"):
        muon_utils.newton_schulz(torch.zeros(10), 5)
    with pytest.raises(TypeError, match="float32"):
        muon_utils.newton_schulz(torch.zeros(3, 4, dtype=torch.int64), 5)


def test_newton_schulz_tp_without_partition_is_plain_newton_schulz():
    x = torch.randn(8, 12)
    assert torch.equal(muon_utils.newton_schulz_tp(x, 5, "quintic", tp_group=None), muon_utils.newton_schulz(x, 5))


# --------------------------------------------------------------------------------------------------------------
# Tensor-parallel Newton-Schulz on real processes (gloo, loopback)
# --------------------------------------------------------------------------------------------------------------
def _tp_worker(rank: int, world: int, port: int, errors) -> None:
    with gloo_rank(rank, world, port, errors):
        group = torch.distributed.group.WORLD
        gen = torch.Generator().manual_seed(5)
        for shape in ((16, 24), (24, 16)):
            full = torch.randn(shape, generator=gen)
            for dim in (0, 1):
                shard = full.chunk(world, dim=dim)[rank].contiguous()
                want = muon_utils.newton_schulz(full, 5, "quintic").chunk(world, dim=dim)[rank]
                dup = muon_utils.newton_schulz_tp(shard, 5, "quintic", group, partition_dim=dim, tp_mode="duplicated")
                torch.testing.assert_close(dup, want, rtol=0, atol=1e-6)
                dist = muon_utils.newton_schulz_tp(shard, 5, "quintic", group, partition_dim=dim,
                                                   tp_mode="distributed")
                # the Gram matrix is summed over ranks in another order than one process sums it: rounding only
                torch.testing.assert_close(dist, want, rtol=0, atol=2e-5)
                alias = muon_utils.newton_schulz_tp(shard, 5, "quintic", group, partition_dim=dim, mode="distributed")
                assert torch.equal(alias, dist)  # ``mode=`` is a keyword alias of ``tp_mode``
            # distributed_normalize_p2: the whole matrix's Frobenius norm
            shard = full.chunk(world, dim=1)[rank]
            normed = muon_utils.distributed_normalize_p2(shard, 1e-15, group)
            torch.testing.assert_close(normed, shard / torch.linalg.vector_norm(full), rtol=1e-6, atol=0)
        torch.distributed.barrier()


@pytest.mark.distributed
def test_newton_schulz_tp_two_ranks_equals_one_process():
    run_ranks(_tp_worker, 2)


def _tp_bf16_worker(rank: int, world: int, port: int, errors) -> None:
    with gloo_rank(rank, world, port, errors):
        import emerging_optimizers.utils as eo_utils
        from emerging_optimizers.utils import fp32_matmul_precision

        eo_utils.cpu_has_bf16_matmul = lambda: True  # this process only: a CPU with bf16 units
        group = torch.distributed.group.WORLD
        gen = torch.Generator().manual_seed(6)
        # 160 x 384 split into 160 x 192 shards: the whole matrix's short side (160 >= CPU_BF16_MIN_DIM) picks
        # bf16; 96 x 384 (96 x 192 shards) stays float32. A shard's own shape must not decide: 160 x 96 shards
        # (split the other way) of a 160 x 192 matrix are still a 160-wide matrix.
        for shape, dim in (((160, 384), 1), ((96, 384), 1), ((384, 160), 0), ((160, 192), 1)):
            full = torch.randn(shape, generator=gen)
            shard = full.chunk(world, dim=dim)[rank].contiguous()
            with fp32_matmul_precision("medium"):
                want_dtype = muon_utils.ns_compute_dtype(full)
                assert want_dtype == (torch.bfloat16 if min(shape) >= 128 else torch.float32), (shape, want_dtype)
                auto = muon_utils.newton_schulz_tp(shard, 5, "quintic", group, partition_dim=dim, tp_mode="distributed")
                other_dtype = torch.float32 if want_dtype == torch.bfloat16 else torch.bfloat16
                same, other = (muon_utils.newton_schulz(shard, 5, "quintic", transpose=dim == 0, tp_group=group,
                                                        compute_dtype=dt) for dt in (want_dtype, other_dtype))
            assert torch.equal(auto, same), shape  # the whole matrix's precision, on both ranks
            assert not torch.equal(auto, other), shape
        torch.distributed.barrier()


@pytest.mark.distributed
def test_newton_schulz_tp_picks_the_whole_matrix_precision():
    """The bf16 choice follows the whole matrix on every rank (a shard's local shape would split it)."""
    run_ranks(_tp_bf16_worker, 2)


# --------------------------------------------------------------------------------------------------------------
# Optimizer attributes, registry rules, overridable methods
# --------------------------------------------------------------------------------------------------------------
def test_muon_read_only_attributes_like_the_reference():
    opt = eo.Muon([nn.Parameter(torch.randn(5, 7))])
    assert (opt.num_ns_steps, opt.coefficient_type, opt.scale_mode, opt.extra_scale_factor, opt.use_syrk) == (
        5, "quintic", "spectral", 1.0, False)
    for name in ("num_ns_steps", "coefficient_type", "scale_mode", "extra_scale_factor", "use_syrk"):
        with pytest.raises(AttributeError, match=f"Cannot set `{name}`"):
            setattr(opt, name, getattr(opt, name))
    assert eo.Muon([nn.Parameter(torch.randn(8, 8))], use_syrk=True).use_syrk is True  # never silently dropped
    with pytest.raises(ValueError, match="num_ns_steps must be at least 1"):
        eo.Muon([nn.Parameter(torch.randn(5, 7))], num_ns_steps=0)
    with pytest.raises(ValueError, match="Invalid mode.*invalid_mode"):
        eo.Muon([nn.Parameter(torch.randn(5, 7))], scale_mode="invalid_mode")
    with pytest.raises(ValueError, match="ns_method='auto'"):
        eo.Muon([nn.Parameter(torch.randn(5, 7))], use_syrk=True, ns_method="plain")


def test_muon_use_syrk_step_matches_gemm_step():
    gen = torch.Generator().manual_seed(6)
    w0 = torch.randn(16, 32, generator=gen)
    grads = [torch.randn(16, 32, generator=gen) for _ in range(3)]
    out = []
    for use_syrk in (False, True):
        w = nn.Parameter(w0.clone())
        opt = eo.Muon([w], lr=0.02, use_syrk=use_syrk, fp32_matmul_prec="medium", ns_method="auto")
        for g in grads:
            w.grad = g.clone()
            opt.step()
        out.append(w.detach())
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-6)


def test_assignable_options_set_every_group():
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    lion = eo.Lion([{"params": [a]}, {"params": [b], "weight_decay_method": "l2"}])
    lion.weight_decay_method = "independent"
    assert [g["weight_decay_method"] for g in lion.param_groups] == ["independent", "independent"]
    with pytest.raises(ValueError, match="weight_decay_method"):
        lion.weight_decay_method = "bogus"
    assert lion.weight_decay_method == "independent"


def test_validate_optimizer_args_follows_forwarded_kwargs():
    registry.validate_optimizer_args(eo.orthogonalized_optimizers.MuonHyperball,
                                     {"lr": 0.1, "hyperball_radius": 1.0, "num_ns_steps": 3})
    with pytest.raises(TypeError, match="does not accept arguments.*nonexistent_arg"):
        registry.validate_optimizer_args(eo.Muon, {"nonexistent_arg": 42})
    configured = registry.get_configured_optimizer_cls("muon", lr=0.01)
    opt = configured([torch.randn(10, 10)], extra_scale_factor=0.2)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["extra_scale_factor"] == 0.2


def test_every_registered_name_refuses_re_registration():
    for name in registry.get_optimizer_name_list():
        with pytest.raises(ValueError, match="already registered"):
            registry.register_optimizer(name)(registry.get_optimizer_cls(name))


def test_adaptive_muon_orthogonalize_returns_plain_newton_schulz_and_step_applies_the_rest():
    """As the reference: orthogonalize -> _apply_moment2_normalization -> _apply_muon_scale -> p -= lr*U."""
    from emerging_optimizers.orthogonalized_optimizers import AdaptiveMuon, get_muon_scale_factor

    factors = torch.tensor([1.0] * 4 + [2.0] * 11 + [4.0])
    for shape in ((16, 4), (4, 16)):
        grad = (factors[:, None] if shape[0] >= shape[1] else factors[None, :]).expand(shape).clone()
        w = nn.Parameter(torch.zeros(shape))
        opt = AdaptiveMuon([w], lr=0.125, momentum=0.0, weight_decay=0.0, moment2_method="normuon", beta2=0.0,
                           fp32_matmul_prec="highest")
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        orth = opt.orthogonalize(w, grad, **group)
        assert torch.equal(orth, muon_utils.newton_schulz(grad, 5, "quintic"))
        avg_dim = -1 if shape[0] >= shape[1] else -2
        moment2 = orth.square().mean(dim=avg_dim, keepdim=True)
        u = orth * moment2.clamp_min(1e-8).rsqrt()
        u = u * (torch.linalg.vector_norm(orth) / torch.linalg.vector_norm(u).clamp_min(1e-8))
        expected = u * get_muon_scale_factor(*shape, mode="spectral")
        w.grad = grad
        opt.step()
        assert torch.equal(opt.state[w]["moment2_buffer"], moment2)
        assert torch.equal(-w.detach() / 0.125, expected)  # lr a power of two: the update is recovered exactly


def test_adaptive_muon_overridable_normalization_is_called():
    from emerging_optimizers.orthogonalized_optimizers import AdaptiveMuon

    seen = []

    class Logged(AdaptiveMuon):
        def _apply_moment2_normalization(self, orth_grad, moment2, beta2, eps, **kwargs):
            seen.append((tuple(orth_grad.shape), beta2))
            return super()._apply_moment2_normalization(orth_grad, moment2, beta2, eps, **kwargs)

    w = nn.Parameter(torch.randn(6, 10))
    opt = Logged([w], moment2_method="namo", beta2=0.9)
    w.grad = torch.randn(6, 10)
    opt.step()
    assert seen == [((6, 10), 0.9)] and torch.isfinite(w).all()


# --------------------------------------------------------------------------------------------------------------
# Checkpoints saved by the reference library load here
# --------------------------------------------------------------------------------------------------------------
def _train(opt, params, grads):
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()


@pytest.mark.parametrize("name", ["lion", "muon"])
def test_reference_shaped_checkpoint_loads_and_training_continues_identically(name):
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(6, 8, generator=gen)
    grads = [[torch.randn(6, 8, generator=gen)] for _ in range(4)]
    cls = registry.get_optimizer_cls(name)
    w = nn.Parameter(w0.clone())
    opt = cls([w], lr=0.01)
    _train(opt, [w], grads[:2])
    ours = opt.state_dict()
    # what the reference saves: only its group keys (options live on self there), and no step for Muon
    ref_keys = {"lion": ("lr", "betas", "weight_decay"), "muon": ("lr", "momentum", "weight_decay")}[name]
    reference = {
        "state": {0: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ours["state"][0].items()
                      if not (name == "muon" and k == "step")}},
        "param_groups": [{**{k: ours["param_groups"][0][k] for k in ref_keys}, "params": [0]}],
    }
    w2 = nn.Parameter(w.detach().clone())
    opt2 = cls([w2], lr=0.01)
    opt2.load_state_dict(reference)
    _train(opt, [w], grads[2:])
    _train(opt2, [w2], grads[2:])
    assert torch.equal(w, w2)
    assert opt2.state[w2]["step"] == (4 if name == "lion" else 2)  # Muon's step counter restarts from 0


def test_checkpoint_saved_before_a_scheduler_existed_loads():
    w = nn.Parameter(torch.randn(4, 4))
    opt = eo.AdamW([w], lr=0.1)
    w.grad = torch.randn(4, 4)
    opt.step()
    saved = opt.state_dict()  # no initial_lr
    w2 = nn.Parameter(w.detach().clone())
    opt2 = eo.AdamW([w2], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)  # adds initial_lr
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["initial_lr"] == 0.1
    w2.grad = torch.randn(4, 4)
    opt2.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05)
    # and the other way: a checkpoint carrying a scheduler's key loads into a scheduler-free optimizer
    opt3 = eo.AdamW([nn.Parameter(torch.randn(4, 4))], lr=0.1)
    opt3.load_state_dict(opt2.state_dict())


def test_checkpoint_of_another_optimizer_is_still_refused():
    w = nn.Parameter(torch.randn(4, 4))
    signum = eo.Signum([w])
    w.grad = torch.randn(4, 4)
    signum.step()
    with pytest.raises(ValueError, match="different optimizer"):
        eo.Lion([nn.Parameter(torch.randn(4, 4))]).load_state_dict(signum.state_dict())


def test_fp32_matmul_precision_reference_signature():
    old = torch.get_float32_matmul_precision()
    with fp32_matmul_precision():
        assert torch.get_float32_matmul_precision() == "highest"
    with fp32_matmul_precision(precision="medium"):
        assert torch.get_float32_matmul_precision() == "medium"
    with fp32_matmul_precision("high"):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == old


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
