"""ObliqueSGD, ObliqueAdam and Iso against plain float64 references written here, and their properties.

The references are deliberately written differently from the library: per-column loops for the oblique
manifold, Gram-Schmidt for the QR retraction, ``Y (Y^T Y)^{-1/2}`` from an eigendecomposition for the polar one,
an explicit inverse for the Cayley curve.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import emerging_optimizers.riemannian_optimizers as ro
from emerging_optimizers import registry
from emerging_optimizers.riemannian_optimizers import Iso, ObliqueAdam, ObliqueSGD
from emerging_optimizers.riemannian_optimizers.isospectral import (
    cayley_retraction,
    polar_retraction,
    qr_retraction,
)
from emerging_optimizers.riemannian_optimizers.normalized_optimizer import calculate_oblique_adam_direction

EPS32 = torch.finfo(torch.float32).eps

# Tolerances, in one place.
# float64 params against the float64 references: a handful of steps of O(1) arithmetic, rounding only.
TOL_F64 = dict(rtol=0.0, atol=1e-11)
# float32 params against the float64 references after STEPS steps: each step rounds at ~1e-7 relative, the
# retraction does not amplify it (unit norms / orthonormal factors), so a few 1e-6 at most.
TOL_F32 = dict(rtol=0.0, atol=2e-5)
STEPS = 5


# ---------------------------------------------------------------------------------------------- references
def _grads(shape: tuple[int, ...], n: int, seed: int = 1, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]


def ref_oblique(w0, grads, *, kind, lr, dim, weight_decay=0.0, method="decoupled", eps=1e-8, momentum=0.9,
                betas=(0.9, 0.99), correct_bias=True):
    """Plain float64 Riemannian SGD/Adam on unit-norm columns (dim=0) or rows (dim=1), one column at a time."""
    w = w0.double().clone()
    if dim == 1:
        w = w.T.clone()
    n = w.shape[1]
    buf = torch.zeros_like(w)
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.double().T if dim == 1 else g.double()
        if kind == "sgd":
            buf = momentum * buf + g
            x = buf
        else:
            b1, b2 = betas
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            bc1 = 1 - b1**t if correct_bias else 1.0
            bc2 = 1 - b2**t if correct_bias else 1.0
            x = (m / bc1) / ((v / bc2).sqrt() + eps)
        new = torch.empty_like(w)
        for j in range(n):
            wj, xj = w[:, j], x[:, j]
            r = xj - wj * torch.dot(wj, xj)
            if weight_decay:
                if method == "l2":
                    r = r + weight_decay * wj
                else:
                    c = {"decoupled": lr * weight_decay, "independent": weight_decay,
                         "palm": lr * lr * weight_decay}[method]
                    wj = (1 - c) * wj
            y = wj - lr * r
            new[:, j] = y / max(float(torch.linalg.vector_norm(y)), eps)
        w = new
    return w.T if dim == 1 else w


def gram_schmidt(y):
    """Q of the thin QR with positive diag(R), by modified Gram-Schmidt (float64)."""
    q = y.clone()
    for j in range(q.shape[1]):
        for i in range(j):
            q[:, j] -= torch.dot(q[:, i], q[:, j]) * q[:, i]
        q[:, j] /= torch.linalg.vector_norm(q[:, j])
    return q


def polar_by_eigh(y):
    evals, evecs = torch.linalg.eigh(y.T @ y)
    return y @ (evecs @ torch.diag(evals.rsqrt()) @ evecs.T)


def cayley_by_inverse(x, g, lr):
    """Wen-Yin: Y = (I + lr/2 A)^{-1} (I - lr/2 A) X with A = G X^T - X G^T."""
    a = g @ x.T - x @ g.T
    eye = torch.eye(x.shape[0], dtype=x.dtype)
    return torch.linalg.inv(eye + lr / 2 * a) @ (eye - lr / 2 * a) @ x


def ref_iso(w0, grads, *, lr, momentum, retraction):
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    v = vh.T
    mu_, mv = torch.zeros_like(u), torch.zeros_like(v)
    for g in grads:
        g = g.double()
        gu, gv = g @ v @ torch.diag(s), g.T @ u @ torch.diag(s)
        mu_, mv = momentum * mu_ + gu, momentum * mv + gv
        if retraction == "qr":
            u, v = gram_schmidt(u - lr * mu_), gram_schmidt(v - lr * mv)
        elif retraction == "polar":
            u, v = polar_by_eigh(u - lr * mu_), polar_by_eigh(v - lr * mv)
        else:
            u, v = cayley_by_inverse(u, mu_, lr), cayley_by_inverse(v, mv, lr)
    return u @ torch.diag(s) @ v.T


def run(opt_cls, w0, grads, dtype=torch.float64, **kw):
    p = torch.nn.Parameter(w0.to(dtype).clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
    return p.detach(), opt


def unit(shape, dim, seed=0, dtype=torch.float64):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.nn.functional.normalize(w, dim=dim).to(dtype)


# ---------------------------------------------------------------------------------------------- vs references
SGD_CONFIGS = [
    dict(dim=0, momentum=0.9),
    dict(dim=1, momentum=0.9),
    dict(dim=0, momentum=0.0),
    dict(dim=1, momentum=0.5, weight_decay=0.1, method="decoupled"),
    dict(dim=0, momentum=0.9, weight_decay=0.1, method="l2"),
    dict(dim=1, momentum=0.9, weight_decay=0.05, method="independent"),
    dict(dim=0, momentum=0.9, weight_decay=0.5, method="palm"),
]


@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_oblique_sgd_matches_float64_reference(cfg):
    shape, lr = (7, 5), 0.1
    w0, grads = unit(shape, cfg["dim"]), _grads(shape, STEPS)
    kw = dict(lr=lr, momentum=cfg["momentum"], dim=cfg["dim"], weight_decay=cfg.get("weight_decay", 0.0),
              weight_decay_method=cfg.get("method", "decoupled"))
    expected = ref_oblique(w0, grads, kind="sgd", lr=lr, dim=cfg["dim"], momentum=cfg["momentum"],
                           weight_decay=kw["weight_decay"], method=kw["weight_decay_method"])
    got, _ = run(ObliqueSGD, w0, grads, **kw)
    torch.testing.assert_close(got, expected, **TOL_F64)
    got32, _ = run(ObliqueSGD, w0, grads, dtype=torch.float32, **kw)
    torch.testing.assert_close(got32.double(), expected, **TOL_F32)


ADAM_CONFIGS = [
    dict(dim=0, betas=(0.9, 0.99)),
    dict(dim=1, betas=(0.9, 0.999)),
    dict(dim=0, betas=(0.0, 0.9)),
    dict(dim=1, betas=(0.5, 0.99), correct_bias=False),
    dict(dim=0, betas=(0.9, 0.99), weight_decay=0.1, method="l2"),
    dict(dim=1, betas=(0.9, 0.99), weight_decay=0.1, method="decoupled"),
    dict(dim=0, betas=(0.9, 0.95), weight_decay=0.02, method="independent"),
]


@pytest.mark.parametrize("cfg", ADAM_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_oblique_adam_matches_float64_reference(cfg):
    shape, lr = (6, 9), 0.05
    w0, grads = unit(shape, cfg["dim"]), _grads(shape, STEPS)
    kw = dict(lr=lr, betas=cfg["betas"], dim=cfg["dim"], weight_decay=cfg.get("weight_decay", 0.0),
              weight_decay_method=cfg.get("method", "decoupled"), correct_bias=cfg.get("correct_bias", True))
    expected = ref_oblique(w0, grads, kind="adam", lr=lr, dim=cfg["dim"], betas=cfg["betas"],
                           weight_decay=kw["weight_decay"], method=kw["weight_decay_method"],
                           correct_bias=kw["correct_bias"])
    got, _ = run(ObliqueAdam, w0, grads, **kw)
    torch.testing.assert_close(got, expected, **TOL_F64)
    got32, _ = run(ObliqueAdam, w0, grads, dtype=torch.float32, **kw)
    torch.testing.assert_close(got32.double(), expected, **TOL_F32)


@pytest.mark.parametrize("retraction", ["qr", "polar", "cayley"])
@pytest.mark.parametrize("shape", [(9, 5), (5, 9), (6, 6)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_iso_matches_float64_reference(retraction, shape, momentum):
    lr = 0.03
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = _grads(shape, STEPS)
    expected = ref_iso(w0, grads, lr=lr, momentum=momentum, retraction=retraction)
    got, opt = run(Iso, w0, grads, lr=lr, momentum=momentum, retraction=retraction)
    torch.testing.assert_close(got, expected, **TOL_F64)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["step"] == STEPS and state["u"].dtype == torch.float64
    got32, _ = run(Iso, w0, grads, dtype=torch.float32, lr=lr, momentum=momentum, retraction=retraction)
    torch.testing.assert_close(got32.double(), expected, **TOL_F32)


# ---------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("opt_cls,kw", [(ObliqueSGD, dict(lr=0.05)), (ObliqueAdam, dict(lr=0.01)),
                                        (ObliqueSGD, dict(lr=0.05, weight_decay=0.1))],
                         ids=["sgd", "adam", "sgd-wd"])
@pytest.mark.parametrize("dim", [0, 1])
def test_oblique_stays_on_manifold_for_1000_steps(opt_cls, kw, dim):
    """float32, random gradients: every column (row) keeps unit norm to 1e-6 (the retraction divides by the norm,
    so each step leaves only a few float32 ulps of error, and it does not accumulate)."""
    p = torch.nn.Parameter(unit((16, 12), dim, dtype=torch.float32))
    opt = opt_cls([p], dim=dim, **kw)
    gen = torch.Generator().manual_seed(2)
    for _ in range(1000):
        p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    norms = torch.linalg.vector_norm(p.detach().double(), dim=dim)
    assert (norms - 1).abs().max() <= 1e-6


@pytest.mark.parametrize("retraction,steps,factor", [("qr", 500, 4.0), ("polar", 500, 4.0), ("cayley", 500, 16.0)])
@pytest.mark.parametrize("shape", [(24, 10), (10, 24)])
def test_iso_keeps_singular_values(retraction, steps, factor, shape):
    """The singular values of W stay those of W0 to float32 rounding, over many steps.

    W = U diag(S) V^T is recomputed from the factors each step, so by Weyl's inequality its singular values differ
    from S by at most the rounding of that product plus sigma_max times the factors' departure from orthonormality:
    a few sqrt(max(m, n)) * eps32 * sigma_max (we saw <= 1.6 of these units for qr and polar). QR and polar
    re-orthonormalise every step; the Cayley curve is orthogonal only in exact arithmetic and its rounding
    accumulates slowly (about 40 ulps in U^T U after 1,000 steps, 4.2 units of the bound), hence a larger factor.
    ``sigma`` in the state itself never changes (bit-identical).
    """
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    s0 = torch.linalg.svdvals(p.detach().double())
    opt = Iso([p], lr=0.05, momentum=0.9, retraction=retraction)
    gen = torch.Generator().manual_seed(3)
    p.grad = torch.randn(shape, generator=gen)
    opt.step()
    sigma = opt.state[p]["sigma"].clone()
    for _ in range(steps - 1):
        p.grad = torch.randn(shape, generator=gen)
        opt.step()
    assert torch.equal(opt.state[p]["sigma"], sigma)
    atol = factor * math.sqrt(max(shape)) * EPS32 * float(s0.max())
    torch.testing.assert_close(torch.linalg.svdvals(p.detach().double()), s0, rtol=0.0, atol=atol)
    assert not torch.allclose(p.detach().double(), torch.randn(shape, generator=torch.Generator().manual_seed(0))
                              .double())  # and W did move


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 8 * EPS32), (torch.float64, 1e-13)])
def test_each_retraction_returns_orthonormal_columns(dtype, tol):
    """Q^T Q = I to a few ulps times sqrt(r) for each retraction; QR's diag(R) is positive; polar is the nearest."""
    gen = torch.Generator().manual_seed(4)
    m, r = 20, 7
    y = torch.randn(m, r, generator=gen, dtype=torch.float64)
    eye = torch.eye(r, dtype=torch.float64)
    point = gram_schmidt(y)
    mom = torch.randn(m, r, generator=gen, dtype=torch.float64)
    outs = {
        "qr": qr_retraction(y.to(dtype)),
        "polar": polar_retraction(y.to(dtype)),
        "cayley": cayley_retraction(point.to(dtype), mom.to(dtype), 0.1),
    }
    for name, q in outs.items():
        q = q.double()
        assert (q.T @ q - eye).abs().max() <= tol * math.sqrt(r), name
    loose = dict(rtol=0.0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(outs["qr"].double(), gram_schmidt(y), **loose)
    torch.testing.assert_close(outs["polar"].double(), polar_by_eigh(y), **loose)
    torch.testing.assert_close(outs["cayley"].double(), cayley_by_inverse(point, mom, 0.1), **loose)
    # the sign fix: a column of y flipped flips the same column of Q (the convention is the input's, not LAPACK's)
    flipped = y.clone()
    flipped[:, 2] *= -1
    q_flipped = qr_retraction(flipped.to(dtype)).double()
    torch.testing.assert_close(q_flipped[:, 2], -outs["qr"].double()[:, 2], **loose)


def test_oblique_adam_first_step_has_standard_adam_magnitude():
    """At t=1, Adam's direction is m_hat/(sqrt(v_hat)+eps) = g/(|g|+eps): entries of magnitude ~1. The reference
    library's (m/bc1)/(sqrt(v)/bc2 + eps) gives sqrt(1 - b2) of that: 0.0316x at b2 = 0.999."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    g = torch.randn(8, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    direction = calculate_oblique_adam_direction(g, torch.zeros_like(g), torch.zeros_like(g), (b1, b2), 1, eps)
    torch.testing.assert_close(direction, g / (g.abs() + eps))
    m, v = (1 - b1) * g, (1 - b2) * g * g
    reference_library = (m / (1 - b1)) / (v.sqrt() / (1 - b2) + eps)
    ratio = reference_library.abs() / direction.abs()
    torch.testing.assert_close(ratio, torch.full_like(ratio, math.sqrt(1 - b2)), rtol=1e-4, atol=0.0)  # eps/|g|
    assert abs(math.sqrt(1 - b2) - 0.0316) < 1e-4

    # and through the optimizer: for a small lr, the step is lr * P_W(sign g), with no 0.03 factor
    lr = 1e-4
    w0 = unit((8, 6), 0)
    got, _ = run(ObliqueAdam, w0, [g], lr=lr, betas=(b1, b2), eps=eps)
    tangent = direction - w0 * (w0 * direction).sum(0, keepdim=True)
    step = w0 - got
    assert abs(float(step.norm() / (lr * tangent.norm())) - 1.0) < 1e-3


def test_oblique_rank_above_two_is_viewed_as_out_by_rest():
    """A conv kernel [out, in, kh, kw] is the matrix [out, in*kh*kw]: dim=1 makes each filter p[i] unit-norm."""
    shape = (6, 3, 2, 2)
    grads = _grads(shape, 3)
    for dim in (0, 1):
        w0 = unit((6, 12), dim).reshape(shape)
        got, opt = run(ObliqueSGD, w0, grads, lr=0.1, dim=dim)
        flat, _ = run(ObliqueSGD, w0.reshape(6, 12), [g.reshape(6, 12) for g in grads], lr=0.1, dim=dim)
        assert torch.equal(got.reshape(6, 12), flat)
        assert opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"].shape == shape
    norms = torch.linalg.vector_norm(got.reshape(6, -1), dim=1)
    torch.testing.assert_close(norms, torch.ones(6, dtype=torch.float64))
    # a non-contiguous parameter (a transposed layout) gives the same result as its contiguous copy
    w0, grads2 = unit((5, 7), 0), _grads((5, 7), 2)
    p = torch.nn.Parameter(w0.T.contiguous().T)
    assert not p.is_contiguous()
    opt = ObliqueSGD([p], lr=0.1)
    for g in grads2:
        p.grad = g
        opt.step()
    ref, _ = run(ObliqueSGD, w0, grads2, lr=0.1)
    assert torch.equal(p.detach(), ref)


OPTIMIZERS = [
    (ObliqueSGD, dict(lr=0.05, weight_decay=0.01)),
    (ObliqueAdam, dict(lr=0.02, dim=1)),
    (Iso, dict(lr=0.05)),
    (Iso, dict(lr=0.05, retraction="polar")),
    (Iso, dict(lr=0.05, retraction="cayley")),
]
OPT_IDS = ["oblique_sgd", "oblique_adam", "iso-qr", "iso-polar", "iso-cayley"]


@pytest.mark.parametrize("opt_cls,kw", OPTIMIZERS, ids=OPT_IDS)
def test_resume_is_bit_identical(opt_cls, kw):
    """N steps straight equal N/2 steps, state_dict through torch.save, a new optimizer, load, N/2 steps."""
    shape, n = (10, 6), 8
    w0, grads = unit(shape, kw.get("dim", 0), dtype=torch.float32), [g.float() for g in _grads(shape, n)]
    straight, opt = run(opt_cls, w0, grads, dtype=torch.float32, **kw)

    p = torch.nn.Parameter(w0.clone())
    first = opt_cls([p], **kw)
    for g in grads[: n // 2]:
        p.grad = g
        first.step()
    buf = io.BytesIO()
    torch.save({"p": p.detach().clone(), "opt": first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    q = torch.nn.Parameter(ckpt["p"])
    second = opt_cls([q], **{**kw, "lr": kw["lr"] * 7})  # the hyperparameters come from the checkpoint
    second.load_state_dict(ckpt["opt"])
    for g in grads[n // 2:]:
        q.grad = g
        second.step()
    assert torch.equal(q.detach(), straight)
    assert second.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


@pytest.mark.parametrize("opt_cls,kw", OPTIMIZERS, ids=OPT_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_float32_state(opt_cls, kw, dtype):
    """bf16/fp16 params: state in float32, the float32 step rounded into the parameter once."""
    shape = (10, 6)
    w0 = unit(shape, kw.get("dim", 0), dtype=dtype)
    g = _grads(shape, 1)[0].to(dtype)
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls([p], **kw)
    p.grad = g
    opt.step()
    assert p.dtype == dtype
    tensors = [t for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    ref, _ = run(opt_cls, w0.float(), [g.float()], dtype=torch.float32, **kw)
    assert torch.equal(p.detach(), ref.to(dtype))
    # a few more steps: finite, still near the manifold (oblique) to the format's rounding
    for gi in _grads(shape, 5, seed=9):
        p.grad = gi.to(dtype)
        opt.step()
    assert torch.isfinite(p).all()
    if opt_cls is not Iso:
        norms = torch.linalg.vector_norm(p.detach().double(), dim=kw.get("dim", 0))
        assert (norms - 1).abs().max() <= 4 * torch.finfo(dtype).eps


def test_iso_low_precision_follows_the_float32_factors():
    """Iso's factors never read the parameter after step 0, so a bf16 run equals the float32 run rounded."""
    shape = (8, 5)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    grads = [g.bfloat16() for g in _grads(shape, 6)]
    got, _ = run(Iso, w0, grads, dtype=torch.bfloat16, lr=0.05)
    ref, _ = run(Iso, w0.float(), [g.float() for g in grads], dtype=torch.float32, lr=0.05)
    assert torch.equal(got, ref.bfloat16())


# ---------------------------------------------------------------------------------------------- API
def _param(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: Iso([_param(4)]), r"Iso.*shape \(4,\)"),
        (lambda: Iso([_param(2, 3, 4)]), r"Iso.*shape \(2, 3, 4\)"),
        (lambda: ObliqueSGD([_param(4)]), r"ObliqueSGD.*shape \(4,\)"),
        (lambda: ObliqueAdam([_param(4, 3), _param(3)]), r"ObliqueAdam.*shape \(3,\)"),
        (lambda: Iso([_param(3, 3)], retraction="householder"), "retraction"),
        (lambda: Iso([_param(3, 3)], 1e-3, 0.9, "svd"), "retraction"),
        (lambda: Iso([_param(3, 3)], fp32_matmul_prec="low"), "fp32_matmul_prec"),
        (lambda: ObliqueSGD([_param(3, 3)], dim=2), "dim"),
        (lambda: ObliqueAdam([_param(3, 3)], dim=-1), "dim"),
        (lambda: ObliqueSGD([_param(3, 3)], dim=True), "dim"),
        (lambda: ObliqueSGD([_param(3, 3)], lr=-0.1), r"\(lr\)"),
        (lambda: ObliqueAdam([_param(3, 3)], lr=-0.1), r"\(lr\)"),
        (lambda: Iso([_param(3, 3)], lr=-0.1), r"\(lr\)"),
        (lambda: Iso([_param(3, 3)], lr=float("nan")), r"\(lr\)"),
        (lambda: Iso([_param(3, 3)], momentum=1.0), "momentum"),
        (lambda: ObliqueSGD([_param(3, 3)], momentum=-0.1), "momentum"),
        (lambda: ObliqueSGD([_param(3, 3)], weight_decay=-1.0), "weight_decay"),
        (lambda: ObliqueSGD([_param(3, 3)], weight_decay_method="l1"), "weight_decay_method"),
        (lambda: ObliqueAdam([_param(3, 3)], betas=(1.0, 0.99)), r"beta1 \(betas\[0\]\)"),
        (lambda: ObliqueAdam([_param(3, 3)], betas=(0.9, -0.1)), r"beta2 \(betas\[1\]\)"),
        (lambda: ObliqueAdam([_param(3, 3)], betas=(0.9,)), "betas"),
        (lambda: ObliqueAdam([_param(3, 3)], eps=0.0), r"\(eps\)"),
        (lambda: ObliqueAdam([_param(3, 3)], correct_bias="yes"), "correct_bias"),
        (lambda: ObliqueSGD([{"params": [_param(3, 3)], "dim": 3}]), "dim"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_group_added_later_is_refused_whole():
    opt = Iso([_param(3, 3)])
    with pytest.raises(ValueError, match="retraction"):
        opt.add_param_group({"params": [_param(4, 2)], "retraction": "exp"})
    with pytest.raises(ValueError, match="Iso"):
        opt.add_param_group({"params": [_param(4)]})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="fp32_matmul_prec"):
        opt.fp32_matmul_prec = "bf16"
    opt.fp32_matmul_prec = "high"  # assignable as in the reference: sets every group
    assert opt.param_groups[0]["fp32_matmul_prec"] == "high"


def test_hyperparameters_live_in_param_groups():
    """dim, eps, weight_decay_method, retraction differ per group and equal separate optimizers."""
    a, b = unit((6, 4), 0, dtype=torch.float32), unit((6, 4), 1, dtype=torch.float32)
    grads = [g.float() for g in _grads((6, 4), 3)]
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    opt = ObliqueSGD([{"params": [pa]}, {"params": [pb], "dim": 1, "weight_decay": 0.1,
                                          "weight_decay_method": "l2"}], lr=0.1)
    for g in grads:
        pa.grad, pb.grad = g, g
        opt.step()
    ra, _ = run(ObliqueSGD, a, grads, dtype=torch.float32, lr=0.1)
    rb, _ = run(ObliqueSGD, b, grads, dtype=torch.float32, lr=0.1, dim=1, weight_decay=0.1, weight_decay_method="l2")
    assert torch.equal(pa.detach(), ra) and torch.equal(pb.detach(), rb)
    sd = opt.state_dict()["param_groups"]
    assert [g["dim"] for g in sd] == [0, 1] and [g["weight_decay_method"] for g in sd] == ["decoupled", "l2"]
    assert all("eps" in g for g in sd)
    opt.weight_decay_method = "palm"  # the reference's attribute: sets every group
    assert [g["weight_decay_method"] for g in opt.param_groups] == ["palm", "palm"]

    wa, wb = torch.randn(5, 3), torch.randn(5, 3)
    qa, qb = torch.nn.Parameter(wa.clone()), torch.nn.Parameter(wb.clone())
    iso = Iso([{"params": [qa]}, {"params": [qb], "retraction": "cayley", "momentum": 0.5}], lr=0.05)
    for g in grads[:2]:
        qa.grad = qb.grad = g[:5, :3].contiguous()
        iso.step()
    ra, _ = run(Iso, wa, [g[:5, :3] for g in grads[:2]], dtype=torch.float32, lr=0.05)
    rb, _ = run(Iso, wb, [g[:5, :3] for g in grads[:2]], dtype=torch.float32, lr=0.05, retraction="cayley",
                momentum=0.5)
    assert torch.equal(qa.detach(), ra) and torch.equal(qb.detach(), rb)


@pytest.mark.parametrize("opt_cls,kw", OPTIMIZERS, ids=OPT_IDS)
def test_closure_and_zero_lr(opt_cls, kw):
    torch.manual_seed(0)
    p = torch.nn.Parameter(unit((6, 4), kw.get("dim", 0), dtype=torch.float32))
    x = torch.randn(4, 3)
    opt = opt_cls([p], **kw)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (p @ x).square().sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    # lr = 0 (e.g. from a scheduler): the parameter does not move by a single bit, the state advances
    opt.param_groups[0]["lr"] = 0.0
    before = p.detach().clone()
    for _ in range(3):
        opt.step(closure)
    assert torch.equal(p.detach(), before)


def test_iso_factors_come_from_the_weights_at_the_first_step():
    """Eagerly allocated state (zeros) is filled from W at step 0, not when the state was created."""
    p = _param(6, 4)
    opt = Iso([p], lr=0.05)
    opt._init_group(opt.param_groups[0], skip_non_grad_params=False)
    assert opt.state[p]["step"] == 0 and not opt.state[p]["sigma"].any()
    with torch.no_grad():
        p.mul_(3.0)
    s0 = torch.linalg.svdvals(p.detach().double())
    p.grad = torch.randn(6, 4)
    opt.step()
    torch.testing.assert_close(opt.state[p]["sigma"].double(), s0, rtol=1e-6, atol=0.0)


def test_reference_layout_and_registry():
    assert set(ro.__all__) >= {"ObliqueSGD", "ObliqueAdam", "Iso", "RetractionT"}
    assert registry.get_optimizer_cls("oblique_sgd") is ObliqueSGD
    assert registry.get_optimizer_cls("oblique_adam") is ObliqueAdam
    assert registry.get_optimizer_cls("iso") is Iso
    # the reference's positional order
    p = _param(4, 3)
    assert Iso([p], 0.1, 0.5, "polar").defaults == dict(lr=0.1, momentum=0.5, retraction="polar",
                                                         fp32_matmul_prec="highest", nonfinite="skip")
    assert ObliqueSGD([p], 0.1, 0.5, 0.01).defaults["weight_decay"] == 0.01
    assert ObliqueAdam([p], 0.1, (0.8, 0.9), 0.01).defaults["betas"] == (0.8, 0.9)
    # params as a generator and as groups (the reference types them as list[Parameter])
    ObliqueSGD(p for p in [p])
    ObliqueAdam([{"params": [p]}])


def test_reference_checkpoint_without_group_options_loads():
    """The reference keeps weight_decay_method / fp32_matmul_prec on self: its state dicts lack them."""
    p = torch.nn.Parameter(unit((5, 3), 0, dtype=torch.float32))
    opt = ObliqueAdam([p], lr=0.01, weight_decay_method="l2")
    p.grad = torch.randn(5, 3)
    opt.step()
    sd = opt.state_dict()
    del sd["param_groups"][0]["weight_decay_method"]
    opt2 = ObliqueAdam([p], lr=0.01, weight_decay_method="l2")
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["weight_decay_method"] == "l2" and opt2.state[p]["step"] == 1
