"""Shampoo, MOSO and the inverse-root utilities (emerging_optimizers.shampoo, legacy_soap.moso,
legacy_soap.matrix_root_inverse_utils).

Both optimizers against plain float64 references written here over several steps and hyperparameters; the
reductions (Shampoo before preconditioning starts is exactly its grafted method: Adam, RMSProp, AdaGrad, SGD);
blocking equal to per-block Shampoo; MOSO's second moment following a re-sorted eigenbasis; inverse roots of
known SPD matrices (eigh exact in float64, Newton and CANS within their documented tolerances); bit-identical
resume, bf16 with float32 state, no host synchronization, early validation naming the argument.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import emerging_optimizers as eo
from emerging_optimizers.legacy_soap import matrix_root_inverse_utils as mri
from emerging_optimizers.legacy_soap.moso import MOSO, calculate_moso_update, update_one_sided_eigenbasis
from emerging_optimizers.shampoo import Shampoo, ShampooPreconditioner, TensorPair, shampoo_base
from emerging_optimizers.shampoo import shampoo as shampoo_mod
from emerging_optimizers.utils import MatrixShapeError, fp32_matmul_precision

#: float64 optimizer vs float64 reference: only the order of rounding differs.
TOL_F64 = dict(rtol=1e-9, atol=1e-11)


def _spd(n: int, cond: float, gen: torch.Generator, batch: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    """A random SPD matrix with eigenvalues log-spaced in [1/cond, 1], its eigenvectors and eigenvalues."""
    U = torch.linalg.qr(torch.randn(*batch, n, n, generator=gen, dtype=torch.float64)).Q
    w = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64).expand(*batch, n)
    return (U * w.unsqueeze(-2)) @ U.mT, U, w


def _known_root(U: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    return (U * w.pow(-1.0 / p).unsqueeze(-2)) @ U.mT


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ============================================================================================== inverse roots
@pytest.mark.parametrize("p", [2, 4, 3.5])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_inverse_root_eigh_matches_the_known_root_in_float64(p, batch):
    """Tolerance from perturbation theory, not from one machine: building A and decomposing it perturb A by
    ~n*eps*||A|| (||A|| = 1), and A^(-1/p) amplifies a relative perturbation of A by at most cond(A)/p, so
    ||out - ref|| / ||ref|| <= 1e6 * 12 * 2.2e-16 / p ~ 1.3e-9 (measured 1e-11 to 4e-11 on two CPUs). Entry by
    entry the error is relative to the largest entries (~1e3 for p = 2); an elementwise rtol of 1e-9 on small
    entries failed on an Intel AVX-512 CPU (2.7e-8 relative on one entry) while the root was correct."""
    A, U, w = _spd(12, 1e6, torch.Generator().manual_seed(0), batch)
    out, ref = mri.inverse_root(A, p, epsilon=0.0), _known_root(U, w, p)
    assert _rel_err(out, ref) <= 1.3e-9
    torch.testing.assert_close(out, ref, rtol=0, atol=1.3e-9 * ref.abs().max().item())


def test_inverse_root_regularisation_is_absolute_plus_relative_to_the_largest_eigenvalue():
    A, U, w = _spd(6, 1e3, torch.Generator().manual_seed(1))
    A, w = 5.0 * A, 5.0 * w  # largest eigenvalue 5
    out = mri.inverse_root(A, 4, epsilon=1e-3, relative_epsilon=1e-2)
    torch.testing.assert_close(out, _known_root(U, w + 1e-3 + 5e-2, 4), rtol=1e-10, atol=1e-12)
    # singular input: the floor makes it finite; negative rounding noise counts as 0
    P = torch.zeros(4, 4, dtype=torch.float64)
    P[0, 0] = -1e-18
    torch.testing.assert_close(mri.inverse_root(P, 2, epsilon=1e-4), torch.eye(4, dtype=torch.float64) * 100.0)


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("cond", [1e2, 1e6, 1e10])
def test_inverse_root_newton_matches_in_float64_within_documented_tolerance(p, cond):
    A, U, w = _spd(32, cond, torch.Generator().manual_seed(2))
    out = mri.inverse_root(A, p, method="newton", epsilon=0.0)
    assert _rel_err(out, _known_root(U, w, p)) < 1e-6


def test_inverse_root_float32_paths_are_close_to_the_float64_root():
    A, U, w = _spd(32, 1e4, torch.Generator().manual_seed(3), (2,))
    ref = _known_root(U, w, 4)
    for method in ("eigh", "newton"):
        out = mri.inverse_root(A.float(), 4, method=method, epsilon=0.0)
        assert out.dtype == torch.float32 and out.shape == A.shape
        assert _rel_err(out, ref) < 2e-4, method


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="svd"), "method"), (dict(p=0), "p"), (dict(p=True), "p"), (dict(epsilon=-1.0), "epsilon"),
    (dict(relative_epsilon=float("nan")), "relative_epsilon"), (dict(method="newton", p=2.5), "p"),
    (dict(method="newton", newton_iters=0), "newton_iters"),
])
def test_inverse_root_rejects_bad_arguments(kwargs, match):
    kwargs = {"p": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        mri.inverse_root(torch.eye(3), **kwargs)
    with pytest.raises(ValueError, match="square"):
        mri.inverse_root(torch.ones(3, 4), 4)


def test_inv_root_via_eigh_floors_the_eigenvalues():
    A, U, w = _spd(8, 1e3, torch.Generator().manual_seed(4))
    torch.testing.assert_close(mri.inv_root_via_eigh(A), _known_root(U, w, 2), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mri.inv_root_via_eigh(torch.zeros(3, 3, dtype=torch.float64), eps=1e-6),
                               torch.eye(3, dtype=torch.float64) * 1e3)


@pytest.mark.parametrize("cond,tol", [(10.0, 1e-4), (1e3, 1e-4), (1e4, 1e-4), (1e5, 1e-3)])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_cans_inverse_square_root_within_documented_tolerance(cond, tol, batch):
    A, U, w = _spd(24, cond, torch.Generator().manual_seed(5), batch)
    A = A * torch.arange(1, 4, dtype=torch.float64)[: (batch[0] if batch else 1)].view(-1, 1, 1).squeeze(0)
    ref = mri.inverse_root(A, 2, epsilon=0.0)
    out = mri.mat_root_inv_via_scaled_cans(A.float())
    assert out.dtype == torch.float32 and out.shape == A.shape
    torch.testing.assert_close(out, out.mT)
    assert _rel_err(out, ref) < tol
    whitened = out.double() @ A @ out.double()
    torch.testing.assert_close(whitened, torch.eye(24, dtype=torch.float64).expand_as(A), atol=3e-4, rtol=0)


def test_cans_coefficients_are_the_derived_chebyshev_cubics():
    coeffs = mri._CANS_COEFFICIENTS
    assert len(coeffs) == 10
    # every cubic maps its interval [a, b] into [1 - d, 1 + d], and the next starts there
    a, b = 8.5e-4, 1.0
    for beta, alpha in coeffs[:-1]:
        q = lambda s, beta=beta, alpha=alpha: beta * s + alpha * 1.01 * s**3  # noqa: E731 (undo the safety fold)
        peak = math.sqrt((a * a + a * b + b * b) / 3)
        lo, hi = q(a), q(peak)
        assert q(b) == pytest.approx(lo, rel=1e-12) and lo + hi == pytest.approx(2.0, rel=1e-12)
        a, b = lo, hi
    assert 1 - a < 5e-3  # the Chebyshev steps leave the spectrum within 0.5 % of 1 ...
    beta, alpha = coeffs[-1]
    for s in (a, b):  # ... and the final Newton-Schulz step (safety folds undone) polishes it to 5e-5
        assert abs(math.sqrt(1.01) * (beta * s + alpha * 1.01 * s**3) - 1) < 5e-5
    assert coeffs[-1] == pytest.approx((1.5 / math.sqrt(1.01), -0.5 / 1.01**1.5), rel=1e-15)


def test_cans_rejects_bad_input():
    with pytest.raises(TypeError, match="must be in float32"):
        mri.mat_root_inv_via_scaled_cans(torch.eye(4, dtype=torch.bfloat16))
    for bad in (torch.ones(3, 4), torch.ones(4), torch.ones(2, 2, 3, 3)):
        with pytest.raises(TypeError, match="square"):
            mri.mat_root_inv_via_scaled_cans(bad)
        with pytest.raises(ValueError, match="square"):
            mri.mat_root_inv_via_scaled_cans(bad)
    before = torch.get_float32_matmul_precision()
    with fp32_matmul_precision("medium"), pytest.raises(RuntimeError, match="`medium`.*insufficient for CANS"):
        mri.mat_root_inv_via_scaled_cans(torch.eye(4))
    assert torch.get_float32_matmul_precision() == before


def test_root_functions_need_no_host_synchronization():
    """On the meta device any .item() or bool(tensor) raises."""
    x = torch.empty(2, 5, 5, device="meta")
    assert mri.mat_root_inv_via_scaled_cans(x).shape == (2, 5, 5)
    for method in ("eigh", "newton"):
        assert mri.inverse_root(x, 4, method=method, relative_epsilon=1e-6).shape == (2, 5, 5)


# ============================================================================================== MOSO
def _decay(W, g, method, lr, wd):
    if method == "l2":
        return W, g + wd * W
    f = {"decoupled": lr * wd, "independent": wd, "palm": lr * lr * wd}[method]
    return W * (1 - f), g


def _ref_moso(p0, grads, *, lr, momentum, rms_beta, shampoo_beta, eps, weight_decay, max_update_rms,
              weight_decay_method, power_iter_steps, use_eigh):
    """MOSO in float64, written on X = M (rows <= cols) or M^T, so both sides are one code path."""
    W = p0.clone().double()
    mat = (W.shape[0], W.numel() // W.shape[0])
    left = mat[0] <= mat[1]
    k = min(mat)
    M = torch.zeros(mat, dtype=torch.float64)
    Vx = torch.zeros((k, max(mat)) if left else (k, mat[0]), dtype=torch.float64)
    C = torch.zeros(k, k, dtype=torch.float64)
    Q = torch.eye(k, dtype=torch.float64)
    perms = []
    for t, g in enumerate(grads, 1):
        W, g = _decay(W, g.double(), weight_decay_method, lr, weight_decay)
        M = momentum * M + (1 - momentum) * g.reshape(mat)
        b = 1 - (1 - shampoo_beta) / (1 - shampoo_beta**t)
        X = M if left else M.T
        C = b * C + (1 - b) * X @ X.T
        if t == 1 or use_eigh:
            Q = torch.linalg.eigh(C).eigenvectors.flip(-1)
        else:
            for _ in range(power_iter_steps):
                Q = torch.linalg.qr(C @ Q).Q
            order = torch.argsort(torch.diagonal(Q.T @ C @ Q), descending=True, stable=True)
            Q, Vx = Q[:, order], Vx[order]
            perms.append(order)
        P = Q.T @ X
        Vx = rms_beta * Vx + (1 - rms_beta) * P * P
        U = Q @ (P / (Vx.sqrt() + eps))
        U = U if left else U.T
        if max_update_rms > 0:
            U = U * min(1.0, max_update_rms / (U.square().mean().sqrt().item() + 1e-7))
        W = W - lr * U.reshape(W.shape)
    return W, M, C, Q, (Vx if left else Vx.T), perms


MOSO_HP = dict(lr=0.05, momentum=0.9, rms_beta=0.95, shampoo_beta=0.9, eps=1e-8, weight_decay=0.01,
               max_update_rms=0.0, weight_decay_method="decoupled", power_iter_steps=1, use_eigh=False)
MOSO_CASES = [
    ((5, 8), {}),
    ((8, 5), dict(weight_decay_method="l2", weight_decay=0.1, max_update_rms=0.02)),
    ((4, 3, 2), dict(power_iter_steps=3, weight_decay_method="palm", weight_decay=1.0, rms_beta=0.5)),
    ((6, 6), dict(use_eigh=True, momentum=0.0, shampoo_beta=0.0, weight_decay_method="independent")),
    ((3, 7), dict(power_iter_steps=0, eps=1e-3)),
]


def _align_signs(Q: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Eigenvectors are defined up to sign (and the update does not depend on it)."""
    return Q * torch.sign((Q * ref).sum(0, keepdim=True))


@pytest.mark.parametrize("shape,overrides", MOSO_CASES, ids=[str(s) for s, _ in MOSO_CASES])
def test_moso_matches_float64_reference(shape, overrides):
    hp = {**MOSO_HP, **overrides}
    gen = torch.Generator().manual_seed(7)
    p0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + k) for k in range(6)]
    p = torch.nn.Parameter(p0.clone())
    opt = MOSO([p], **hp)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    W, M, C, Q, V, _ = _ref_moso(p0, grads, **hp)
    st = opt.state[p]
    assert st["step"] == len(grads)
    torch.testing.assert_close(p.detach(), W, **TOL_F64)
    torch.testing.assert_close(st["momentum_buffer"].reshape(M.shape), M, **TOL_F64)
    torch.testing.assert_close(st["M"], C, **TOL_F64)
    torch.testing.assert_close(_align_signs(st["Q_M"], Q), Q, **TOL_F64)
    torch.testing.assert_close(st["exp_avg_sq"].reshape(V.shape), V, **TOL_F64)


@pytest.mark.parametrize("left", [True, False])
def test_moso_second_moment_follows_a_reordered_eigenbasis(left):
    """The reference's defect: exp_avg_sq stayed in the old order when the QR path re-sorted the basis."""
    g1 = torch.zeros(2, 6, dtype=torch.float64)
    g1[0, 0], g1[1, 1] = 3.0, 1.0  # step 1: direction e0 strongest
    g2 = torch.zeros(2, 6, dtype=torch.float64)
    g2[0, 2], g2[1, 3] = 1.0, 2.0  # step 2: e1 strongest, so the sorted basis swaps its columns
    grads = [g1, g2] if left else [g1.T.contiguous(), g2.T.contiguous()]
    hp = {**MOSO_HP, "momentum": 0.0, "shampoo_beta": 0.0, "rms_beta": 0.5, "weight_decay": 0.0}
    p = torch.nn.Parameter(torch.zeros_like(grads[0]))
    opt = MOSO([p], **hp)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    *_, Q, V, perms = _ref_moso(torch.zeros_like(grads[0]), grads, **hp)
    assert perms[0].tolist() == [1, 0]  # the scenario does reorder
    st = opt.state[p]
    torch.testing.assert_close(_align_signs(st["Q_M"], Q).abs(), torch.tensor([[0.0, 1], [1, 0]], dtype=torch.float64))
    # by hand: step 1 leaves rows [4.5 at e0-col 0] and [0.5 at col 1]; after the swap row 0 belongs to e1
    expected = torch.zeros(2, 6, dtype=torch.float64)
    expected[0, 1], expected[0, 3] = 0.25, 2.0
    expected[1, 0], expected[1, 2] = 2.25, 0.5
    torch.testing.assert_close(st["exp_avg_sq"], expected if left else expected.T)
    torch.testing.assert_close(st["exp_avg_sq"], V)


def test_update_one_sided_eigenbasis_permutes_the_right_axis():
    factor = torch.diag(torch.tensor([1.0, 5.0, 3.0]))
    rows = torch.arange(12.0).reshape(3, 4)
    for left, moment in ((True, rows.clone()), (False, rows.T.clone())):
        basis = torch.eye(3)
        update_one_sided_eigenbasis(factor, basis, moment, left=left, use_eigh=False, power_iter_steps=1)
        assert basis.abs().argmax(0).tolist() == [1, 2, 0]
        torch.testing.assert_close(moment, rows[[1, 2, 0]] if left else rows[[1, 2, 0]].T)
    # eigh: no correspondence to the old basis, the moment is left alone
    moment = rows.clone()
    update_one_sided_eigenbasis(factor, torch.eye(3), moment, left=True, use_eigh=True, power_iter_steps=1)
    assert torch.equal(moment, rows)


def test_moso_without_emas_is_sign_descent_in_the_eigenbasis():
    """momentum = rms_beta = shampoo_beta = 0: U = Q sign(Q^T G) (up to eps), the reference's own check."""
    gen = torch.Generator().manual_seed(8)
    for shape in ((4, 8), (8, 4)):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        p.grad = g.clone()
        opt = MOSO([p], lr=0.125, momentum=0.0, rms_beta=0.0, shampoo_beta=0.0, eps=1e-12, weight_decay=0.0)
        opt.step()
        Q = opt.state[p]["Q_M"]
        U = Q @ torch.sign(Q.T @ g) if shape[0] <= shape[1] else torch.sign(g @ Q) @ Q.T
        torch.testing.assert_close(-p.detach() / 0.125, U, rtol=1e-9, atol=1e-9)
        k = min(shape)
        assert opt.state[p]["M"].shape == (k, k)
        torch.testing.assert_close(opt.state[p]["M"], g @ g.T if shape[0] <= shape[1] else g.T @ g)


def test_moso_rejects_non_matrices_early_and_bad_hyperparameters():
    with pytest.raises(MatrixShapeError, match="MOSO"):
        MOSO([torch.nn.Parameter(torch.zeros(3))])
    assert issubclass(MatrixShapeError, TypeError) and issubclass(MatrixShapeError, ValueError)
    with pytest.raises(TypeError):
        MOSO([torch.nn.Parameter(torch.zeros(3, 3))], betas=(0.9, 0.95))


@pytest.mark.parametrize("name,value", [
    ("lr", -1.0), ("momentum", 1.0), ("rms_beta", -0.1), ("shampoo_beta", 1.0), ("eps", -1e-8),
    ("weight_decay", float("inf")), ("max_update_rms", -1.0), ("weight_decay_method", "foo"),
    ("power_iter_steps", -1), ("power_iter_steps", 1.5), ("use_eigh", 1),
])
def test_moso_bad_hyperparameters_raise_naming_the_argument(name, value):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=name):
        MOSO([p], **{name: value})
    opt = MOSO([p])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 3))], name: value})
    assert len(opt.param_groups) == 1


def test_moso_attributes_of_the_reference_are_group_defaults():
    p, q = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 3))
    opt = MOSO([{"params": [p]}, {"params": [q], "max_update_rms": 0.5}], max_update_rms=0.1)
    assert opt.max_update_rms == 0.1 and opt.weight_decay_method == "decoupled"
    assert [g["max_update_rms"] for g in opt.param_groups] == [0.1, 0.5]
    opt.max_update_rms = 0.3
    assert [g["max_update_rms"] for g in opt.param_groups] == [0.3, 0.3]


def test_moso_update_needs_no_host_synchronization():
    shape = (3, 5)
    meta = dict(device="meta")
    u = calculate_moso_update(torch.zeros(shape, **meta), torch.zeros(shape, **meta), torch.zeros(3, 3, **meta),
                              torch.eye(3, **meta), torch.zeros(shape, **meta), momentum=0.9, rms_beta=0.9,
                              shampoo_beta=0.9, eps=1e-8, use_eigh=False, max_update_rms=1.0)
    assert u.shape == shape


# ============================================================================================== Shampoo
def _ref_blocks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _ref_root(X: torch.Tensor, p: float, eps: float, rel: float) -> torch.Tensor:
    w, V = torch.linalg.eigh(X)
    w = w.clamp_min(0)
    return V @ torch.diag((w + eps + rel * w.max()) ** (-1.0 / p)) @ V.T


def _ref_shampoo(p0, grads, *, lr, betas, shampoo_beta, eps, weight_decay, momentum, nesterov, grafting,
                 precondition_frequency, start_preconditioning_step, max_preconditioner_dim, use_blocking,
                 root_eps, root_relative_eps, inv_root_override, weight_decay_method, root_method="eigh"):
    """Shampoo in float64 with Python loops over explicit blocks."""
    W = p0.clone().double()
    b1, b2 = betas
    start = start_preconditioning_step or precondition_frequency
    root = inv_root_override or 4
    mat = (W.shape[0], W.numel() // W.shape[0]) if W.dim() >= 2 else None
    covered = mat is not None and (use_blocking or max(mat) <= max_preconditioner_dim)
    size = max_preconditioner_dim if use_blocking else max(mat or (1,))
    blocks = [(r, c) for r in _ref_blocks(mat[0], size) for c in _ref_blocks(mat[1], size)] if covered else []
    Ls = [torch.zeros(r.stop - r.start, r.stop - r.start, dtype=torch.float64) for r, _ in blocks]
    Rs = [torch.zeros(c.stop - c.start, c.stop - c.start, dtype=torch.float64) for _, c in blocks]
    Lr = [torch.eye(L.shape[0], dtype=torch.float64) for L in Ls]
    Rr = [torch.eye(R.shape[0], dtype=torch.float64) for R in Rs]
    m = torch.zeros_like(W)
    v = torch.zeros_like(W)
    buf = torch.zeros_like(W)
    last = 0
    for t, g in enumerate(grads, 1):
        W, g = _decay(W, g.double(), weight_decay_method, lr, weight_decay)
        m = b1 * m + (1 - b1) * g
        mh = m / (1 - b1**t)
        if grafting == "adam":
            v = b2 * v + (1 - b2) * g * g
            A = mh / ((v / (1 - b2**t)).sqrt() + eps)
        elif grafting == "rmsprop":
            v = b2 * v + (1 - b2) * g * g
            A = mh / (v.sqrt() + eps)
        elif grafting == "adagrad":
            v = v + g * g
            A = mh / (v.sqrt() + eps)
        else:
            A = mh
        D = A
        if covered:
            bt = 1.0 if shampoo_beta == 1 else 1 - (1 - shampoo_beta) / (1 - shampoo_beta**t)
            G2, M2, A2 = g.reshape(mat), mh.reshape(mat), A.reshape(mat)
            for k, (r, c) in enumerate(blocks):
                Gb = G2[r, c]
                if shampoo_beta == 1:
                    Ls[k], Rs[k] = Ls[k] + Gb @ Gb.T, Rs[k] + Gb.T @ Gb
                else:
                    Ls[k] = bt * Ls[k] + (1 - bt) * Gb @ Gb.T
                    Rs[k] = bt * Rs[k] + (1 - bt) * Gb.T @ Gb
            if t >= start:
                if last == 0 or t - last >= precondition_frequency:
                    Lr = [_ref_root(L, root, root_eps, root_relative_eps) for L in Ls]
                    Rr = [_ref_root(R, root, root_eps, root_relative_eps) for R in Rs]
                    last = t
                D2 = torch.zeros(mat, dtype=torch.float64)
                for k, (r, c) in enumerate(blocks):
                    S = Lr[k] @ M2[r, c] @ Rr[k]
                    if grafting != "none":
                        S = S * (A2[r, c].norm() / (S.norm() + 1e-16))
                    D2[r, c] = S
                D = D2.reshape(W.shape)
        if momentum:
            buf = momentum * buf + (1 - momentum) * D
            D = (1 - momentum) * D + momentum * buf if nesterov else buf
        W = W - lr * D
    return W, m, v, Ls, Rs, Lr, Rr


SH_HP = dict(lr=0.02, betas=(0.9, 0.99), shampoo_beta=0.9, eps=1e-8, weight_decay=0.01, momentum=0.0,
             nesterov=False, grafting="adam", precondition_frequency=1, start_preconditioning_step=None,
             max_preconditioner_dim=1024, use_blocking=True, root_eps=1e-12, root_relative_eps=1e-6,
             inv_root_override=0, weight_decay_method="decoupled")
SH_CASES = [
    ((6, 4), {}),
    ((5, 7), dict(grafting="rmsprop", momentum=0.9, nesterov=True, weight_decay_method="l2", weight_decay=0.1)),
    ((3, 2, 4), dict(grafting="adagrad", precondition_frequency=2, start_preconditioning_step=3, betas=(0.0, 0.9))),
    ((10, 7), dict(max_preconditioner_dim=4, grafting="none", lr=0.002, shampoo_beta=1.0, momentum=0.5)),
    ((9, 3), dict(max_preconditioner_dim=4, use_blocking=False, weight_decay_method="palm", weight_decay=1.0)),
    ((5,), dict(grafting="rmsprop", momentum=0.8)),
    ((4, 4), dict(inv_root_override=2, precondition_frequency=3, root_relative_eps=0.0, root_eps=1e-6,
                  weight_decay_method="independent")),
]


@pytest.mark.parametrize("shape,overrides", SH_CASES, ids=[f"{s}-{'-'.join(o)}" for s, o in SH_CASES])
def test_shampoo_matches_float64_reference(shape, overrides):
    hp = {**SH_HP, **overrides}
    gen = torch.Generator().manual_seed(11)
    p0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0 ** (k % 3) for k in range(7)]
    p = torch.nn.Parameter(p0.clone())
    opt = Shampoo([p], **hp)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    W, m, v, Ls, Rs, Lr, Rr = _ref_shampoo(p0, grads, **hp)
    st = opt.state[p]
    torch.testing.assert_close(p.detach(), W, **TOL_F64)
    torch.testing.assert_close(st["exp_avg"], m, **TOL_F64)
    key = {"adam": "exp_avg_sq", "rmsprop": "exp_avg_sq", "adagrad": "sum"}.get(hp["grafting"])
    if key:
        torch.testing.assert_close(st[key], v, **TOL_F64)
    assert sum(k.startswith("L_inv_root_") for k in st) == len(Ls)
    for i in range(len(Ls)):
        torch.testing.assert_close(st[f"L_{i}"], Ls[i], **TOL_F64)
        torch.testing.assert_close(st[f"R_{i}"], Rs[i], **TOL_F64)
        torch.testing.assert_close(st[f"L_inv_root_{i}"], Lr[i], rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(st[f"R_inv_root_{i}"], Rr[i], rtol=1e-8, atol=1e-8)


def test_shampoo_newton_roots_match_eigh_roots():
    gen = torch.Generator().manual_seed(12)
    shape = (6, 5)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(5)]
    out = {}
    for method in ("eigh", "newton"):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
        # relative_eps 0: Newton bounds lambda_max by the Frobenius norm, so its relative floor would differ
        opt = Shampoo([p], precondition_frequency=2, root_method=method, root_relative_eps=0.0, root_eps=1e-6)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[method] = p.detach().clone()
    torch.testing.assert_close(out["newton"], out["eigh"], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------- reductions
def _reduction_params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(13)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in ((6, 5), (4, 3, 2), (7,))]


def _run_pair(opt_a_fn, opt_b_fn, steps=5, exact=True):
    gen = torch.Generator().manual_seed(14)
    init = _reduction_params()
    pa = [torch.nn.Parameter(x.clone()) for x in init]
    pb = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a, opt_b = opt_a_fn(pa), opt_b_fn(pb)
    for _ in range(steps):
        for a, b in zip(pa, pb):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for a, b in zip(pa, pb):
        if exact:
            assert torch.equal(a, b), (a - b).abs().max()
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    return opt_a


@pytest.mark.parametrize("kw", [dict(), dict(betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
                                dict(weight_decay_method="l2", weight_decay=0.05)])
def test_before_preconditioning_shampoo_is_adam(kw):
    opt = _run_pair(lambda ps: Shampoo(ps, lr=0.01, start_preconditioning_step=100, **kw),
                    lambda ps: eo.AdamW(ps, lr=0.01, fused=False, **kw))
    # the factors were accumulated all along, ready for the first preconditioned step
    assert all(st["inv_root_step"] == 0 for st in opt.state.values())
    assert any(st["L_0"].abs().sum() > 0 for st in opt.state.values() if "L_0" in st)


def test_before_preconditioning_shampoo_is_rmsprop_adagrad_and_sgd():
    _run_pair(lambda ps: Shampoo(ps, lr=0.01, betas=(0.0, 0.9), eps=1e-6, weight_decay=0.0, grafting="rmsprop",
                                 start_preconditioning_step=100),
              lambda ps: eo.RMSProp(ps, lr=0.01, alpha=0.9, eps=1e-6, fused=False))
    _run_pair(lambda ps: Shampoo(ps, lr=0.1, betas=(0.0, 0.9), eps=1e-10, weight_decay=0.0, grafting="adagrad",
                                 start_preconditioning_step=100),
              lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=1e-10), exact=False)  # torch fuses lr into addcdiv
    _run_pair(lambda ps: Shampoo(ps, lr=0.1, betas=(0.0, 0.9), weight_decay=0.0, grafting="none",
                                 start_preconditioning_step=100),
              lambda ps: torch.optim.SGD(ps, lr=0.1))


def test_oversized_dims_without_blocking_take_the_grafted_step():
    """max_preconditioner_dim=5 without blocking: (6, 5), (4, 3, 2) -> (4, 6) and (7,) all exceed it or are 1-D."""
    opt = _run_pair(lambda ps: Shampoo(ps, lr=0.01, max_preconditioner_dim=5, use_blocking=False,
                                       precondition_frequency=1),
                    lambda ps: eo.AdamW(ps, lr=0.01, fused=False))
    assert not any(k.startswith("L_") for st in opt.state.values() for k in st)


def test_blocking_equals_shampoo_on_each_block():
    gen = torch.Generator().manual_seed(15)
    W0 = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    hp = dict(lr=0.02, precondition_frequency=2, momentum=0.5, weight_decay=0.1)
    W = torch.nn.Parameter(W0.clone())
    opt = Shampoo([W], max_preconditioner_dim=4, **hp)
    rows, cols = _ref_blocks(9, 4), _ref_blocks(6, 4)
    parts = {(i, j): torch.nn.Parameter(W0[r, c].clone()) for i, r in enumerate(rows) for j, c in enumerate(cols)}
    opt_parts = Shampoo(list(parts.values()), max_preconditioner_dim=4, **hp)
    assert len(parts) == 6
    for _ in range(5):
        g = torch.randn(9, 6, generator=gen, dtype=torch.float64)
        W.grad = g.clone()
        for (i, j), q in parts.items():
            q.grad = g[rows[i], cols[j]].clone()
        opt.step()
        opt_parts.step()
    for (i, j), q in parts.items():
        torch.testing.assert_close(W.detach()[rows[i], cols[j]], q.detach(), rtol=1e-12, atol=1e-14)


def test_grafted_norm_per_block_and_refresh_schedule():
    gen = torch.Generator().manual_seed(16)
    p = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.float64))
    opt = Shampoo([p], lr=1.0, weight_decay=0.0, max_preconditioner_dim=4, precondition_frequency=3,
                  start_preconditioning_step=2)
    refreshed = []
    for t in range(1, 9):
        before = p.detach().clone()
        roots = opt.state[p].get("L_inv_root_0", torch.eye(4)).clone()
        g = torch.randn(8, 8, generator=gen, dtype=torch.float64)
        adam_state = copy.deepcopy({k: v for k, v in opt.state[p].items() if k in ("exp_avg", "exp_avg_sq")})
        p.grad = g
        opt.step()
        step = before - p.detach()
        if not torch.equal(roots, opt.state[p]["L_inv_root_0"]):
            refreshed.append(t)
        # the grafted Adam step on the same state, block by block norms
        ea = adam_state.get("exp_avg", torch.zeros_like(g)).clone()
        es = adam_state.get("exp_avg_sq", torch.zeros_like(g)).clone()
        ea.lerp_(g, 0.1)
        es.lerp_(g * g, 0.001)
        adam = (ea / (1 - 0.9**t)) / ((es / (1 - 0.999**t)).sqrt() + 1e-8)
        for r in (slice(0, 4), slice(4, 8)):
            for c in (slice(0, 4), slice(4, 8)):
                assert step[r, c].norm().item() == pytest.approx(adam[r, c].norm().item(), rel=1e-10)
        if t < 2:
            torch.testing.assert_close(step, adam, rtol=1e-12, atol=0)
    assert refreshed == [2, 5, 8]
    assert opt.state[p]["inv_root_step"] == 8


def test_failed_root_keeps_the_previous_one(monkeypatch, caplog):
    p = torch.nn.Parameter(torch.zeros(3, 4))
    opt = Shampoo([p], precondition_frequency=1)
    p.grad = torch.randn(3, 4)
    opt.step()
    good = opt.state[p]["L_inv_root_0"].clone()

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("no convergence")

    monkeypatch.setattr(shampoo_mod, "inverse_root", fail)
    p.grad = torch.randn(3, 4)
    opt.step()
    assert torch.equal(opt.state[p]["L_inv_root_0"], good)
    assert torch.isfinite(p).all() and "keeping the previous one" in caplog.text


# ---------------------------------------------------------------------------------------------- contract points
def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _batch(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=gen)
    return x.to(dtype), torch.tanh(x @ torch.randn(6, 3, generator=gen)).to(dtype)


def _train(model, opt, steps, dtype=torch.float32):
    x, y = _batch(dtype)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _matrices(model):
    return [p for p in model.parameters() if p.dim() >= 2]


BUILDERS = {
    "shampoo": lambda params, **kw: Shampoo(params, **{"lr": 0.02, "precondition_frequency": 3,
                                                       "start_preconditioning_step": 2, "momentum": 0.5, **kw}),
    "moso": lambda params, **kw: MOSO(params, **{"lr": 0.02, **kw}),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_resume_is_bit_identical(name):
    model = _model()
    params = (lambda m: _matrices(m)) if name == "moso" else (lambda m: list(m.parameters()))
    opt = BUILDERS[name](params(model))
    _train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 5)  # crosses root refreshes (steps 5 and 8)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = BUILDERS[name](params(resumed), lr=0.5)  # hyperparameters come back from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, 5)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["param_groups"] == opt2.state_dict()["param_groups"]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_bf16_params_keep_float32_state_through_a_checkpoint(name):
    model = _model(torch.bfloat16)
    params = _matrices(model) if name == "moso" else list(model.parameters())
    opt = BUILDERS[name](params)
    losses = _train(model, opt, 20, dtype=torch.bfloat16)
    assert losses[-1] < 0.7 * losses[0], losses[::5]
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    opt2 = BUILDERS[name](params)
    opt2.load_state_dict(opt.state_dict())
    assert all(v.dtype == torch.float32 for s in opt2.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def test_shampoo_closure_and_l2_leaves_grad_untouched():
    model = _model()
    opt = Shampoo(model.parameters(), lr=0.02, weight_decay=0.1, weight_decay_method="l2", precondition_frequency=1)
    x, y = _batch()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    second = opt.step(closure)
    assert second.item() < first.item()
    p = torch.nn.Parameter(torch.randn(3, 4))
    g = torch.randn(3, 4)
    p.grad = g.clone()
    Shampoo([p], weight_decay=0.1, weight_decay_method="l2", precondition_frequency=1).step()
    assert torch.equal(p.grad, g)


def test_momentum_switched_on_and_off_keeps_the_state_consistent():
    model = _model()
    opt = Shampoo(model.parameters(), lr=0.02, precondition_frequency=2)
    _train(model, opt, 2)
    assert not any("momentum_buffer" in s for s in opt.state.values())
    opt.param_groups[0]["momentum"] = 0.9
    _train(model, opt, 2)
    assert all("momentum_buffer" in s for s in opt.state.values())
    opt2 = Shampoo(model.parameters())
    opt2.load_state_dict(opt.state_dict())  # the layout follows the group's momentum
    opt.param_groups[0]["momentum"] = 0.0
    _train(model, opt, 1)
    assert not any("momentum_buffer" in s for s in opt.state.values())


def test_shampoo_step_needs_no_host_synchronization():
    """Every step, root refreshes included, runs on the meta device, where .item() or bool(tensor) raises."""
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in ((6, 5), (3, 2, 2), (4,))]
    for kw in (dict(), dict(root_method="newton", momentum=0.9, nesterov=True, max_preconditioner_dim=4)):
        opt = Shampoo(params, precondition_frequency=2, start_preconditioning_step=1, **kw)
        for _ in range(3):
            for p in params:
                p.grad = torch.empty_like(p)
            opt.step()
        assert all(s["step"] == 3 for s in opt.state.values())
    moso_params = params[:2]
    opt = MOSO(moso_params)
    for _ in range(2):
        for p in moso_params:
            p.grad = torch.empty_like(p)
        opt.step()


@pytest.mark.parametrize("name,value", [
    ("lr", -1.0), ("betas", (0.9,)), ("betas", (0.9, 1.0)), ("shampoo_beta", 1.5), ("shampoo_beta", -0.1),
    ("eps", -1.0), ("weight_decay", -0.1), ("momentum", 1.0), ("nesterov", "yes"), ("grafting", "sgd"),
    ("precondition_frequency", 0), ("precondition_frequency", 2.0), ("start_preconditioning_step", 0),
    ("max_preconditioner_dim", 0), ("use_blocking", None), ("root_method", "svd"), ("root_eps", -1e-12),
    ("root_relative_eps", float("nan")), ("inv_root_override", -1), ("inv_root_override", 0.5),
    ("weight_decay_method", "foo"),
])
def test_shampoo_bad_hyperparameters_raise_naming_the_argument(name, value):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=name):
        Shampoo([p], **{name: value})
    opt = Shampoo([p])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], name: value})
    assert len(opt.param_groups) == 1


def test_shampoo_preconditioner_implements_the_protocol():
    members = [m for m in dir(shampoo_base.ShampooPreconditionerProtocol) if not m.startswith("_")]
    assert {"init_state", "init_step", "update_kronecker_factors", "step", "rebind_state", "precondition"} <= set(
        members)
    assert all(callable(getattr(ShampooPreconditioner, m)) for m in members)
    state = ShampooPreconditioner.init_state((3, 2), torch.device("cpu"), block=1)
    assert sorted(state) == ["L_1", "L_inv_root_1", "R_1", "R_inv_root_1"]
    pre = ShampooPreconditioner(state, block=1, root=4, epsilon=1e-12, relative_epsilon=0.0)
    gen = torch.Generator().manual_seed(17)
    g = torch.randn(3, 2, generator=gen)
    pre.init_step(g, 0.0)
    pre.update_inverse_roots()
    pre.rebind_state(state)
    L, R = TensorPair(state["L_1"], state["R_1"])
    torch.testing.assert_close(L, g @ g.T)
    torch.testing.assert_close(R, g.T @ g)
    # one gradient, p = 4: (G G^T)^{-1/4} G (G^T G)^{-1/4} = U V^T, the polar factor (Muon's direction)
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    torch.testing.assert_close(pre.precondition(g), U @ Vh, rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match="block layout"):
        ShampooPreconditioner(state, block=0)


def test_registry_and_muon_adamw_matrix_side():
    assert eo.get_optimizer_cls("shampoo") is Shampoo
    assert eo.get_optimizer_cls("moso") is MOSO
    for name in ("shampoo", "moso"):
        model = _model()
        opt = eo.MuonAdamW(model.named_parameters(), matrix_optimizer=name, lr=0.02)
        losses = _train(model, opt, 15)
        assert losses[-1] < losses[0], name
