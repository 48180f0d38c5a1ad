"""bf16 Newton-Schulz chosen automatically on CPUs with bf16 matrix units (``ns_compute_dtype`` under "medium").

conftest.py makes :func:`emerging_optimizers.utils.cpu_has_bf16_matmul` (and ``cpu_has_amx_bf16``) return False
for every test; here it is forced either way (``force_bf16``), and the real detection is checked once
(``real_cpu_bf16`` marker).
"""

import os
import sys

import pytest
import torch

import emerging_optimizers.utils as eo_utils
from emerging_optimizers.cli import bench
from emerging_optimizers.orthogonalized_optimizers import muon_utils
from emerging_optimizers.orthogonalized_optimizers.muon import Muon
from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz, ns_compute_dtype
from emerging_optimizers.utils import fp32_matmul_precision


@pytest.fixture
def force_bf16(monkeypatch):
    """Force the CPU's bf16 units on or off, for every matrix size (the small-matrix rule has its own tests)."""

    def force(value: bool) -> None:
        monkeypatch.setattr(eo_utils, "cpu_has_bf16_matmul", lambda: value)
        monkeypatch.setattr(muon_utils, "CPU_BF16_MIN_DIM", 0)

    return force


def gradient_like(m: int, n: int, seed: int, rank: int = 16, noise: float = 0.3) -> torch.Tensor:
    """Rank-``rank`` signal with singular values decaying from 1 to 0.01 plus relative-RMS ``noise`` Gaussian
    noise (as in benchmarks/ns_bf16_quality.py): a gradient/momentum as Newton-Schulz sees it."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(m, rank, generator=g)
    v = torch.randn(rank, n, generator=g)
    x = (u * torch.logspace(0, -2, rank)) @ v / rank**0.5
    return x + noise * x.norm() / (m * n) ** 0.5 * torch.randn(m, n, generator=g)


# ---------------------------------------------------------------------------------------------- the choice
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forced_true_picks_bf16_only_under_medium(force_bf16, dtype):
    force_bf16(True)
    x = torch.zeros(4, 8, dtype=dtype)
    with fp32_matmul_precision("medium"):
        assert ns_compute_dtype(x) == torch.bfloat16
    for prec in ("high", "highest"):
        with fp32_matmul_precision(prec):
            assert ns_compute_dtype(x) == torch.float32


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("prec", ["highest", "high", "medium"])
def test_float64_stays_float64(force_bf16, value, prec):
    force_bf16(value)
    with fp32_matmul_precision(prec):
        assert ns_compute_dtype(torch.zeros(4, 8, dtype=torch.float64)) == torch.float64


@pytest.mark.parametrize("prec", ["highest", "high", "medium"])
def test_forced_false_is_float32(force_bf16, prec):
    force_bf16(False)
    with fp32_matmul_precision(prec):
        assert ns_compute_dtype(torch.zeros(4, 8)) == torch.float32


def test_conftest_default_is_no_bf16_units():
    assert eo_utils.cpu_has_amx_bf16() is False
    assert eo_utils.cpu_has_bf16_matmul() is False
    with fp32_matmul_precision("medium"):
        assert ns_compute_dtype(torch.zeros(4, 8)) == torch.float32


@pytest.mark.parametrize("shape, bf16", [
    ((128, 128), True), ((128, 4096), True), ((512, 128), True), ((3, 256, 128), True),
    ((127, 4096), False), ((4096, 64), False), ((64, 64), False), ((3, 96, 512), False),
])
def test_small_cpu_matrices_keep_float32(monkeypatch, shape, bf16):
    """With bf16 units, a CPU matrix whose short side is below CPU_BF16_MIN_DIM (128) stays float32."""
    monkeypatch.setattr(eo_utils, "cpu_has_bf16_matmul", lambda: True)
    assert muon_utils.CPU_BF16_MIN_DIM == 128
    with fp32_matmul_precision("medium"):
        assert ns_compute_dtype(torch.zeros(shape)) == (torch.bfloat16 if bf16 else torch.float32)
        # newton_schulz follows it: equal to the explicit dtype's result
        x = gradient_like(shape[-2] * (shape[0] if len(shape) == 3 else 1), shape[-1], seed=5).reshape(shape)
        want = newton_schulz(x, 5, compute_dtype=torch.bfloat16 if bf16 else torch.float32)
        assert torch.equal(newton_schulz(x, 5), want)
    monkeypatch.setattr(eo_utils, "cpu_has_bf16_matmul", lambda: False)
    with fp32_matmul_precision("medium"):
        assert ns_compute_dtype(torch.zeros(shape)) == torch.float32


def test_newton_schulz_default_follows_the_choice(force_bf16):
    x = gradient_like(64, 160, seed=1)
    with fp32_matmul_precision("medium"):
        force_bf16(True)
        auto_true = newton_schulz(x, 5)
        force_bf16(False)
        auto_false = newton_schulz(x, 5)
        bf16 = newton_schulz(x, 5, compute_dtype=torch.bfloat16)
        fp32 = newton_schulz(x, 5, compute_dtype=torch.float32)
    assert auto_true.dtype == auto_false.dtype == torch.float32
    assert torch.equal(auto_true, bf16) and torch.equal(auto_false, fp32)
    assert not torch.equal(bf16, fp32)


# ---------------------------------------------------------------------------------------------- Muon
SHAPES = [(32, 96), (64, 64), (96, 48), (2, 40, 24)]


def _muon_step(params_init, grads, **kwargs):
    params = [torch.nn.Parameter(p.clone()) for p in params_init]
    stacked = {"stacked_dims": 1} if any(p.ndim == 3 for p in params) else {}
    groups = [{"params": [p], **(stacked if p.ndim == 3 else {})} for p in params]
    opt = Muon(groups, lr=0.02, **kwargs)
    for _ in range(2):  # the second step sees momentum, not just the gradient
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("value, explicit", [(True, torch.bfloat16), (False, torch.float32)])
def test_muon_default_equals_explicit_dtype(force_bf16, value, explicit):
    params_init = [torch.randn(s) for s in SHAPES]
    grads = [gradient_like(s[-2] * (s[0] if len(s) == 3 else 1), s[-1], seed=i).reshape(s)
             for i, s in enumerate(SHAPES)]
    force_bf16(value)
    default = _muon_step(params_init, grads)  # fp32_matmul_prec="medium" is Muon's default
    exact = _muon_step(params_init, grads, ns_compute_dtype=explicit)
    other = _muon_step(params_init, grads,
                       ns_compute_dtype=torch.float32 if explicit == torch.bfloat16 else torch.bfloat16)
    for d, e, o in zip(default, exact, other):
        assert torch.equal(d, e)
        assert not torch.equal(d, o)


def test_muon_highest_never_picks_bf16(force_bf16):
    params_init = [torch.randn(48, 80)]
    grads = [gradient_like(48, 80, seed=3)]
    force_bf16(True)
    highest = _muon_step(params_init, grads, fp32_matmul_prec="highest")
    force_bf16(False)
    fp32 = _muon_step(params_init, grads, fp32_matmul_prec="highest")
    assert torch.equal(highest[0], fp32[0])


# ---------------------------------------------------------------------------------------------- quality
# Measured on an AMD EPYC (AVX512-BF16), quintic x 5, 3 seeds each of rank 4 + 10% noise, rank 16 + 30%,
# rank 64 + 100% and pure Gaussian inputs, shapes 128x512, 512x512, 512x2048, 2048x512:
# * relative Frobenius difference bf16 vs fp32: 0.005-0.007 for full-rank inputs, 0.010-0.014 for rank 16,
#   0.019-0.028 for rank 4 (the fewer directions carry the norm, the more of it bf16 rounding reaches);
# * largest singular value: fp32 at most 1.145 (the quintic schedule's overshoot), bf16 at most 0.001 above;
#   smallest: wide shapes 0.976-0.978 for rank >= 16 (fp32 and bf16 within 0.003), 0.91 for rank 4 (the
#   noise directions start 1000x below the signal and have not converged after 5 steps, in fp32 too);
#   square shapes have singular values near 0 in both (a square Gaussian part has tiny ones).
# Bounds asserted, about twice the measured worst case (bf16 keeps 8 significant bits: 2^-9 ~ 0.002 per
# rounding, over 15 products): relative difference < 0.05; bf16's band [min, max] within 0.01 of fp32's;
# the largest singular value <= 1.16.
@pytest.mark.parametrize("shape", [(128, 512), (512, 512), (512, 2048)])
@pytest.mark.parametrize("rank, noise", [(4, 0.1), (16, 0.3)])
def test_bf16_quality_matches_fp32(shape, rank, noise):
    x = gradient_like(*shape, seed=0, rank=rank, noise=noise)
    fp32 = newton_schulz(x, 5, compute_dtype=torch.float32)
    bf16 = newton_schulz(x, 5, compute_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    rel = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert rel < 0.05, rel
    sa = torch.linalg.svdvals(fp32.double())
    sb = torch.linalg.svdvals(bf16.double())
    assert abs(sb.max() - sa.max()) < 0.01 and abs(sb.min() - sa.min()) < 0.01, (sa.min(), sa.max(), sb.min(), sb.max())
    assert sb.max() <= 1.16
    if shape[0] != shape[1]:  # wide: every singular value was moved close to 1
        lo = 0.9 if rank == 4 else 0.97
        assert sa.min() >= lo and sb.min() >= lo, (sa.min(), sb.min())


# ---------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("flags, expected", [
    ("fpu sse2 avx avx2 fma", False),
    ("avx2 avx512f avx512bw avx512_vnni", False),
    ("avx2 avx512f avx512_bf16", True),
    ("avx512f amx_tile amx_bf16", True),
    ("fp asimd sve bf16 i8mm", True),  # Arm Features
    ("FP ASIMD BF16", True),
    ("", False),
])
def test_flag_rule(flags, expected):
    assert eo_utils.bf16_matmul_in_cpu_flags(flags.split()) is expected


def test_flag_rule_unknown():
    assert eo_utils.bf16_matmul_in_cpu_flags(None) is False


def _linux_cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.lower().split())
    return None


@pytest.mark.real_cpu_bf16
@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/cpuinfo"),
                    reason="needs Linux /proc/cpuinfo")
def test_real_detection_agrees_with_proc_cpuinfo():
    flags = _linux_cpu_flags()
    if flags is None:
        pytest.skip("no flags line in /proc/cpuinfo")
    expected = bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})
    eo_utils.cpu_has_bf16_matmul.cache_clear()
    assert eo_utils.cpu_has_bf16_matmul() is expected
    assert eo_utils.cpu_has_bf16_matmul() is expected  # cached
    assert bench.cpu_has_bf16_matmul() is expected  # the CLI's answer is the same
    eo_utils.cpu_has_amx_bf16.cache_clear()
    amx = eo_utils.cpu_has_amx_bf16()
    # AMX needs the flag; torch's probe (OS tile state) may still say no where the flag is listed
    assert not amx or "amx_bf16" in flags
    with fp32_matmul_precision("medium"):  # the precision follows the bf16 units, AMX or not
        assert ns_compute_dtype(torch.zeros(128, 256)) == (torch.bfloat16 if expected else torch.float32)
        assert ns_compute_dtype(torch.zeros(2, 3)) == torch.float32  # small: float32 everywhere


@pytest.mark.real_cpu_bf16
def test_real_detection_is_a_cached_bool():
    for fn in (eo_utils.cpu_has_bf16_matmul, eo_utils.cpu_has_amx_bf16):
        assert isinstance(fn(), bool)
        assert hasattr(fn, "cache_clear")
