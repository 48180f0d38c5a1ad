"""SOAP, REKLS, StackedSoap and their math (emerging_optimizers.legacy_soap), and utils.eig.

The optimizer against a plain float64 reference written here (explicit matrices, eigh/QR written out), reductions
(an identity eigenbasis that never refreshes is Adam; 1-D params are Adam; conv kernels are their matrix view;
StackedSoap on 3-D params is SOAP on the stacking), the fixes over the reference library (exp_avg_sq follows the
sorted eigenbasis; KL factors well-scaled from step 1; any rank), and the contract points of the module
docstring: bit-identical resume, bf16 params with float32 state, no host synchronization, early validation.
"""

from __future__ import annotations

import copy
import io
import logging
import math

import pytest
import torch

import emerging_optimizers as eo
from emerging_optimizers.legacy_soap import REKLS, SOAP, StackedSoap, soap, soap_utils
from emerging_optimizers.legacy_soap.stacked_soap import _stack_2d, _unstack
from emerging_optimizers.scalar_optimizers.adam import Adam
from emerging_optimizers.utils import eig

#: float64 optimizer vs float64 reference: only the order of rounding differs.
TOL_F64 = dict(rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------- reference
def _desc_eigh(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, U = torch.linalg.eigh(F)
    idx = torch.argsort(w, descending=True)
    return w[idx], U[:, idx]


def _ref_soap(W0, grads, *, lr=3e-3, betas=(0.9, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.01,
              weight_decay_method="decoupled", nesterov=False, correct_bias=True, use_eigh=False, power_iter_steps=1,
              max_update_rms=0.0, use_kl_shampoo=False, correct_shampoo_beta_bias=None, precondition_frequency=1,
              kl_eigval_floor=1e-4, L0=None, R0=None, **_precisions):
    """SOAP in float64 with explicit matrices, written from the update rule (module docstring of soap.py)."""
    W = W0.clone().double()
    m, n = W.shape
    L = torch.zeros(m, m, dtype=torch.float64) if L0 is None else L0.clone()
    R = torch.zeros(n, n, dtype=torch.float64) if R0 is None else R0.clone()
    QL, QR = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    lamL, lamR = torch.zeros(m, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    M = torch.zeros(m, n, dtype=torch.float64)  # Adam's moments, in the current eigenbasis coordinates
    V = torch.zeros(m, n, dtype=torch.float64)
    b1, b2 = betas
    out = []
    for k, G in enumerate(grads):
        t = k + 1
        G = G.double()
        bs = shampoo_beta
        if (correct_bias if correct_shampoo_beta_bias is None else correct_shampoo_beta_bias):
            bs = 1 - (1 - shampoo_beta) / (1 - shampoo_beta**t)
        if use_kl_shampoo:
            if k == 0:
                rms = G.pow(2).mean().sqrt()
                lL, lR = rms * torch.ones(m, dtype=torch.float64), rms * torch.ones(n, dtype=torch.float64)
            else:
                lL, lR = lamL, lamR

            def inv(lam):
                return 1.0 / torch.clamp(lam, min=max(eps, kl_eigval_floor * lam.mean().item()))

            L_new = G @ QR @ torch.diag(inv(lR)) @ QR.T @ G.T / n
            R_new = G.T @ QL @ torch.diag(inv(lL)) @ QL.T @ G / m
        else:
            L_new, R_new = G @ G.T, G.T @ G
        L = bs * L + (1 - bs) * L_new
        R = bs * R + (1 - bs) * R_new
        if k % precondition_frequency == 0:
            M_plain = QL @ M @ QR.T
            if use_eigh or k == 0:
                lamL, QL = _desc_eigh(L)
                lamR, QR = _desc_eigh(R)
            else:
                for side in (0, 1):
                    F, Q = (L, QL) if side == 0 else (R, QR)
                    for _ in range(power_iter_steps):
                        Q = torch.linalg.qr(F @ Q).Q
                    lam = torch.diag(Q.T @ F @ Q)
                    idx = torch.argsort(lam, descending=True)
                    Q, lam = Q[:, idx], lam[idx]
                    if side == 0:
                        QL, lamL, V = Q, lam, V[idx, :]
                    else:
                        QR, lamR, V = Q, lam, V[:, idx]
            M = QL.T @ M_plain @ QR
        if weight_decay_method == "l2":
            G = G + weight_decay * W
        else:
            W = W * {"decoupled": 1 - lr * weight_decay, "independent": 1 - weight_decay,
                     "palm": 1 - lr * lr * weight_decay}[weight_decay_method]
        Gp = QL.T @ G @ QR
        M = b1 * M + (1 - b1) * Gp
        V = b2 * V + (1 - b2) * Gp * Gp
        bc1, bc2, bcn = (1 - b1**t, 1 - b2**t, 1 - b1 ** (t + 1)) if correct_bias else (1.0, 1.0, 1.0)
        m_hat = b1 * M / bcn + (1 - b1) * Gp / bc1 if nesterov else M / bc1
        U = QL @ (m_hat / ((V / bc2).sqrt() + eps)) @ QR.T
        if max_update_rms > 0:
            U = U * min(1.0, max_update_rms / (U.pow(2).mean().sqrt().item() + 1e-7))
        W = W - lr * U
        out.append(W.clone())
    return out


def _grads(shape, steps, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(steps)]


def _seed_factors(m, n, seed=1):
    """Distinct-eigenvalue SPD starting factors, so no eigenspace is degenerate (a rank-deficient G G^T would leave
    the basis of its null space up to the eigen-solver, differently on each side of the comparison)."""
    gen = torch.Generator().manual_seed(seed)
    A, B = torch.randn(m, m, generator=gen, dtype=torch.float64), torch.randn(n, n, generator=gen, dtype=torch.float64)
    return A @ A.T / m + torch.eye(m, dtype=torch.float64), B @ B.T / n + torch.eye(n, dtype=torch.float64)


CONFIGS = [
    {},
    {"use_eigh": True},
    {"use_kl_shampoo": True},
    {"use_kl_shampoo": True, "use_eigh": True, "kl_eigval_floor": 0.0},
    {"nesterov": True, "correct_bias": False},
    {"correct_shampoo_beta_bias": False, "shampoo_beta": 0.6, "power_iter_steps": 3},
    {"weight_decay_method": "l2", "weight_decay": 0.1},
    {"weight_decay_method": "independent", "weight_decay": 0.05, "betas": (0.5, 0.7)},
    {"weight_decay_method": "palm", "weight_decay": 0.5, "lr": 0.1},
    {"max_update_rms": 0.05, "lr": 0.1},
    {"precondition_frequency": 3, "use_kl_shampoo": True},
    {"precondition_frequency": 2, "use_eigh": True, "nesterov": True},
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("shape,seeded", [((5, 5), False), ((6, 4), True), ((3, 7), True)])
def test_matches_float64_reference(shape, seeded, overrides):
    hp = {"lr": 0.05, **overrides}
    W0 = torch.randn(shape, dtype=torch.float64)
    grads = _grads(shape, 7)
    L0, R0 = _seed_factors(*shape) if seeded else (None, None)
    if seeded:  # starting factors only survive the first EMA without the shampoo_beta bias correction
        hp.setdefault("correct_shampoo_beta_bias", False)
    else:
        # From G alone, Q_L^T G Q_R is G's SVD: its off-diagonal entries are rounding noise that Adam would
        # normalise to full size unless eps dominates them.
        hp.setdefault("eps", 1e-4)
    expected = _ref_soap(W0, grads, L0=L0, R0=R0, **hp)
    p = torch.nn.Parameter(W0.clone())
    opt = SOAP([p], **hp)
    if seeded:
        opt._init_group(opt.param_groups[0], skip_non_grad_params=False)
        opt.state[p]["L"].copy_(L0)
        opt.state[p]["R"].copy_(R0)
    for k, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), expected[k], **TOL_F64, msg=lambda msg, k=k: f"step {k}: {msg}")


def test_l2_weight_decay_leaves_grad_untouched():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = SOAP([p], weight_decay=0.1, weight_decay_method="l2")
    g = torch.randn(4, 3)
    p.grad = g.clone()
    opt.step()
    assert torch.equal(p.grad, g)


# ---------------------------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("kw", [{}, {"nesterov": True, "weight_decay": 0.1, "weight_decay_method": "l2"},
                                {"correct_bias": False, "weight_decay": 0.05}])
def test_identity_eigenbasis_that_never_refreshes_is_adam(kw):
    """A diagonal first gradient (distinct entries, descending) makes eigh return +-I; never refreshing keeps it."""
    hp = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, **{"weight_decay": 0.0, **kw})
    W0 = torch.randn(4, 4)
    grads = [torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))] + [torch.randn(4, 4) for _ in range(5)]
    p, q = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    opt = SOAP([p], precondition_frequency=10**9, **hp)
    ref = Adam([q], fused=False, **hp)
    for g in grads:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for key in ("Q_L", "Q_R"):
        assert torch.equal(opt.state[p][key].abs(), torch.eye(4))


def test_1d_and_0d_params_are_adam():
    hp = dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, nesterov=True)
    a, b = torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.tensor(1.5))
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    opt, ref = SOAP([a, b], **hp), Adam([a2, b2], fused=False, **hp)
    for _ in range(4):
        ga, gb = torch.randn(7), torch.randn(())
        a.grad, b.grad, a2.grad, b2.grad = ga, gb, ga.clone(), gb.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(a, a2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, b2, rtol=1e-6, atol=1e-7)
    assert set(opt.state[a]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("cls", [SOAP, REKLS, StackedSoap])
def test_conv_kernel_is_its_matrix_view(cls):
    W0 = torch.randn(6, 3, 2, 2)
    conv, mat = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.reshape(6, 12).clone())
    opt, ref = cls([conv], lr=0.01), cls([mat], lr=0.01)
    for _ in range(4):
        g = torch.randn(6, 3, 2, 2)
        conv.grad, mat.grad = g, g.reshape(6, 12).clone()
        opt.step()
        ref.step()
    assert torch.equal(conv.detach().reshape(6, 12), mat.detach())
    assert opt.state[conv]["L"].shape == (6, 6) and opt.state[conv]["R"].shape == (12, 12)


@pytest.mark.parametrize("shape", [(4, 6, 3), (4, 3, 6), (2, 5, 5)])
def test_stacked_soap_3d_is_soap_on_the_stacking(shape):
    x = torch.randn(shape)
    p, q = torch.nn.Parameter(x.clone()), torch.nn.Parameter(_stack_2d(x).clone())
    opt = StackedSoap([p], lr=0.01)
    ref = SOAP([q], lr=0.01, use_kl_shampoo=True)
    for _ in range(4):
        g = torch.randn(shape)
        p.grad, q.grad = g, _stack_2d(g)
        opt.step()
        ref.step()
    assert torch.equal(_stack_2d(p.detach()), q.detach())
    assert torch.equal(_unstack(_stack_2d(x), x.shape), x)
    assert opt.state[p]["exp_avg"].shape == q.shape


def test_stacked_soap_1d_and_4d_do_not_crash():
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(5,), (4, 3, 2, 2), (3, 4)]]
    opt = StackedSoap(params)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)


def test_rekls_is_soap_with_eigh_and_kl():
    W0 = torch.randn(5, 4)
    p, q = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    opt, ref = REKLS([p], lr=0.02), SOAP([q], lr=0.02, use_eigh=True, use_kl_shampoo=True)
    for _ in range(4):
        g = torch.randn(5, 4)
        p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
    assert torch.equal(p, q)
    assert opt.use_eigh and opt.use_kl_shampoo


# ---------------------------------------------------------------------------------------------- the fixes
def _reordering_case():
    """A factor whose QR refresh from the identity re-sorts the columns: diag(1, 3, 2) -> order [1, 2, 0]."""
    L = torch.diag(torch.tensor([1.0, 3.0, 2.0]))
    R = torch.diag(torch.tensor([5.0, 4.0]))  # already sorted: no permutation on the right
    V = torch.arange(1.0, 7.0).reshape(3, 2)  # distinct second moments, one per (left, right) direction pair
    return L, R, V


def test_qr_refresh_permutes_exp_avg_sq_with_the_eigenbasis():
    L, R, V = _reordering_case()
    I3, I2 = torch.eye(3), torch.eye(2)
    eigvals, (QL, QR), _, new_V = soap.update_eigenbasis_and_exp_avgs([L, R], [I3, I2], V, torch.zeros(3, 2))
    torch.testing.assert_close(eigvals[0], torch.tensor([3.0, 2.0, 1.0]))
    # every new direction k is an old direction j: its moment must be the one stored for j
    for k in range(3):
        j = int(QL[:, k].abs().argmax())
        assert abs(float(QL[j, k])) == pytest.approx(1.0)
        assert torch.equal(new_V[k], V[j])
    assert torch.equal(new_V, V[[1, 2, 0]])
    # the eigh path keeps exp_avg_sq as it is
    *_, V_eigh = soap.update_eigenbasis_and_exp_avgs([L, R], [I3, I2], V, torch.zeros(3, 2), use_eigh=True)
    assert torch.equal(V_eigh, V)


def test_optimizer_moments_follow_their_eigen_directions():
    L, R, V = _reordering_case()
    p = torch.nn.Parameter(torch.zeros(3, 2))
    opt = SOAP([p], betas=(0.9, 0.5), correct_shampoo_beta_bias=False, weight_decay=0.0)
    opt._init_group(opt.param_groups[0], skip_non_grad_params=False)
    st = opt.state[p]
    st["step"] = 1  # past the first refresh (which is always eigh)
    st["L"].copy_(L)
    st["R"].copy_(R)
    st["exp_avg_sq"].copy_(V)
    p.grad = torch.zeros(3, 2)  # the factors only decay, the directions keep their identity
    opt.step()
    assert torch.equal(st["Q_L"].abs(), torch.eye(3)[:, [1, 2, 0]])
    torch.testing.assert_close(st["exp_avg_sq"], 0.5 * V[[1, 2, 0]])


@pytest.mark.parametrize("shape", [(8, 8), (16, 8), (8, 16)])
@pytest.mark.parametrize("scale", [1e-3, 1e2])
def test_kl_factors_well_scaled_from_step_1(shape, scale):
    """The reference's first KL update divides by eps (max|L| ~ 1e8 for unit gradients); ours is at grad scale."""
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = SOAP([p], lr=0.0, weight_decay=0.0, use_kl_shampoo=True)
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for _ in range(10):
        p.grad = scale * torch.randn(shape, generator=gen)
        opt.step()
        st = opt.state[p]
        size = max(st["L"].abs().max().item(), st["R"].abs().max().item()) / scale
        sizes.append(size)
        for key in ("L", "R"):  # symmetric PSD up to rounding
            assert torch.linalg.eigvalsh(st[key]).min() > -1e-5 * scale * size
    assert 0.1 < sizes[0] < 10.0, sizes  # step 1: L = G G^T / (n rms(G)), R = G^T G / (m rms(G))
    if shape[0] == shape[1]:  # full-rank factors: every step at grad scale
        assert max(sizes) < 30.0, sizes
    else:  # rank-deficient early factors: bounded by the relative floor (the reference: 1/eps)
        assert max(sizes) < 1.0 / opt.defaults["kl_eigval_floor"], sizes


def test_kl_update_matches_explicit_formula_on_rectangular_grads():
    m, n = 5, 3
    G = torch.randn(m, n, dtype=torch.float64)
    L0, R0 = _seed_factors(m, n)
    QL, QR = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64)).Q, torch.linalg.qr(torch.randn(n, n)).Q.double()
    lamL, lamR = torch.rand(m, dtype=torch.float64) + 0.1, torch.rand(n, dtype=torch.float64) + 0.1
    L, R = L0.clone(), R0.clone()
    soap.update_kronecker_factors_kl_shampoo([L, R], G, 0.7, [QL, QR], [lamL, lamR], 1e-8, eigval_exp=-0.5)
    torch.testing.assert_close(L, 0.7 * L0 + 0.3 / n * G @ QR @ torch.diag(lamR**-0.5) @ QR.T @ G.T, **TOL_F64)
    torch.testing.assert_close(R, 0.7 * R0 + 0.3 / m * G.T @ QL @ torch.diag(lamL**-0.5) @ QL.T @ G, **TOL_F64)
    with pytest.raises(TypeError, match="only supported for 2D"):
        soap.update_kronecker_factors_kl_shampoo([L, R], G[0], 0.7, [QL, QR], [lamL, lamR], 1e-8)


# ---------------------------------------------------------------------------------------------- contract points
def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _train(model, opt, steps, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=gen)
    y = torch.tanh(x @ torch.randn(6, 3, generator=gen))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


RESUME = [{}, {"use_kl_shampoo": True, "precondition_frequency": 2}, {"use_eigh": True, "max_update_rms": 0.5}]


@pytest.mark.parametrize("kw", RESUME)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_identical(kw, dtype):
    model = _model(dtype)
    opt = SOAP(model.parameters(), lr=0.01, **kw)
    _train(model, opt, 3, dtype)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 4, dtype)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = _model(dtype)
    model2.load_state_dict(ckpt["model"])
    opt2 = SOAP(model2.parameters(), lr=0.5)  # every hyperparameter comes from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, 4, dtype)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_bf16_params_keep_float32_state_through_a_checkpoint():
    model = _model(torch.bfloat16)
    opt = SOAP(model.parameters(), lr=0.02, use_kl_shampoo=True)
    losses = _train(model, opt, 20, torch.bfloat16)
    assert losses[-1] < 0.7 * losses[0], losses[::5]
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    opt2 = SOAP(model.parameters())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for s, s2 in zip(opt.state.values(), opt2.state.values()):
        for k, v in s.items():
            assert torch.equal(v, s2[k]) and s2[k].dtype == v.dtype if isinstance(v, torch.Tensor) else v == s2[k]


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float64, torch.float64), (torch.float16, torch.float32)])
def test_state_dtype_follows_the_param(dtype, state_dtype):
    p = torch.nn.Parameter(torch.randn(3, 2, dtype=dtype))
    opt = SOAP([p], use_kl_shampoo=True, stream_list=[object()])  # streams: ignored for CPU params
    for _ in range(2):
        p.grad = torch.randn(3, 2, dtype=dtype)
        opt.step()
    assert p.dtype == dtype and torch.isfinite(p).all()
    assert all(v.dtype == state_dtype for v in opt.state[p].values() if isinstance(v, torch.Tensor))


def test_update_needs_no_host_synchronization():
    """The per-step math runs on the meta device, where any .item() or bool(tensor) raises."""
    m, n = 4, 3
    G = torch.zeros(m, n, device="meta")
    L, R = torch.zeros(m, m, device="meta"), torch.zeros(n, n, device="meta")
    Qs = [torch.eye(m, device="meta"), torch.eye(n, device="meta")]
    lams = [torch.ones(m, device="meta"), torch.ones(n, device="meta")]
    soap.update_kronecker_factors([L, R], G, 0.9)
    soap.update_kronecker_factors_kl_shampoo([L, R], G, 0.9, Qs, lams, 1e-8, eigval_floor=1e-4)
    u = soap.calculate_soap_update(G, torch.zeros(m, n, device="meta"), torch.zeros(m, n, device="meta"), Qs,
                                   betas=(0.9, 0.95), eps=1e-8, correct_bias=True, nesterov=True, step=3,
                                   max_update_rms=1.0)
    assert u.shape == (m, n)


def test_precondition_frequency_refreshes_on_its_steps_only():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = SOAP([p], precondition_frequency=3)
    bases = []
    for _ in range(7):
        p.grad = torch.randn(4, 3)
        L_before = opt.state[p]["L"].clone() if opt.state[p] else None
        opt.step()
        bases.append(opt.state[p]["Q_L"].clone())
        if L_before is not None:
            assert not torch.equal(opt.state[p]["L"], L_before)  # the factors update every step
    changed = [not torch.equal(a, b) for a, b in zip(bases, bases[1:])]
    assert changed == [False, False, True, False, False, True]  # refreshes at steps 0, 3, 6 (0-based)


def test_every_hyperparameter_is_per_group_and_survives_state_dict():
    model = _model()
    opt = SOAP([{"params": model[0].parameters(), "use_kl_shampoo": True, "precondition_frequency": 2},
                {"params": model[2].parameters(), "nesterov": True, "max_update_rms": 0.1}], lr=0.01)
    _train(model, opt, 2)
    keys = {"lr", "betas", "shampoo_beta", "eps", "weight_decay", "weight_decay_method", "nesterov", "correct_bias",
            "fp32_matmul_prec", "use_eigh", "qr_fp32_matmul_prec", "power_iter_steps", "max_update_rms",
            "use_kl_shampoo", "correct_shampoo_beta_bias", "precondition_frequency", "kl_eigval_floor"}
    for group in opt.state_dict()["param_groups"]:
        assert keys <= set(group)
    assert opt.param_groups[1]["nesterov"] and not opt.nesterov  # the attribute shows the constructor's value
    assert opt.correct_shampoo_beta_bias is True  # None resolves to correct_bias
    opt.max_update_rms = 0.3
    assert [g["max_update_rms"] for g in opt.param_groups] == [0.3, 0.3]


def test_closure_returns_the_loss():
    model = _model()
    opt = SOAP(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        first = opt.step(closure)
    assert opt.step(closure).item() < first.item()


@pytest.mark.parametrize("name,value", [
    ("lr", -1.0), ("betas", (1.0, 0.9)), ("betas", (0.9,)), ("shampoo_beta", 1.0), ("eps", -1e-8),
    ("weight_decay", -0.1), ("weight_decay_method", "foo"), ("nesterov", "yes"), ("correct_bias", 1),
    ("fp32_matmul_prec", "low"), ("use_eigh", None), ("qr_fp32_matmul_prec", "fast"), ("power_iter_steps", 0),
    ("max_update_rms", -1.0), ("use_kl_shampoo", "no"), ("correct_shampoo_beta_bias", "x"),
    ("precondition_frequency", 0), ("precondition_frequency", 2.5), ("kl_eigval_floor", float("nan")),
])
def test_bad_hyperparameters_raise_naming_the_argument(name, value):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=name.split("_")[0] if name == "lr" else name):
        SOAP([p], **{name: value})
    opt = SOAP([p])
    with pytest.raises(ValueError, match=name.split("_")[0] if name == "lr" else name):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], name: value})
    assert len(opt.param_groups) == 1


def test_registry_and_reference_layout():
    assert eo.get_optimizer_cls("soap") is SOAP
    assert eo.get_optimizer_cls("rekls") is REKLS
    assert eo.get_optimizer_cls("stacked_soap") is StackedSoap
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = SOAP([p], 0.1, (0.8, 0.9), 0.7, 1e-6, 0.0)  # the reference's positional order
    assert [opt.defaults[k] for k in ("lr", "betas", "shampoo_beta", "eps", "weight_decay")] == [
        0.1, (0.8, 0.9), 0.7, 1e-6, 0.0]
    assert SOAP.matrix_optimizer_ok


def test_usable_as_muon_adamw_matrix_side():
    model = _model()
    opt = eo.MuonAdamW(model.named_parameters(), matrix_optimizer="soap", lr=0.01)
    losses = _train(model, opt, 15)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------- soap_utils
def test_get_eigenbasis_functions_agree():
    A = torch.randn(6, 6, dtype=torch.float64)
    F = A @ A.T
    w, Q = soap_utils.get_eigenbasis_eigh([F])
    torch.testing.assert_close(Q[0] @ torch.diag(w[0]) @ Q[0].T, F, **TOL_F64)
    (U,) = soap_utils.get_eigenbasis_svd([F])
    torch.testing.assert_close((U.T @ Q[0]).abs(), torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-8)
    start = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q
    w_qr, Q_qr, perms = soap_utils.get_eigenbasis_qr([F], [start], power_iter_steps=0, return_indices=True)
    assert torch.equal(Q_qr[0], start[:, perms[0]])
    torch.testing.assert_close(w_qr[0], torch.diag(Q_qr[0].T @ F @ Q_qr[0]), **TOL_F64)


# ---------------------------------------------------------------------------------------------- utils.eig
def test_eigh_with_fallback_matches_eigh_in_float64():
    A = torch.randn(7, 7, dtype=torch.float64)
    x = A @ A.T
    w, V = eig.eigh_with_fallback(x)
    w_ref, V_ref = torch.linalg.eigh(x)
    torch.testing.assert_close(w, w_ref.flip(-1), **TOL_F64)
    assert torch.all(w[:-1] >= w[1:])
    torch.testing.assert_close((V.T @ V_ref.flip(-1)).abs(), torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-9)
    w_eps, _ = eig.eigh_with_fallback(x, eps=0.5)
    torch.testing.assert_close(w_eps, w + 0.5, **TOL_F64)
    w32, V32 = eig.eigh_with_fallback(x.float(), output_dtype=torch.float64)
    assert w32.dtype == V32.dtype == torch.float64
    wb, _ = eig.eigh_with_fallback(torch.stack([x, 2 * x]))  # a batch
    torch.testing.assert_close(wb[1], 2 * w, **TOL_F64)


def test_eigh_with_fallback_retries_in_float64_only_on_failure(monkeypatch, caplog):
    real = torch.linalg.eigh
    calls = []

    def flaky(a, *args, **kwargs):
        calls.append(a.dtype)
        if a.dtype != torch.float64:
            raise torch.linalg.LinAlgError("mock: failed to converge")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    A = torch.randn(5, 5)
    x = A @ A.T
    with caplog.at_level(logging.WARNING):
        w, V = eig.eigh_with_fallback(x)
    assert calls == [torch.float32, torch.float64]
    assert w.dtype == V.dtype == torch.float32
    assert "float64" in caplog.text
    torch.testing.assert_close(V @ torch.diag(w) @ V.T, x, rtol=1e-4, atol=1e-4)
    calls.clear()
    eig.eigh_with_fallback(x)  # no failure memory: the next call tries float32 again
    assert calls[0] == torch.float32
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("always fails")))
    with pytest.raises(RuntimeError, match="always fails"):
        eig.eigh_with_fallback(x, force_double=True)


def test_eigh_with_fallback_retries_in_float64_when_float32_returns_nan(monkeypatch):
    """A float32 eigh that returns NaN for a finite matrix (without raising) is a failure too: LAPACK's ssyevd
    did so on an Intel AVX-512 CPU for this 14x14 constant matrix (rank 1, 13 zero eigenvalues), met by ReklsV3
    on near-zero gradients. Checked directly (bites where the library misbehaves) and with a mock (everywhere)."""
    x = torch.full((14, 14), 5.111580776429037e-07)
    w, V = eig.eigh_with_fallback(x)
    assert torch.isfinite(w).all() and torch.isfinite(V).all()
    torch.testing.assert_close(w[0], torch.tensor(14 * 5.111580776429037e-07), rtol=1e-6, atol=0)
    # backward-stable eigh (float32 where it returned finite values, as on AMD EPYC; float64 after a fallback):
    # ||V diag(w) V^T - x||_max <= n * eps_float32 * ||x||_2 = 14 * 1.19e-7 * 7.2e-6 = 1.2e-11 (measured 2.2e-12
    # in float32 on an AMD EPYC, whose ssyevd returns finite values for this matrix; the float64 retry is far inside)
    bound = 14 * torch.finfo(torch.float32).eps * torch.linalg.matrix_norm(x.double(), ord=2).item()
    torch.testing.assert_close(V @ torch.diag(w) @ V.T, x, rtol=0, atol=bound)

    real = torch.linalg.eigh
    calls = []

    def nan_in_float32(a, *args, **kwargs):
        calls.append(a.dtype)
        w, V = real(a, *args, **kwargs)
        return (w * float("nan"), V) if a.dtype == torch.float32 else (w, V)

    monkeypatch.setattr(torch.linalg, "eigh", nan_in_float32)
    A = torch.randn(5, 5)
    w, V = eig.eigh_with_fallback(A @ A.T)
    assert calls == [torch.float32, torch.float64] and torch.isfinite(w).all() and w.dtype == torch.float32
    bad = torch.full((3, 3), float("nan"))  # NaN out of a NaN input is not eigh's failure (no retry for that)
    assert not eig._nonfinite_result(bad, bad[0], bad)
    assert eig._nonfinite_result(bad.nan_to_num(), bad[0], bad)


def test_orthogonal_iteration_converges_to_the_eigenbasis():
    n = 6
    U = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q
    lam = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    F = U @ torch.diag(lam) @ U.T
    Q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q
    for _ in range(200):
        w, Q = eig.orthogonal_iteration(F, Q, power_iter_steps=1)
    torch.testing.assert_close(w, lam, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close((U.T @ Q).abs(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-6)
    # the permutation: with no power step, the result is the start re-ordered by Rayleigh quotient
    start = U[:, [3, 0, 5, 1, 4, 2]]
    w, Q, perm = eig.orthogonal_iteration(F, start, 0, return_indices=True)
    assert perm.tolist() == [1, 3, 5, 0, 4, 2] and torch.equal(Q, start[:, perm])
    # batched input equals the loop; stable on ties (the identity factor is not permuted)
    Fb, Qb = torch.stack([F, 2 * F]), torch.stack([start, start])
    wb, Qbatch = eig.orthogonal_iteration(Fb, Qb, 2)
    for i in range(2):
        w_i, Q_i = eig.orthogonal_iteration(Fb[i], Qb[i], 2)
        torch.testing.assert_close(wb[i], w_i, **TOL_F64)
        torch.testing.assert_close(Qbatch[i], Q_i, **TOL_F64)
    _, Q_id, perm_id = eig.orthogonal_iteration(torch.eye(4), torch.eye(4), 1, return_indices=True)
    assert perm_id.tolist() == [0, 1, 2, 3]


def test_conjugate_and_input_checks():
    A = torch.randn(4, 4, dtype=torch.float64)
    P = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64)).Q
    torch.testing.assert_close(eig.conjugate(A, P), P.T @ A @ P, **TOL_F64)
    torch.testing.assert_close(eig.conjugate(A, P, diag=True), torch.diag(P.T @ A @ P), **TOL_F64)
    with pytest.raises(TypeError, match="2D"):
        eig.conjugate(A[0], P)
    with pytest.raises(ValueError, match="square"):
        eig.eigh_with_fallback(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="power_iter_steps"):
        eig.orthogonal_iteration(A, P, -1)
    assert math.isclose(float(eig.eigh_with_fallback(torch.eye(2))[0][0]), 1.0)
