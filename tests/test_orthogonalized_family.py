"""The Muon family (Scion, PolarGrad, MOP, Spel, AdaptiveMuon, MuonHyperball, Muown) against plain references.

Every reference below is written from the formulas in the modules' docstrings, in float64, with its own
Newton-Schulz loop (the textbook iteration). The optimizers run on float64 parameters (Newton-Schulz then
also runs in float64), so the only differences are rounding of the same maths computed in another order:
tolerance ``RTOL64``. A float32 run is compared with the same reference at ``RTOL32`` (float32 rounding,
amplified by the Newton-Schulz polynomial, whose derivative reaches ~4 for small singular values, over 3
steps), and bf16 parameters are checked to run and to follow the float32 run (``BF16_TOL``, see there).
"""

from __future__ import annotations

import math

import pytest
import torch

from emerging_optimizers import registry
from emerging_optimizers.contrib import Muown, row_norm_fn
from emerging_optimizers.orthogonalized_optimizers.adaptive_muon import AdaptiveMuon
from emerging_optimizers.orthogonalized_optimizers.mop import MOP, polar_via_svd
from emerging_optimizers.orthogonalized_optimizers.muon_hyperball import MuonHyperball
from emerging_optimizers.orthogonalized_optimizers.polargrad import (
    PolarGrad,
    left_polargrad_orth_fn,
    one_sided_polargrad_orth_fn,
    right_polargrad_orth_fn,
)
from emerging_optimizers.orthogonalized_optimizers.scion import Scion
from emerging_optimizers.orthogonalized_optimizers.spectral_clipping_utils import (
    spectral_clip,
    spectral_clipped_weight_decay,
    spectral_hardcap,
)
from emerging_optimizers.orthogonalized_optimizers.spel import Spel

RTOL64, ATOL64 = 1e-9, 1e-11
RTOL32, ATOL32 = 2e-4, 2e-5
STEPS = 3
SHAPES = [(5, 3), (3, 6)]  # tall and wide

QUINTIC = [
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]
POLAR_EXPRESS = [  # its last tuple repeats
    (8.2051, -22.9019, 16.4607),
    (4.0664, -2.8612, 0.5184),
    (3.9096, -2.8234, 0.5250),
    (3.2856, -2.4153, 0.4853),
    (2.2779, -1.6198, 0.3985),
    (1.8726, -1.2307, 0.3585),
    (1.8564, -1.2132, 0.3568),
    (1.8750, -1.2500, 0.3750),
]


# ---------------------------------------------------------------------------------------------- references
def ref_ns(x: torch.Tensor, steps: int = 5, coeffs=QUINTIC) -> torch.Tensor:
    """Textbook Newton-Schulz in float64 on the short side (quintic cycles, polar express repeats its last)."""
    x = x.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(float(x.norm()), 1e-15)
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)] if coeffs is POLAR_EXPRESS else coeffs[i % len(coeffs)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def ref_polar(d: torch.Tensor) -> torch.Tensor:
    """Exact polar factor from an eigendecomposition of the small Gram matrix (independent of SVD)."""
    d = d.double()
    tall = d.shape[0] > d.shape[1]
    gram = d.T @ d if tall else d @ d.T
    evals, evecs = torch.linalg.eigh(gram)
    inv_sqrt = (evecs * evals.rsqrt()) @ evecs.T
    return d @ inv_sqrt if tall else inv_sqrt @ d


def fro_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def make_grads(shape, n=STEPS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]


def make_weight(shape, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def ref_momentum_loop(w0, grads, *, lr, momentum, weight_decay, nesterov, method, update_fn, post_fn=None):
    """The base class's loop: weight decay, EMA momentum, (Nesterov) direction, ``w -= lr * U``, projection."""
    w = w0.double().clone()
    m = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if weight_decay:
            if method == "decoupled":
                w = w * (1 - lr * weight_decay)
            elif method == "l2":
                g = g + weight_decay * w
            else:
                raise AssertionError(method)
        m = momentum * m + (1 - momentum) * g
        d = (1 - momentum) * g + momentum * m if nesterov else m
        w = w - lr * update_fn(d, g, t)
        if post_fn is not None:
            w = post_fn(w)
    return w


def run_opt(cls, w0, grads, dtype=torch.float64, **kw):
    p = torch.nn.Parameter(w0.clone().to(dtype))
    opt = cls([p], **kw)
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
    return p.detach(), opt


def check(actual, expected, dtype):
    rtol, atol = (RTOL64, ATOL64) if dtype == torch.float64 else (RTOL32, ATOL32)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------- Scion
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "kw",
    [
        {},  # constrained Scion: weight_decay = 1, decoupled
        {"weight_decay": 0.0, "spectral_radius": 2.0},  # unconstrained Scion
        {"weight_decay": 0.3, "nesterov": True, "momentum": 0.8, "num_ns_steps": 7},
    ],
)
def test_scion_matches_reference(shape, dtype, kw):
    m, n = shape
    lr = 0.1
    rho = kw.get("spectral_radius", 1.0)
    steps = kw.get("num_ns_steps", 5)
    w0, grads = make_weight(shape), make_grads(shape)
    expected = ref_momentum_loop(
        w0,
        grads,
        lr=lr,
        momentum=kw.get("momentum", 0.95),
        weight_decay=kw.get("weight_decay", 1.0),
        nesterov=kw.get("nesterov", False),
        method="decoupled",
        update_fn=lambda d, g, t: ref_ns(d, steps) * math.sqrt(m / n) * rho,
    )
    actual, _ = run_opt(Scion, w0, grads, dtype, lr=lr, fp32_matmul_prec="highest", **kw)
    check(actual, expected, dtype)


def test_scion_frank_wolfe_keeps_weights_in_ball():
    """With weight_decay = 1 the iterate is a convex combination of points of norm <= rho*sqrt(m/n)*max(NS)."""
    m, n = 6, 4
    p = torch.nn.Parameter(torch.zeros(m, n, dtype=torch.float64))
    opt = Scion([p], lr=0.5, spectral_radius=0.7)
    bound = 0.7 * math.sqrt(m / n) * 1.25  # quintic NS singular values stay below ~1.2
    for g in make_grads((m, n), n=10):
        p.grad = g
        opt.step()
        assert torch.linalg.matrix_norm(p.detach(), ord=2) <= bound


def test_scion_spectral_radius_per_group():
    w0, grads = make_weight((4, 4)), make_grads((4, 4))
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = Scion([{"params": [a]}, {"params": [b], "spectral_radius": 3.0}], lr=0.05)
    single, _ = run_opt(Scion, w0, grads, lr=0.05, spectral_radius=3.0)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
    torch.testing.assert_close(b.detach(), single, rtol=0, atol=0)
    assert not torch.allclose(a.detach(), b.detach())
    assert opt.state_dict()["param_groups"][1]["spectral_radius"] == 3.0


# ---------------------------------------------------------------------------------------------- PolarGrad
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_ns_steps": 0, "extra_scale_factor": 0.5},
        {"nesterov": True, "weight_decay": 0.1, "weight_decay_method": "l2"},
    ],
)
def test_polargrad_matches_reference(shape, dtype, kw):
    lr = 0.02
    steps, extra = kw.get("num_ns_steps", 5), kw.get("extra_scale_factor", 1.0)

    def update(d, g, t):
        o = ref_ns(d, steps)
        return o * (o * d).sum() * extra

    w0, grads = make_weight(shape), make_grads(shape)
    expected = ref_momentum_loop(
        w0,
        grads,
        lr=lr,
        momentum=0.95,
        weight_decay=kw.get("weight_decay", 0.01),
        nesterov=kw.get("nesterov", False),
        method=kw.get("weight_decay_method", "decoupled"),
        update_fn=update,
    )
    actual, _ = run_opt(PolarGrad, w0, grads, dtype, lr=lr, **kw)
    check(actual, expected, dtype)


def test_polargrad_scale_approximates_nuclear_norm():
    d = make_grads((8, 5), n=1)[0]
    p = torch.nn.Parameter(torch.zeros(8, 5, dtype=torch.float64))
    opt = PolarGrad([p], num_ns_steps=12, coefficient_type="polar_express", momentum=0.0, weight_decay=0.0, lr=1.0)
    p.grad = d
    opt.step()
    nuclear = torch.linalg.svdvals(d).sum()
    # 12 polar-express steps converge to the polar factor to ~1e-3 relative for this well-conditioned d
    torch.testing.assert_close(-p.detach(), ref_polar(d) * nuclear, rtol=0, atol=5e-3 * float(nuclear))


@pytest.mark.parametrize(
    "fn,shape",
    [
        (left_polargrad_orth_fn, (4, 9)),
        (right_polargrad_orth_fn, (9, 4)),
        (left_polargrad_orth_fn, (9, 4)),
        (right_polargrad_orth_fn, (4, 9)),
    ],
)
@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.5])
def test_one_sided_polargrad_matches_svd(fn, shape, alpha):
    """Exact polar factor times nuclear**alpha; the rank-deficient side (e.g. left on a tall matrix) too."""
    g = make_grads(shape, n=1)[0]
    s = torch.linalg.svdvals(g)
    expected = ref_polar(g) * s.sum() ** alpha * 1.5
    torch.testing.assert_close(fn(g, alpha=alpha, extra_scale_factor=1.5), expected, rtol=1e-9, atol=1e-9)
    out32 = fn(g.float(), alpha=alpha, extra_scale_factor=1.5)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), expected, rtol=1e-4, atol=1e-4)  # fp32 Gram + eigh rounding


def test_one_sided_polargrad_center_rows_and_validation():
    g = make_grads((6, 10), n=1)[0]
    centred = g - g.mean(0, keepdim=True)
    s = torch.linalg.svdvals(centred)
    out = one_sided_polargrad_orth_fn(g, side="left", center_rows=True)
    # the centred matrix has rank 5 (its columns sum to zero); the dropped direction is the constant one
    assert out.mean(0).abs().max() < 1e-12
    torch.testing.assert_close((out * centred).sum(), s.sum() ** 2, rtol=1e-9, atol=0)
    assert one_sided_polargrad_orth_fn(torch.zeros(3, 4), side="right").abs().max() == 0
    bf16 = one_sided_polargrad_orth_fn(g.bfloat16(), side="left")
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    with pytest.raises(ValueError, match="side"):
        one_sided_polargrad_orth_fn(g, side="up")
    with pytest.raises(ValueError, match="2-D"):
        left_polargrad_orth_fn(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="eps"):
        right_polargrad_orth_fn(g, eps=0.0)


# ---------------------------------------------------------------------------------------------- MOP
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [{}, {"scale_mode": "spectral", "extra_scale_factor": 0.2, "nesterov": True}])
def test_mop_matches_reference(shape, dtype, kw):
    m, n = shape
    lr = 0.01

    def update(d, g, t):
        if kw.get("scale_mode", "nuclear_norm") == "nuclear_norm":
            return ref_polar(d) * torch.linalg.svdvals(d).sum()
        return ref_polar(d) * math.sqrt(max(m, n)) * kw["extra_scale_factor"]

    w0, grads = make_weight(shape), make_grads(shape)
    expected = ref_momentum_loop(
        w0,
        grads,
        lr=lr,
        momentum=0.95,
        weight_decay=0.01,
        nesterov=kw.get("nesterov", False),
        method="decoupled",
        update_fn=update,
    )
    actual, _ = run_opt(MOP, w0, grads, dtype, lr=lr, **kw)
    check(actual, expected, dtype)


def test_polar_via_svd():
    for shape in [(5, 3), (3, 5), (2, 4, 3)]:
        a = torch.randn(shape, dtype=torch.float64)
        u, p, s = polar_via_svd(a, return_p=True)
        torch.testing.assert_close(u @ p, a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s, torch.linalg.svdvals(a))
        assert polar_via_svd(a)[1] is None
    u, _, _ = polar_via_svd(torch.randn(4, 6).bfloat16())
    assert u.dtype == torch.float32
    torch.testing.assert_close(u @ u.T, torch.eye(4), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- Spel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "kw", [{}, {"weight_decay": 0.0, "nesterov": True, "num_ns_steps": 7, "coefficient_type": "polar_express"}]
)
def test_spel_matches_reference(shape, dtype, kw):
    # Spel re-applies Newton-Schulz to its own output every step. The quintic set with more than 5 steps
    # wraps to its steepest tuple (|p'| ~ 3 near 1) and amplifies float32 rounding ~3x per step, so the
    # many-step case uses polar_express, which converges (p'(1) = 0) and keeps float32 within RTOL32.
    lr, steps = 0.05, kw.get("num_ns_steps", 5)
    coeffs = POLAR_EXPRESS if kw.get("coefficient_type") == "polar_express" else QUINTIC
    w0, grads = make_weight(shape), make_grads(shape)
    expected = ref_momentum_loop(
        w0,
        grads,
        lr=lr,
        momentum=0.95,
        weight_decay=kw.get("weight_decay", 0.1),
        nesterov=kw.get("nesterov", False),
        method="decoupled",
        update_fn=lambda d, g, t: ref_ns(d, steps, coeffs),
        post_fn=lambda w: ref_ns(w, steps, coeffs),
    )
    actual, _ = run_opt(Spel, w0, grads, dtype, lr=lr, fp32_matmul_prec="highest", **kw)
    check(actual, expected, dtype)


# ---------------------------------------------------------------------------------------------- AdaptiveMuon
def ref_adaptive_update(method, shape, beta2, eps, scale, wd, wd_method, lr):
    """Closure-based reference of AdaptiveMuon's update with its own second-moment state."""
    m, n = shape
    state = {}

    def update(d, g, t):
        o = ref_ns(d)
        if method == "adamuon":
            v = state.get("v", torch.zeros_like(o))
            v = beta2 * v + (1 - beta2) * o * o
            u = o / (v.sqrt() + eps)
        elif method == "normuon":
            dim = 1 if m >= n else 0
            v = state.get("v", torch.zeros(1))
            v = beta2 * v + (1 - beta2) * (o * o).mean(dim=dim, keepdim=True)
            ub = o / v.clamp_min(eps).sqrt()
            u = ub * o.norm() / max(float(ub.norm()), eps)
        else:  # namo: g (after l2 decay, which the loop already added) drives the scalar second moment
            v = state.get("v", 0.0)
            v = beta2 * v + (1 - beta2) * float(g.norm()) ** 2
            u = o * float(d.norm()) / (math.sqrt(v) + eps)
        state["v"] = v
        return u * scale

    return update, state


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["adamuon", "normuon", "namo"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["default", "l2-nesterov"])
def test_adaptive_muon_matches_reference(shape, method, dtype, variant):
    m, n = shape
    lr = 0.01
    kw = {"moment2_method": method, "fp32_matmul_prec": "highest"}
    wd, wd_method, nesterov, beta2, extra = 0.01, "decoupled", False, 0.95, 1.0
    if variant == "l2-nesterov":
        wd, wd_method, nesterov, beta2, extra = 0.2, "l2", True, 0.8, 0.3
        kw.update(
            weight_decay=wd,
            weight_decay_method=wd_method,
            nesterov=True,
            beta2=beta2,
            extra_scale_factor=extra,
            scale_mode="shape_scaling",
        )
        scale = math.sqrt(max(1.0, m / n)) * extra
    else:
        scale = math.sqrt(max(m, n))
    update, ref_state = ref_adaptive_update(method, shape, beta2, 1e-8, scale, wd, wd_method, lr)
    w0, grads = make_weight(shape), make_grads(shape)
    expected = ref_momentum_loop(
        w0, grads, lr=lr, momentum=0.95, weight_decay=wd, nesterov=nesterov, method=wd_method, update_fn=update
    )
    actual, opt = run_opt(AdaptiveMuon, w0, grads, dtype, lr=lr, **kw)
    check(actual, expected, dtype)
    v = opt.state[opt.param_groups[0]["params"][0]]["moment2_buffer"]
    expected_v = torch.as_tensor(ref_state["v"], dtype=torch.float64).reshape(v.shape)
    check(v, expected_v, dtype)


def test_adaptive_muon_defaults_state_shapes_and_per_group_method():
    opt = AdaptiveMuon([torch.nn.Parameter(torch.zeros(2, 2))])
    assert (opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["weight_decay"]) == (3e-4, 0.95, 0.01)
    assert (opt.defaults["beta2"], opt.defaults["eps"], opt.moment2_method) == (0.95, 1e-8, "adamuon")
    a, b, c = (torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3))
    opt = AdaptiveMuon(
        [
            {"params": [a]},
            {"params": [b], "moment2_method": "normuon"},
            {"params": [c], "moment2_method": "namo", "beta2": 0.5},
        ]
    )
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    opt.step()
    assert [tuple(opt.state[p]["moment2_buffer"].shape) for p in (a, b, c)] == [(5, 3), (5, 1), (1,)]
    wide = torch.nn.Parameter(torch.randn(3, 5))
    opt = AdaptiveMuon([wide], moment2_method="normuon")
    opt._init_group(opt.param_groups[0], skip_non_grad_params=False)
    assert tuple(opt.state[wide]["moment2_buffer"].shape) == (1, 5)


# ---------------------------------------------------------------------------------------------- MuonHyperball
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.0, "nesterov": True, "scale_mode": "shape_scaling"}])
def test_muon_hyperball_matches_reference(shape, dtype, kw):
    radius, lr = 2.5, 0.05
    w0 = fro_normalize(make_weight(shape)) * radius
    grads = make_grads(shape)
    expected = ref_momentum_loop(
        w0,
        grads,
        lr=lr,
        momentum=0.95,
        weight_decay=kw.get("weight_decay", 0.01),
        nesterov=kw.get("nesterov", False),
        method="decoupled",
        update_fn=lambda d, g, t: radius * fro_normalize(ref_ns(d)),
        post_fn=lambda w: radius * fro_normalize(w),
    )
    actual, _ = run_opt(
        MuonHyperball, w0, grads, dtype, lr=lr, hyperball_radius=radius, fp32_matmul_prec="highest", **kw
    )
    check(actual, expected, dtype)
    assert abs(float(actual.double().norm()) - radius) < 1e-5 * radius


def test_muon_hyperball_validation_and_per_group_radius():
    a = torch.nn.Parameter(fro_normalize(torch.randn(4, 3)) * 1.0)
    b = torch.nn.Parameter(fro_normalize(torch.randn(3, 3)) * 4.0)
    opt = MuonHyperball([{"params": [a]}, {"params": [b], "hyperball_radius": 4.0}], hyperball_radius=1.0, lr=0.1)
    for _ in range(2):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
    assert abs(float(a.detach().norm()) - 1.0) < 1e-5 and abs(float(b.detach().norm()) - 4.0) < 1e-5
    with pytest.raises(ValueError, match="Frobenius norm"):
        MuonHyperball([torch.nn.Parameter(torch.ones(2, 2))], hyperball_radius=1.0)
    with pytest.raises(ValueError, match="hyperball_radius"):
        MuonHyperball([a], hyperball_radius=float("inf"))
    with pytest.raises(ValueError, match="hyperball_eps"):
        MuonHyperball([a], hyperball_radius=1.0, hyperball_eps=0.0)
    with pytest.raises(TypeError):
        MuonHyperball([a])  # the radius is required
    with pytest.raises(TypeError):
        MuonHyperball([a], hyperball_radius=1.0, weight_update_hook=None)  # the projection is built in
    # bf16 weights on the sphere up to bf16 rounding are accepted
    w16 = torch.nn.Parameter((fro_normalize(torch.randn(16, 8)) * 3.0).bfloat16())
    MuonHyperball([w16], hyperball_radius=3.0)


# ---------------------------------------------------------------------------------------------- Muown
def ref_muown(w0, grads, *, lr, momentum, weight_decay, betas, eps, extra):
    m, n = w0.shape
    w = w0.double().clone()
    g = w.norm(dim=1, keepdim=True)
    vn = g.clone()
    buf = torch.zeros_like(w)
    mg, vg = torch.zeros_like(g), torch.zeros_like(g)
    b1, b2 = betas
    for t, grad in enumerate(grads, start=1):
        grad = grad.double()
        u = w / g
        v = u * vn
        grad_g = (grad * u).sum(dim=1, keepdim=True)
        grad_v = (g / vn) * (grad - u * grad_g)
        buf = momentum * buf + (1 - momentum) * grad_v
        v_new = v - lr * ref_ns(buf) * math.sqrt(max(m, n)) * extra
        mg = b1 * mg + (1 - b1) * grad_g
        vg = b2 * vg + (1 - b2) * grad_g**2
        adam = (mg / (1 - b1**t)) / ((vg / (1 - b2**t)).sqrt() + eps)
        g = (g - lr * adam) * (1 - lr * weight_decay)
        vn = v_new.norm(dim=1, keepdim=True)
        w = g * v_new / vn
    return w, g, vn


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.1, "betas": (0.8, 0.9), "extra_scale_factor": 0.5}])
def test_muown_matches_reference(shape, dtype, kw):
    lr = 0.02
    w0, grads = make_weight(shape), make_grads(shape)
    expected, g_ref, vn_ref = ref_muown(
        w0,
        grads,
        lr=lr,
        momentum=0.95,
        weight_decay=kw.get("weight_decay", 0.0),
        betas=kw.get("betas", (0.9, 0.95)),
        eps=1e-8,
        extra=kw.get("extra_scale_factor", 1.0),
    )
    actual, opt = run_opt(Muown, w0, grads, dtype, lr=lr, fp32_matmul_prec="highest", **kw)
    check(actual, expected, dtype)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["step"] == STEPS and state["g"].dtype == torch.promote_types(dtype, torch.float32)
    check(state["g"], g_ref, dtype)
    check(state["v_norm"], vn_ref, dtype)


def test_muown_zero_rows_stay_zero():
    w = torch.randn(4, 3)
    w[1] = 0
    p = torch.nn.Parameter(w)
    opt = Muown([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.randn(4, 3)
        opt.step()
    assert torch.isfinite(p).all() and p[1].abs().max() == 0


def test_row_norm_fn():
    g = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(row_norm_fn(g, extra_scale_factor=2.0), 2.0 * g / g.norm(dim=1, keepdim=True))
    c = g - g.mean(0)
    u = c / c.norm(dim=1, keepdim=True)
    torch.testing.assert_close(row_norm_fn(g, center_rows=True), u - u.mean(0))
    z = torch.zeros(2, 3)
    assert row_norm_fn(z).abs().max() == 0
    assert row_norm_fn(g.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="2-D"):
        row_norm_fn(torch.randn(3))


# ---------------------------------------------------------------------------------------------- spectral clipping
def _with_singular_values(m, n, s, batch=()):
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(*batch, m, k, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(*batch, n, k, dtype=torch.float64))
    s = torch.tensor(s, dtype=torch.float64)
    return (u * s.unsqueeze(-2)) @ v.mT, u, v, s


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spectral_clip_and_hardcap_match_svd(shape, dtype):
    # singular values kept >= 0.05 * |X|_F away from 0 so 8 polar-express steps converge (module docstring)
    x, u, v, s = _with_singular_values(*shape, [3.0, 2.0, 1.5, 0.9, 0.5, 0.2])
    tol = 1e-7 if dtype == torch.float64 else 2e-5  # NS convergence (1e-8 here) / float32 rounding
    clipped = spectral_clip(x.to(dtype), sigma_min=0.3, sigma_max=1.2)
    assert clipped.dtype == dtype
    torch.testing.assert_close(clipped.double(), (u * s.clamp(0.3, 1.2)) @ v.T, rtol=0, atol=tol)
    torch.testing.assert_close(
        spectral_hardcap(x.to(dtype), 1.0).double(), (u * s.clamp(max=1.0)) @ v.T, rtol=0, atol=tol
    )
    decayed = spectral_clipped_weight_decay(x.to(dtype), beta=1.0, c=0.25).double()
    torch.testing.assert_close(decayed, (u * (0.75 * s + 0.25 * s.clamp(max=1.0))) @ v.T, rtol=0, atol=tol)


def test_spectral_clip_batched_defaults_and_validation():
    x, u, v, s = _with_singular_values(4, 7, [2.0, 1.0, 0.7, 0.3], batch=(3,))
    out = spectral_clip(x)  # [-1, 1]: only the top singular value changes
    torch.testing.assert_close(out, (u * s.clamp(max=1.0)) @ v.mT, rtol=0, atol=1e-7)
    assert spectral_clipped_weight_decay(x, c=0.0).equal(x)
    with pytest.raises(ValueError, match="sigma_min"):
        spectral_clip(x, sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="beta"):
        spectral_hardcap(x, beta=-1.0)
    with pytest.raises(ValueError, match="c"):
        spectral_clipped_weight_decay(x, c=1.5)
    with pytest.raises(ValueError, match="ndim"):
        spectral_clip(torch.randn(4))


# ---------------------------------------------------------------------------------------------- shared contract bits
FAMILY = {
    "scion": (Scion, {}),
    "polargrad": (PolarGrad, {}),
    "mop": (MOP, {}),
    "spel": (Spel, {}),
    "adaptive_muon": (AdaptiveMuon, {"moment2_method": "normuon"}),
    "muon_hyperball": (MuonHyperball, {"hyperball_radius": 1.0}),
    "muown": (Muown, {}),
}


def _unit_param(shape, dtype=torch.float32):
    return torch.nn.Parameter(fro_normalize(torch.randn(shape)).to(dtype))


@pytest.mark.parametrize("name", list(FAMILY))
def test_registered_with_explicit_signature(name):
    cls, kw = FAMILY[name]
    assert registry.get_optimizer_cls(name) is cls
    valid = registry.valid_kwargs(cls)
    assert valid[:2] == ["lr", "momentum"] and set(kw) <= set(valid)
    configured = registry.get_configured_optimizer_cls(name, lr=0.01, **kw)
    configured([_unit_param((3, 3))])
    with pytest.raises(TypeError, match="does not accept arguments: not_an_option"):
        registry.get_configured_optimizer_cls(name, not_an_option=1)


@pytest.mark.parametrize("name", list(FAMILY))
def test_state_dict_resume_is_bit_identical(name):
    cls, kw = FAMILY[name]
    w0 = fro_normalize(torch.randn(5, 4))
    grads = [torch.randn(5, 4) for _ in range(4)]
    p = torch.nn.Parameter(w0.clone())
    opt = cls([p], lr=0.05, **kw)
    for g in grads[:2]:
        p.grad = g.clone()
        opt.step()
    saved, saved_p = opt.state_dict(), p.detach().clone()
    q = torch.nn.Parameter(saved_p.clone())
    opt2 = cls([q], lr=0.05, **kw)
    opt2.load_state_dict(saved)
    for g in grads[2:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("name", list(FAMILY))
def test_bf16_params_follow_fp32(name):
    """bf16 parameters (rejected by the reference library) are updated in place and track the fp32 run."""
    cls, kw = FAMILY[name]
    w0 = fro_normalize(torch.randn(8, 6))
    grads = [torch.randn(8, 6) for _ in range(3)]
    p32, p16 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.bfloat16())
    opt32 = cls([p32], lr=0.02, momentum_dtype=torch.float32, **kw) if name != "muown" else cls([p32], lr=0.02, **kw)
    opt16 = cls([p16], lr=0.02, momentum_dtype=torch.float32, **kw) if name != "muown" else cls([p16], lr=0.02, **kw)
    for g in grads:
        p32.grad, p16.grad = g.clone(), g.bfloat16()
        opt32.step()
        opt16.step()
    assert p16.dtype == torch.bfloat16 and torch.isfinite(p16).all()
    # bf16 keeps 8 significant bits: the initial weights, gradients and each step's result are rounded by up
    # to 2**-9 ~ 0.2% relative; three steps stay within ~0.5% of the fp32 run (measured 0.25-0.46%), while the
    # weights themselves move by 5-150%.
    BF16_TOL = 0.012
    moved = float((p32.detach() - w0).norm() / w0.norm())
    assert moved > 3 * BF16_TOL
    assert float((p16.detach().float() - p32.detach()).norm() / p32.detach().norm()) < BF16_TOL


@pytest.mark.parametrize("name", ["scion", "polargrad", "mop", "spel", "adaptive_muon"])
def test_weight_update_hook_called_with_fresh_update(name):
    cls, kw = FAMILY[name]
    calls = []

    class Recorder:
        def pre_weight_update_inplace(self, p, update):
            state = opt.state[p]
            assert all(update.data_ptr() != t.data_ptr() for t in state.values() if torch.is_tensor(t))
            update.mul_(0.0)  # a hook may modify the update: here it cancels the step
            calls.append("pre")
            return p.detach().clone()

        def post_weight_update_inplace(self, p, before):
            calls.append("post")
            if name != "spel":  # the zeroed update left p as it was after weight decay (Spel projects it)
                assert torch.equal(p.detach(), before)

    p = _unit_param((4, 3))
    opt = cls([p], lr=0.1, weight_update_hook=Recorder(), **kw)
    for _ in range(2):
        p.grad = torch.randn(4, 3)
        opt.step()
        assert opt.state[p]["momentum_buffer"].abs().max() > 0  # zeroing the update left the momentum alone
    assert calls == ["pre", "post", "pre", "post"]


def test_scion_accepts_weight_decay_and_defaults():
    p = _unit_param((3, 3))
    opt = Scion([p])
    d = opt.defaults
    assert (d["lr"], d["momentum"], d["weight_decay"], d["weight_decay_method"], d["nesterov"]) == (
        3e-4,
        0.95,
        1.0,
        "decoupled",
        False,
    )
    assert (d["fp32_matmul_prec"], d["num_ns_steps"], opt.spectral_radius) == ("medium", 5, 1.0)
    assert Scion([p], weight_decay=0.0).defaults["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("scion", {"spectral_radius": 0.0}, "spectral_radius"),
        ("scion", {"lr": -1.0}, "lr"),
        ("scion", {"weight_decay": -0.1}, "weight_decay"),
        ("polargrad", {"num_ns_steps": -1}, "num_ns_steps"),
        ("polargrad", {"coefficient_type": "nope"}, "coefficient_type"),
        ("polargrad", {"extra_scale_factor": 0.0}, "extra_scale_factor"),
        ("mop", {"scale_mode": "nope"}, "scale_mode"),
        ("mop", {"momentum": 1.0}, "momentum"),
        ("spel", {"num_ns_steps": 0}, "num_ns_steps"),
        ("spel", {"weight_decay_method": "nope"}, "weight_decay_method"),
        ("adaptive_muon", {"moment2_method": "adam"}, "moment2_method"),
        ("adaptive_muon", {"beta2": 1.0}, "beta2"),
        ("adaptive_muon", {"eps": 0.0}, "eps"),
        ("adaptive_muon", {"fp32_matmul_prec": "low"}, "fp32_matmul_prec"),
        ("muown", {"betas": (0.9, 1.0)}, "betas"),
        ("muown", {"adam_eps": -1.0}, "adam_eps"),
        ("muown", {"scale_mode": "nope"}, "scale_mode"),
    ],
)
def test_invalid_options_raise_at_construction(name, bad, match):
    cls, kw = FAMILY[name]
    with pytest.raises(ValueError, match=match):
        cls([_unit_param((3, 3))], **{**kw, **bad})
    opt = cls([_unit_param((3, 3))], **kw)
    with pytest.raises(ValueError, match=match):  # a new group is validated too, and not added
        opt.add_param_group({"params": [_unit_param((2, 2))], **bad})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", list(FAMILY))
def test_vectors_rejected_at_construction(name):
    cls, kw = FAMILY[name]
    with pytest.raises(ValueError, match="shape"):
        cls([torch.nn.Parameter(fro_normalize(torch.randn(4)))], **kw)


@pytest.mark.parametrize("name", ["polargrad", "mop", "spel", "scion"])
def test_conv_kernels_flattened(name):
    """Rank-4 kernels are updated as ``[out, in*kh*kw]`` matrices: same result as the flattened parameter."""
    cls, kw = FAMILY[name]
    w0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    grads = [torch.randn(4, 2, 3, 3, dtype=torch.float64) for _ in range(2)]
    conv, _ = run_opt(cls, w0, grads, lr=0.05, **kw)
    flat, _ = run_opt(cls, w0.reshape(4, -1), [g.reshape(4, -1) for g in grads], lr=0.05, **kw)
    torch.testing.assert_close(conv.reshape(4, -1), flat, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(FAMILY))
def test_zero_lr_leaves_weights_unchanged(name):
    """lr = 0 (a scheduler freezing a group) changes nothing, also for Spel's projection and Muown's recomposition."""
    cls, kw = FAMILY[name]
    p = _unit_param((5, 4))
    before = p.detach().clone()
    opt = cls([p], lr=0.0, **kw)
    for _ in range(2):
        p.grad = torch.randn(5, 4)
        opt.step()
    assert torch.equal(p.detach(), before)
