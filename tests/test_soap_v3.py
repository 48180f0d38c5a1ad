"""KL-SOAP v3 (emerging_optimizers.shampoo.soap_v3): KlSoapV3, ReklsV3, KlMSoap and their preconditioners.

The optimizers against a plain float64 KL-SOAP written here (explicit matrices, eigh/QR refreshes, betas,
weight decay, Adam or MAdam inside); bit-equality with legacy SOAP(use_kl_shampoo=True) and REKLS (one
algorithm, two packagings); the preconditioner objects; the points of the module docstring (RMS clip,
precondition_frequency, bit-identical resume, bf16 params with float32 state, N-D and 1-D params, early
validation, reference-style subclasses).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import emerging_optimizers as eo
from emerging_optimizers.legacy_soap.rekls import REKLS
from emerging_optimizers.legacy_soap.soap import SOAP
from emerging_optimizers.shampoo import soap_v3
from emerging_optimizers.shampoo.soap_v3 import (
    KlMSoap,
    KlSoapPreconditioner,
    KlSoapV3,
    ReklsPreconditioner,
    ReklsV3,
    SoapBase,
)

#: float64 optimizer vs float64 reference: only the order of rounding differs.
TOL_F64 = dict(rtol=1e-9, atol=1e-11)
KEYS = ("exp_avg", "exp_avg_sq", "L", "R", "Q_L", "Q_R", "eigvals_L", "eigvals_R")


# ---------------------------------------------------------------------------------------------- reference
def _eigh_desc(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, V = torch.linalg.eigh(A)
    return w.flip(-1), V.flip(-1)


def _ref_kl_soap(p0, grads, *, lr, lrs=None, betas, shampoo_beta, eps, weight_decay, weight_decay_method="decoupled",
                 correct_bias=True, nesterov=False, max_update_rms=0.0, precondition_frequency=1,
                 kl_eigval_floor=1e-4, inner="adam", scale_log2=16, use_eigh=False):
    """KL-SOAP in float64 with explicit matrices; returns the parameter after each step and the final state."""
    W = p0.double().reshape(p0.shape[0], -1).clone()
    m, n = W.shape
    f64 = dict(dtype=torch.float64)
    L, R = torch.zeros(m, m, **f64), torch.zeros(n, n, **f64)
    QL, QR = torch.eye(m, **f64), torch.eye(n, **f64)
    lamL, lamR = torch.zeros(m, **f64), torch.zeros(n, **f64)
    M, V = torch.zeros(m, n, **f64), torch.zeros(m, n, **f64)
    b1, b2 = betas
    params = []

    def kl_weight(lam):  # diag(max(lam, floor)^-1)
        floor = max(eps, kl_eigval_floor * lam.mean().item())
        return torch.diag(1.0 / lam.clamp_min(floor))

    for t, g in enumerate(grads, start=1):
        G = g.double().reshape(m, n)
        lr = lrs[t - 1] if lrs else lr
        bs = 1 - (1 - shampoo_beta) / (1 - shampoo_beta**t) if correct_bias else shampoo_beta
        if t == 1:  # isotropic estimate rms(G) for both factors
            rms = G.square().mean().sqrt()
            lamL, lamR = rms * torch.ones(m, **f64), rms * torch.ones(n, **f64)
        L_new = G @ QR @ kl_weight(lamR) @ QR.T @ G.T / n
        R_new = G.T @ QL @ kl_weight(lamL) @ QL.T @ G / m
        L, R = bs * L + (1 - bs) * L_new, bs * R + (1 - bs) * R_new

        if (t - 1) % precondition_frequency == 0:
            M = QL @ M @ QR.T  # first moment out of the old basis
            if t == 1 or use_eigh:
                (lamL, QL), (lamR, QR) = _eigh_desc(L), _eigh_desc(R)
            else:
                new = []
                for F, Q in ((L, QL), (R, QR)):
                    Q = torch.linalg.qr(F @ Q).Q
                    rq = torch.diag(Q.T @ F @ Q)
                    order = torch.sort(rq, descending=True, stable=True).indices
                    new.append((rq[order], Q[:, order], order))
                (lamL, QL, oL), (lamR, QR, oR) = new
                V = V[oL][:, oR]  # the second moments follow their eigen-directions
            M = QL.T @ M @ QR

        if weight_decay_method == "l2":
            G = G + weight_decay * W
        elif weight_decay_method == "decoupled":
            W = W * (1 - lr * weight_decay)
        elif weight_decay_method == "independent":
            W = W * (1 - weight_decay)
        Gp = QL.T @ G @ QR
        bc1 = 1 - b1**t if correct_bias else 1.0
        bc2 = 1 - b2**t if correct_bias else 1.0
        M = b1 * M + (1 - b1) * Gp
        if inner == "adam":
            V = b2 * V + (1 - b2) * Gp**2
            m_hat = b1 * M / (1 - b1 ** (t + 1)) + (1 - b1) * Gp / bc1 if nesterov else M / bc1
            A = m_hat / ((V / bc2).sqrt() + eps)
        else:  # MAdam: V holds 2**k EMA(g^2), no eps
            V = b2 * V + (1 - b2) * (2.0**scale_log2) * Gp**2
            A = torch.where(M == 0, 0.0, (M / bc1) / (V / bc2 / 2.0**scale_log2).sqrt())
        U = QL @ A @ QR.T
        if max_update_rms > 0:
            U = U * min(1.0, max_update_rms / (U.square().mean().sqrt().item() + 1e-7))
        W = W - lr * U
        params.append(W.reshape(p0.shape).clone())
    state = dict(exp_avg=M, exp_avg_sq=V, L=L, R=R, Q_L=QL, Q_R=QR, eigvals_L=lamL, eigvals_R=lamR)
    return params, state


def _align_signs(state, ref):
    """The eigenvector signs are arbitrary: flip the optimizer's columns (and exp_avg with them) onto ref's."""
    sL = torch.sign((state["Q_L"] * ref["Q_L"]).sum(0))
    sR = torch.sign((state["Q_R"] * ref["Q_R"]).sum(0))
    out = dict(state)
    out["Q_L"], out["Q_R"] = state["Q_L"] * sL, state["Q_R"] * sR
    out["exp_avg"] = state["exp_avg"] * sL[:, None] * sR[None, :]
    return out


def _grads(shape, steps, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(steps)]


def _run(opt_cls, p0, grads, lrs=None, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = opt_cls([p], **kw)
    params = []
    for i, g in enumerate(grads):
        if lrs:
            opt.param_groups[0]["lr"] = lrs[i]
        p.grad = g.clone()
        opt.step()
        params.append(p.detach().clone())
    return p, opt, params


BASE = dict(lr=0.05, betas=(0.8, 0.9), shampoo_beta=0.7, eps=1e-8, weight_decay=0.1)
#: Against the reference, two things no two implementations share are kept out:
#: * Step 1's eigenbases diagonalize the gradient (L ~ G G^T, R ~ G^T G), so the projected gradient's off-diagonal
#:   entries are rounding noise, which Adam divides by eps: eps=1e-3 keeps that at ~1e-13.
#: * A zero eigenvalue of multiplicity > 1 (rank-deficient factors of a non-square matrix at step 1) has an
#:   arbitrary eigenbasis, from which orthogonal iteration then starts: the orthogonal-iteration cases have at
#:   most a one-dimensional null space (unique up to sign) at step 1.
REF_BASE = dict(BASE, eps=1e-3)
REF_CASES = [
    (KlSoapV3, (4, 3), {}),
    (KlSoapV3, (3, 4), dict(nesterov=True, weight_decay_method="l2")),
    (KlSoapV3, (4, 4), dict(precondition_frequency=2, correct_bias=False)),
    (KlSoapV3, (3, 2, 2), dict(max_update_rms=0.02, kl_eigval_floor=0.0, weight_decay_method="independent")),
    (ReklsV3, (5, 3), {}),
    (ReklsV3, (3, 4), dict(precondition_frequency=3, nesterov=True, weight_decay_method="l2")),
    # MAdam has no eps: the rounding noise of step 1 (above) becomes O(1) update entries, different in every
    # implementation, so step 1 runs with lr=0 (the state is still compared) and the matrices are square.
    (KlMSoap, (4, 4), dict(lrs=[0.0] + [0.05] * 5)),
    (KlMSoap, (3, 3), dict(lrs=[0.0] + [0.05] * 5, scale_log2=8, precondition_frequency=2, max_update_rms=0.05)),
]


@pytest.mark.parametrize("opt_cls,shape,overrides", REF_CASES,
                         ids=[f"{c.__name__}-{'x'.join(map(str, s))}-{'-'.join(o) or 'defaults'}"
                              for c, s, o in REF_CASES])
def test_matches_float64_reference(opt_cls, shape, overrides):
    kw = {**REF_BASE, **overrides}
    p0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = _grads(shape, 6)
    p, opt, params = _run(opt_cls, p0, grads, **kw)
    ref_params, ref_state = _ref_kl_soap(p0, grads, **kw, use_eigh=opt_cls is ReklsV3,
                                         inner="madam" if opt_cls is KlMSoap else "adam")
    for got, want in zip(params, ref_params):
        torch.testing.assert_close(got, want, **TOL_F64)
    state = _align_signs(opt.state[p], ref_state)
    for key in KEYS:
        torch.testing.assert_close(state[key], ref_state[key], **TOL_F64, msg=key)
    assert opt.state[p]["step"] == len(grads)


# ---------------------------------------------------------------------------------------------- legacy SOAP
LEGACY_CASES = [
    ((5, 3), {}),
    ((4, 6), dict(nesterov=True, correct_bias=False, weight_decay_method="l2", max_update_rms=0.01)),
    ((6, 2, 2), dict(precondition_frequency=3, kl_eigval_floor=0.0)),
]


@pytest.mark.parametrize("shape,overrides", LEGACY_CASES, ids=["defaults", "switches", "nd-frequency"])
def test_kl_soap_v3_equals_legacy_soap_bit_for_bit(shape, overrides):
    kw = {**BASE, **overrides}
    p0 = torch.randn(shape)
    grads = _grads(shape, 6, dtype=torch.float32)
    p, opt, params = _run(KlSoapV3, p0, grads, **kw)
    q, legacy, legacy_params = _run(SOAP, p0, grads, use_kl_shampoo=True, **kw)
    for a, b in zip(params, legacy_params):
        assert torch.equal(a, b)
    assert set(opt.state[p]) == set(legacy.state[q])
    for key, value in legacy.state[q].items():
        assert torch.equal(opt.state[p][key], value) if isinstance(value, torch.Tensor) else opt.state[p][key] == value


def test_rekls_v3_equals_legacy_rekls_bit_for_bit():
    p0 = torch.randn(4, 7)
    grads = _grads((4, 7), 5, dtype=torch.float32)
    p, opt, params = _run(ReklsV3, p0, grads, **BASE)
    q, legacy, legacy_params = _run(REKLS, p0, grads, **BASE)
    for a, b in zip(params, legacy_params):
        assert torch.equal(a, b)
    for key in KEYS:
        assert torch.equal(opt.state[p][key], legacy.state[q][key]), key


def test_kl_m_soap_is_kl_soap_with_madam_and_eps_only_in_the_factors():
    """KlMSoap == KlSoapV3 whose inner update is MAdam (a reference-style override: betas and step only)."""
    from emerging_optimizers.scalar_optimizers.update_functions import calculate_madam_update

    class KlSoapWithMAdam(KlSoapV3):
        def _scalar_update(self, grad, exp_avg, exp_avg_sq, *, betas, step):
            return calculate_madam_update(grad, exp_avg, exp_avg_sq, betas=betas, correct_bias=True, step=step,
                                          scale_log2=16.0)

    p0 = torch.randn(4, 4)
    grads = _grads((4, 4), 5, dtype=torch.float32)
    p, opt, params = _run(KlMSoap, p0, grads, **BASE)
    q, other, other_params = _run(KlSoapWithMAdam, p0, grads, **BASE)
    for a, b in zip(params, other_params):
        assert torch.equal(a, b)
    # eps only floors the KL eigenvalues (here all far above it): MAdam's steps do not see it, Adam's do
    _, _, madam_eps = _run(KlMSoap, p0, grads, **dict(BASE, eps=1e-4))
    assert torch.equal(madam_eps[-1], params[-1])
    _, _, adam_tiny = _run(KlSoapV3, p0, grads, **BASE)
    _, _, adam_eps = _run(KlSoapV3, p0, grads, **dict(BASE, eps=1e-4))
    assert not torch.equal(adam_tiny[-1], adam_eps[-1])


# ---------------------------------------------------------------------------------------------- preconditioner
@pytest.mark.parametrize("m,n", [(8, 16), (16, 8), (12, 12)])
def test_init_state_layout(m, n):
    state = KlSoapPreconditioner.init_state((m, n), torch.device("cpu"))
    shapes = dict(exp_avg=(m, n), exp_avg_sq=(m, n), L=(m, m), R=(n, n), Q_L=(m, m), Q_R=(n, n), eigvals_L=(m,),
                  eigvals_R=(n,))
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert all(v.dtype == torch.float32 for v in state.values())
    assert torch.equal(state["Q_L"], torch.eye(m)) and torch.equal(state["Q_R"], torch.eye(n))
    with pytest.raises(ValueError, match="only supported for 2D"):
        KlSoapPreconditioner.init_state((2, 3, 4), torch.device("cpu"))


def test_preconditioner_rebinds_what_a_refresh_replaced_and_names_missing_keys():
    state = KlSoapPreconditioner.init_state((6, 4), "cpu")
    pre = KlSoapPreconditioner(state, 1e-8)
    pre.init_step(torch.randn(6, 4), 0.0)
    pre.step(torch.randn(6, 4), 0.95)
    assert state["Q_L"] is not pre.eigenbasis_pair.L
    pre.rebind_state(state)
    assert state["Q_L"] is pre.eigenbasis_pair.L and state["eigvals_R"] is pre.eigvals_pair.R
    assert state["exp_avg"] is pre.exp_avg and state["exp_avg_sq"] is pre.exp_avg_sq
    del state["exp_avg"]
    with pytest.raises(KeyError, match="missing keys.*exp_avg"):
        pre.rebind_state(state)


def test_projections_are_the_basis_change_and_its_inverse():
    state = KlSoapPreconditioner.init_state((5, 3), "cpu", dtype=torch.float64)
    state["Q_L"] = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64)).Q
    state["Q_R"] = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64)).Q
    pre = KlSoapPreconditioner(state, 1e-8)
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(pre.project_in(x), state["Q_L"].T @ x @ state["Q_R"])
    torch.testing.assert_close(pre.project_out(pre.project_in(x)), x)


def test_kl_factors_are_well_conditioned_from_step_one():
    """The reference's first KL update divides by eps (max|L| ~ 1e8); here the factors stay at the gradient's
    scale, whatever eps."""
    g = torch.randn(8, 4)
    for eps in (1e-8, 1e-12):
        p = torch.nn.Parameter(torch.zeros(8, 4))
        opt = KlSoapV3([p], eps=eps)
        p.grad = g.clone()
        opt.step()
        scale = g.square().mean().sqrt().item()
        assert opt.state[p]["L"].abs().max() < 10 * scale
        assert opt.state[p]["R"].abs().max() < 10 * scale


def test_exp_avg_sq_follows_the_resorted_basis():
    """A QR refresh that swaps two eigen-directions carries their second moments along (the reference does not)."""
    state = KlSoapPreconditioner.init_state((2, 2), "cpu", dtype=torch.float64)
    state["L"] = torch.diag(torch.tensor([1.0, 5.0], dtype=torch.float64))  # basis I, but order now reversed
    state["R"] = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    state["exp_avg_sq"] = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    pre = KlSoapPreconditioner(state, 1e-8)
    pre.refresh_eigenbasis(use_eigh=False)
    assert torch.equal(pre.eigvals_pair.L, torch.tensor([5.0, 1.0], dtype=torch.float64))
    assert torch.equal(pre.exp_avg_sq, torch.tensor([[3.0, 4.0], [1.0, 2.0]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- features
def test_rms_clip_bounds_the_update_and_only_scales_it():
    p0 = torch.randn(6, 5, dtype=torch.float64)
    g = _grads((6, 5), 1)
    kw = dict(lr=1.0, weight_decay=0.0)
    _, _, (free,) = _run(KlSoapV3, p0, g, **kw)
    _, _, (clipped,) = _run(KlSoapV3, p0, g, **kw, max_update_rms=0.1)
    u_free, u_clip = p0 - free, p0 - clipped
    assert u_free.square().mean().sqrt() > 0.3  # step 1 in float64: Q_L Q_R^T restricted, rms sqrt(5/30)
    torch.testing.assert_close(u_clip.square().mean().sqrt(), torch.tensor(0.1, dtype=torch.float64), rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(u_clip / u_clip.norm(), u_free / u_free.norm())


def test_precondition_frequency_refreshes_on_its_steps_only():
    p = torch.nn.Parameter(torch.randn(5, 4))
    opt = KlSoapV3([p], precondition_frequency=3)
    after = []
    for g in _grads((5, 4), 7, dtype=torch.float32):
        p.grad = g
        opt.step()
        after.append({k: opt.state[p][k].clone() for k in ("L", "R", "Q_L", "eigvals_R", "exp_avg_sq")})
    for t in range(1, 7):  # 0-based step t refreshes when t % 3 == 0; the factors change every step
        refreshed = t % 3 == 0
        assert torch.equal(after[t]["Q_L"], after[t - 1]["Q_L"]) != refreshed, t
        assert torch.equal(after[t]["eigvals_R"], after[t - 1]["eigvals_R"]) != refreshed, t
        assert not torch.equal(after[t]["L"], after[t - 1]["L"]) and not torch.equal(after[t]["R"], after[t - 1]["R"])


@pytest.mark.parametrize("opt_cls", [KlSoapV3, ReklsV3, KlMSoap])
def test_resume_is_bit_identical(opt_cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Conv1d(5, 3, 1))
    x = torch.randn(4, 6)

    def train(m, o, steps):  # a 3-D conv kernel (3, 5, 1), 2-D and 1-D params
        for _ in range(steps):
            o.zero_grad()
            m[2](m[1](m[0](x)).unsqueeze(-1)).square().mean().backward()
            o.step()

    opt = opt_cls(model.parameters(), lr=0.01, precondition_frequency=2, max_update_rms=1.0)
    train(model, opt, 3)  # stop between two refreshes
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 4)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = copy.deepcopy(model)
    model2.load_state_dict(ckpt["model"])
    opt2 = opt_cls(model2.parameters(), lr=0.5)  # hyperparameters come from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, 4)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["param_groups"] == opt2.state_dict()["param_groups"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_float32_state_through_a_checkpoint(dtype):
    p = torch.nn.Parameter(torch.randn(6, 4).to(dtype))
    b = torch.nn.Parameter(torch.randn(6).to(dtype))
    opt = KlSoapV3([p, b], lr=0.01)
    for g in _grads((6, 4), 3, dtype=torch.float32):
        p.grad, b.grad = g.to(dtype), g[:, 0].to(dtype)
        opt.step()
    assert p.dtype == dtype and torch.isfinite(p).all()
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    opt2 = KlSoapV3([p, b], lr=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(v.dtype == torch.float32 for s in opt2.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def test_nd_params_are_preconditioned_as_out_by_rest():
    w = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    grads = _grads(w.shape, 3)
    p, opt, params = _run(KlSoapV3, w, grads, **BASE)
    q, _, flat = _run(KlSoapV3, w.reshape(4, 12), [g.reshape(4, 12) for g in grads], **BASE)
    assert opt.state[p]["L"].shape == (4, 4) and opt.state[p]["R"].shape == (12, 12)
    assert opt.state[p]["exp_avg"].shape == (4, 12)
    for a, b in zip(params, flat):
        assert torch.equal(a.reshape(4, 12), b)


@pytest.mark.parametrize("opt_cls", [KlSoapV3, KlMSoap])
def test_1d_and_0d_params_get_the_inner_update_alone(opt_cls):
    b0, s0 = torch.randn(5, dtype=torch.float64), torch.randn((), dtype=torch.float64)
    grads = _grads((5,), 4)
    kw = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    b, opt, params = _run(opt_cls, b0, grads, **kw)
    assert set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}
    if opt_cls is KlSoapV3:  # = AdamW
        ref = torch.nn.Parameter(b0.clone())
        adamw = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        for g in grads:
            ref.grad = g.clone()
            adamw.step()
        torch.testing.assert_close(params[-1], ref.detach(), **TOL_F64)
    s, _, _ = _run(opt_cls, s0, [g[0] for g in grads], **kw)
    assert torch.isfinite(s).all() and not torch.equal(s.detach(), s0)


def test_l2_weight_decay_leaves_grad_untouched_and_closure_returns_the_loss():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = KlSoapV3([p], weight_decay=0.5, weight_decay_method="l2")

    def closure():
        opt.zero_grad()
        loss = (p * torch.arange(12.0).reshape(4, 3)).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert loss.requires_grad and torch.equal(p.grad, torch.arange(12.0).reshape(4, 3))


def test_every_hyperparameter_is_per_group_and_survives_state_dict():
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3, 4))
    opt = KlSoapV3([{"params": [a]}, {"params": [b], "eps": 1e-3, "nesterov": True, "max_update_rms": 0.5,
                                     "precondition_frequency": 4, "weight_decay_method": "palm"}])
    g1 = opt.state_dict()["param_groups"][1]
    assert (g1["eps"], g1["nesterov"], g1["max_update_rms"], g1["precondition_frequency"]) == (1e-3, True, 0.5, 4)
    assert opt.eps == 1e-8 and opt.nesterov is False
    opt.max_update_rms = 2.0  # assigning the reference's attribute sets every group
    assert [g["max_update_rms"] for g in opt.param_groups] == [2.0, 2.0]
    with pytest.raises(ValueError, match="precondition_frequency"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))], "precondition_frequency": 0})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("name,value", [
    ("lr", -1.0), ("betas", (0.9, 1.0)), ("betas", (0.9,)), ("shampoo_beta", 1.0), ("eps", 0.0),
    ("weight_decay", -0.1), ("weight_decay_method", "l1"), ("correct_bias", 1), ("max_update_rms", -1.0),
    ("precondition_frequency", 0), ("precondition_frequency", 1.5), ("kl_eigval_floor", -1.0), ("nesterov", "yes"),
])
def test_bad_hyperparameters_raise_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=name.rstrip("s") if name == "betas" else name):
        KlSoapV3([torch.nn.Parameter(torch.randn(2, 2))], **{name: value})


def test_kl_m_soap_rejects_odd_scale_log2_and_has_no_nesterov():
    with pytest.raises(ValueError, match="scale_log2"):
        KlMSoap([torch.nn.Parameter(torch.randn(2, 2))], scale_log2=3)
    with pytest.raises(TypeError):
        KlMSoap([torch.nn.Parameter(torch.randn(2, 2))], nesterov=True)


def test_reference_style_subclasses_work():
    """A custom preconditioner built as PreconditionerCls(state, eps) and a _scalar_update(..., betas, step)."""
    calls = []

    class Plain(KlSoapPreconditioner):
        def __init__(self, state, eps):
            super().__init__(state, eps)
            calls.append(eps)

    class Sgd(SoapBase):
        PreconditionerCls = Plain

        def _scalar_update(self, grad, exp_avg, exp_avg_sq, *, betas, step):
            return grad

    p = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    p0 = p.detach().clone()
    opt = Sgd([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.randn(3, 3, dtype=torch.float64)
    opt.step()
    assert calls == [1e-8]
    torch.testing.assert_close(p.detach(), p0 - 0.1 * p.grad, **TOL_F64)  # projecting in and out is the identity


def test_registry_names_and_matrix_side():
    assert eo.get_optimizer_cls("kl_soap") is KlSoapV3
    assert eo.get_optimizer_cls("rekls_v3") is ReklsV3
    assert eo.get_optimizer_cls("kl_m_soap") is KlMSoap
    assert ReklsV3.PreconditionerCls is ReklsPreconditioner
    assert all(c.matrix_optimizer_ok for c in (KlSoapV3, ReklsV3, KlMSoap))
    assert soap_v3.__all__ == ["KlMSoap", "KlSoapPreconditioner", "KlSoapV3", "ReklsPreconditioner", "ReklsV3",
                               "SoapBase"]
    assert math.isclose(KlSoapV3([torch.nn.Parameter(torch.randn(2, 2))]).defaults["lr"], 3e-3)
