"""PSGDPro and its math (emerging_optimizers.psgd).

The optimizer against a plain float64 reference written here (exact norms and injected noise on both sides),
properties of the pieces (Procrustes step, norm bounds, contractions, whitening), and the contract points of
the module docstring: noise from the state (bit-identical resume, global RNG untouched), diagonal factors,
bf16 with float32 state, no host synchronization, early validation.
"""

from __future__ import annotations

import importlib
import io
import math

import pytest
import torch

import emerging_optimizers as eo
from emerging_optimizers.psgd import PSGDPro, psgd_kron_contractions, psgd_utils
from emerging_optimizers.psgd.procrustes_step import procrustes_step
from emerging_optimizers.psgd.psgd import calculate_psgd_update, kron_factors

psgd_mod = importlib.import_module("emerging_optimizers.psgd.psgd")
procrustes_mod = importlib.import_module("emerging_optimizers.psgd.procrustes_step")

#: float64 optimizer vs float64 reference: only the order of rounding differs.
TOL_F64 = dict(rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------- reference
def _exact_norm(A: torch.Tensor, *args, generator=None, **kwargs) -> torch.Tensor:
    return torch.linalg.matrix_norm(A, ord=2)


def _ref_procrustes(Q: torch.Tensor, max_step: float = 0.125) -> torch.Tensor:
    R = Q.T - Q
    R = R / max(torch.linalg.matrix_norm(R, ord=2).item(), 1e-8)
    t1 = torch.trace(R @ Q).item()
    t2 = torch.trace(R @ R @ Q).item()
    a = min(max(-t1 / t2, 0.0), max_step) if t2 < 0 else max_step
    return Q + a * (R @ Q) + 0.5 * a * a * (R @ R @ Q)


def _ref_psgd(p0, grads, noises, *, lr, weight_decay, momentum, weight_decay_method, beta_lip, precond_lr,
              precond_init_scale, damping_noise_scale, min_precond_lr, warmup_steps, max_update_rms, max_dense_dim):
    """PSGD-Kron-Whiten in float64 with explicit Kronecker matrices and Python-float scalars."""
    p = p0.clone().double()
    shape = tuple(p.shape) or (1,)
    dense = [p.dim() >= 2 and d <= max_dense_dim for d in shape]
    Q = [torch.eye(d, dtype=torch.float64) * precond_init_scale if dn else
         torch.full((d,), precond_init_scale, dtype=torch.float64) for d, dn in zip(shape, dense)]
    L = [1.0] * len(shape)
    m = torch.zeros(shape, dtype=torch.float64)

    def full_P():
        P = torch.ones(1, 1, dtype=torch.float64)
        for q in Q:
            P = torch.kron(P, q.T @ q if q.dim() == 2 else torch.diag(q * q))
        return P

    for t, (g, xi) in enumerate(zip(grads, noises)):
        g = g.double().reshape(shape)
        pv = p.reshape(shape)
        if weight_decay_method == "l2":
            g = g + weight_decay * pv
        else:
            f = {"decoupled": lr * weight_decay, "independent": weight_decay, "palm": lr * lr * weight_decay}
            pv = pv * (1 - f[weight_decay_method])
        m = momentum * m + (1 - momentum) * g
        eta = max(precond_lr / math.sqrt(1 + t / warmup_steps), min_precond_lr)
        h = m + (damping_noise_scale + 1e-7 * m.abs()) * xi.double().reshape(shape)
        pg = (full_P() @ h.reshape(-1)).reshape(shape)
        new_Q = []
        for i, q in enumerate(Q):
            X = torch.movedim(pg, i, 0).reshape(shape[i], -1)
            A = X @ X.T
            N = pg.numel() / shape[i]
            ell = (torch.linalg.eigvalsh(A).max().item() if dense[i] else A.diagonal().max().item()) + N
            L[i] = max(beta_lip * L[i] + (1 - beta_lip) * ell, ell)
            if dense[i]:
                new_Q.append(_ref_procrustes(q - eta / L[i] * (A @ q - N * q)))
            else:
                new_Q.append(q * (1 - eta / L[i] * (A.diagonal() - N)))
        maxima = [q.abs().max().item() for q in new_Q]
        gmean = math.prod(maxima) ** (1 / len(maxima))
        Q = [q * (gmean / mx) for q, mx in zip(new_Q, maxima)] if len(new_Q) > 1 else new_Q
        u = full_P() @ m.reshape(-1)
        if max_update_rms > 0:
            u = u * min(1.0, max_update_rms / (u.square().mean().sqrt().item() + 1e-7))
        p = (pv - lr * u.reshape(shape)).reshape(p.shape)
    return p, m, Q, L


HP = dict(lr=0.05, weight_decay=0.01, momentum=0.9, weight_decay_method="decoupled", beta_lip=0.9, precond_lr=0.1,
          precond_init_scale=1.0, damping_noise_scale=0.1, min_precond_lr=0.01, warmup_steps=10000,
          max_update_rms=0.0, max_dense_dim=8192)

REF_CASES = [
    ((4, 6), {}),
    ((3, 5, 4), dict(max_dense_dim=4, weight_decay_method="l2", weight_decay=0.1, max_update_rms=0.05)),
    ((7,), dict(momentum=0.0, weight_decay_method="independent", precond_init_scale=0.5)),
    ((5, 3), dict(max_dense_dim=0, weight_decay_method="palm", weight_decay=0.5, warmup_steps=2,
                  min_precond_lr=0.04, beta_lip=0.5)),
    ((2, 3, 2, 2), dict(precond_lr=0.3, damping_noise_scale=0.0, lr=0.01)),
    ((), dict(weight_decay=0.0)),
]


@pytest.mark.parametrize("shape,overrides", REF_CASES, ids=[str(s) for s, _ in REF_CASES])
def test_matches_float64_reference(shape, overrides, monkeypatch):
    hp = {**HP, **overrides}
    steps = 5
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0 ** k for k in range(steps)]
    noises = [torch.randn(shape or (1,), generator=gen, dtype=torch.float64) for _ in range(steps)]
    drawn = iter(noises)
    monkeypatch.setattr(psgd_mod, "_draw_noise", lambda like, generator: next(drawn).reshape(like.shape))
    monkeypatch.setattr(psgd_mod, "norm_lower_bound_spd", _exact_norm)
    monkeypatch.setattr(procrustes_mod, "norm_lower_bound_skew", _exact_norm)

    p = torch.nn.Parameter(p0.clone())
    opt = PSGDPro([p], **hp)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref_p, ref_m, ref_Q, ref_L = _ref_psgd(p0, grads, noises, **hp)
    state = opt.state[p]
    Q, L = kron_factors(state)
    assert state["step"] == steps
    torch.testing.assert_close(p.detach(), ref_p, **TOL_F64)
    torch.testing.assert_close(state["exp_avg"].reshape(ref_m.shape), ref_m, **TOL_F64)
    assert [q.shape for q in Q] == [q.shape for q in ref_Q]
    for q, rq, lv, rl in zip(Q, ref_Q, L, ref_L):
        torch.testing.assert_close(q, rq, **TOL_F64)
        torch.testing.assert_close(lv, torch.tensor(rl, dtype=torch.float64), **TOL_F64)


def test_l2_weight_decay_leaves_grad_untouched():
    p = torch.nn.Parameter(torch.randn(3, 4))
    g = torch.randn(3, 4)
    p.grad = g.clone()
    PSGDPro([p], weight_decay=0.1, weight_decay_method="l2").step()
    assert torch.equal(p.grad, g)


# ---------------------------------------------------------------------------------------------- Procrustes
def _near_spd(n: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    B = torch.randn(n, n, generator=gen, dtype=torch.float64)
    S = B @ B.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    K = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return S + skew * (K - K.T)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("n", [2, 8, 32])
def test_procrustes_keeps_spd_part_and_reduces_skew_part(order, n):
    gen = torch.Generator().manual_seed(n)
    Q = _near_spd(n, 0.05, gen)
    P0 = Q.T @ Q
    skew0 = torch.linalg.matrix_norm(Q - Q.T)
    for _ in range(10):
        Q = procrustes_step(Q, order=order, generator=gen)
        assert torch.linalg.eigvalsh(0.5 * (Q + Q.T)).min() > 0
    assert torch.linalg.matrix_norm(Q - Q.T) < 0.5 * skew0
    # a rotation: Q^T Q (the preconditioner) barely moves
    assert torch.linalg.matrix_norm(Q.T @ Q - P0) < 0.05 * torch.linalg.matrix_norm(P0)


@pytest.mark.parametrize("order", [2, 3])
def test_procrustes_on_symmetric_q_is_a_no_op(order):
    Q = _near_spd(5, 0.0, torch.Generator().manual_seed(0))
    out = procrustes_step(Q, order=order)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, Q)


def test_procrustes_rejects_bad_order():
    with pytest.raises(ValueError, match="order must be 2 or 3.*4"):
        procrustes_step(torch.eye(3), order=4)


# ---------------------------------------------------------------------------------------------- norm bounds
@pytest.mark.parametrize("n", [3, 16, 100])
def test_norm_lower_bounds_are_tight_lower_bounds(n):
    gen = torch.Generator().manual_seed(n)
    for _ in range(3):
        B = torch.randn(n, n, generator=gen)
        spd = B @ B.T + 1e-3 * torch.eye(n)
        skew = B - B.T
        for fn, A in ((psgd_utils.norm_lower_bound_spd, spd), (psgd_utils.norm_lower_bound_skew, skew)):
            true = torch.linalg.matrix_norm(A.double(), ord=2).item()
            bound = fn(A, generator=gen).item()
            assert 0.5 * true <= bound <= true * (1 + 1e-5), (fn.__name__, bound, true)
    for fn in (psgd_utils.norm_lower_bound_spd, psgd_utils.norm_lower_bound_skew):
        assert fn(torch.zeros(4, 4)).item() == 0.0


def test_norm_lower_bound_is_deterministic_given_a_generator_and_spares_the_global_rng():
    A = torch.randn(20, 20)
    A = A @ A.T
    rng = torch.get_rng_state()
    a = psgd_utils.norm_lower_bound_spd(A, generator=torch.Generator().manual_seed(5))
    b = psgd_utils.norm_lower_bound_spd(A, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(rng, torch.get_rng_state())


def test_uniformize_balances_maxima_and_keeps_the_kronecker_product():
    Qs = [torch.randn(3, 3) * 10, torch.randn(4) * 0.01, torch.randn(2, 2)]
    before = torch.kron(torch.kron(Qs[0], torch.diag(Qs[1])), Qs[2])
    gmean = math.prod(q.abs().max().item() for q in Qs) ** (1 / 3)
    psgd_utils.uniformize_q_in_place(Qs)
    for q in Qs:
        assert q.abs().max().item() == pytest.approx(gmean, rel=1e-5)
    after = torch.kron(torch.kron(Qs[0], torch.diag(Qs[1])), Qs[2])
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError):
        psgd_utils.uniformize_q_in_place([])


# ---------------------------------------------------------------------------------------------- contractions
def test_contractions_match_einsum_and_kron():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    Y = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    for axis, spec in enumerate(["aij,bij->ab", "iaj,ibj->ab", "ija,ijb->ab"]):
        torch.testing.assert_close(psgd_kron_contractions.partial_contraction(X, Y, axis), torch.einsum(spec, X, Y))
    v = torch.randn(5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(psgd_kron_contractions.partial_contraction(v, v, 0), torch.outer(v, v))

    Qs = [torch.randn(2, 2, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64),
          torch.randn(4, 4, generator=gen, dtype=torch.float64)]
    dense = [q if q.dim() == 2 else torch.diag(q) for q in Qs]
    K = torch.kron(torch.kron(dense[0], dense[1]), dense[2])
    torch.testing.assert_close(psgd_kron_contractions.apply_kronecker_factors(Qs, X).reshape(-1), K @ X.reshape(-1))
    torch.testing.assert_close(psgd_kron_contractions.apply_preconditioner(Qs, X).reshape(-1),
                               K.T @ K @ X.reshape(-1))
    with pytest.raises(ValueError, match="Number of Kronecker factors 1 must match.*3"):
        psgd_kron_contractions.apply_kronecker_factors(Qs[:1], X)


# ---------------------------------------------------------------------------------------------- whitening
def _spd(d: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    U = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    return U @ torch.diag(torch.logspace(0, math.log10(cond), d, dtype=torch.float64)) @ U.T


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2, 2)])
def test_preconditioner_whitens_a_gaussian_gradient(shape):
    """g ~ N(0, C), C = C_1 x ... x C_n; with lr=0 and momentum=0 only P learns: P C P -> I."""
    gen = torch.Generator().manual_seed(0)
    covs = [_spd(d, 10.0, gen) for d in shape]
    chols = [torch.linalg.cholesky(c) for c in covs]
    C = covs[0]
    for c in covs[1:]:
        C = torch.kron(C, c)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = PSGDPro([p], lr=0.0, momentum=0.0, weight_decay=0.0, damping_noise_scale=0.0, precond_lr=0.1,
                  min_precond_lr=0.003, warmup_steps=10)
    for _ in range(1500):
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        for i, chol in enumerate(chols):
            g = torch.movedim(torch.tensordot(chol, g, dims=([1], [i])), 0, i)
        p.grad = g.float()
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(shape))
    P = torch.ones(1, 1, dtype=torch.float64)
    for q in kron_factors(opt.state[p])[0]:
        P = torch.kron(P, q.double().T @ q.double())
    ev = torch.linalg.eigvalsh(P @ C @ P)
    assert torch.linalg.cond(C) >= 99  # the gradient is far from white ...
    assert 0.75 < ev.min() and ev.max() < 1.3, ev  # ... its whitened version is close (the scale is fixed to 1)


# ---------------------------------------------------------------------------------------------- state, RNG, resume
def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _batch(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=gen)
    return x.to(dtype), torch.tanh(x @ torch.randn(6, 3, generator=gen)).to(dtype)


def _train(model, opt, steps, dtype=torch.float32, reseed_global=None):
    x, y = _batch(dtype)
    losses = []
    for k in range(steps):
        if reseed_global is not None:
            torch.manual_seed(reseed_global + k)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_states_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for pid, st in sa["state"].items():
        assert st.keys() == sb["state"][pid].keys()
        for k, v in st.items():
            w = sb["state"][pid][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (pid, k)


def test_resume_is_bit_identical_including_noise():
    model = _model()
    opt = PSGDPro(model.parameters(), lr=0.02, seed=7)
    _train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = PSGDPro(resumed.parameters(), lr=0.5, seed=123)  # both come back from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, 3, reseed_global=99)  # the global RNG plays no part
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    _assert_states_equal(opt, opt2)


def test_precond_update_every_fits_on_its_steps_only_and_resumes_bit_identically():
    model, ref_model = _model(), _model()
    ref_model.load_state_dict(model.state_dict())
    opt = PSGDPro(model.parameters(), lr=0.02, seed=3, precond_update_every=3)
    every = PSGDPro(ref_model.parameters(), lr=0.02, seed=3)
    _train(model, opt, 1)
    _train(ref_model, every, 1)  # step 0 fits in both: the same numbers
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    def factors():
        return {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()
                if k.startswith("Q_")}

    fitted = factors()
    _train(model, opt, 2)  # steps 1 and 2 apply the preconditioner of step 0
    assert all(torch.equal(fitted[k], v) for k, v in factors().items())
    _train(model, opt, 1)  # step 3 fits again
    assert any(not torch.equal(fitted[k], v) for k, v in factors().items())
    # resume across a non-fitting step
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 4)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = PSGDPro(resumed.parameters())
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, 4)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_noise_depends_on_the_seed_only():
    runs = {}
    for label, seed, reseed in (("a", 1, None), ("b", 1, 1234), ("c", 2, None)):
        model = _model()
        opt = PSGDPro(model.parameters(), lr=0.02, seed=seed)
        _train(model, opt, 2, reseed_global=reseed)
        runs[label] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(runs["a"], runs["b"]))
    assert not all(torch.equal(a, c) for a, c in zip(runs["a"], runs["c"]))  # so the resume test is not vacuous


def test_step_leaves_the_global_rng_untouched():
    model = _model()
    opt = PSGDPro(model.parameters())
    x, y = _batch()
    torch.nn.functional.mse_loss(model(x), y).backward()
    before = torch.get_rng_state()
    opt.step()
    opt.step()
    assert torch.equal(before, torch.get_rng_state())


def test_default_seed_follows_torch_manual_seed():
    torch.manual_seed(11)
    a = PSGDPro([torch.nn.Parameter(torch.zeros(2))]).param_groups[0]["seed"]
    torch.manual_seed(12)
    b = PSGDPro([torch.nn.Parameter(torch.zeros(2))]).param_groups[0]["seed"]
    assert (a, b) == (11, 12)


def test_every_hyperparameter_is_per_group_and_survives_state_dict():
    model = _model()
    opt = PSGDPro([{"params": model[0].parameters(), "max_update_rms": 0.1, "damping_noise_scale": 0.0},
                   {"params": model[2].parameters(), "precond_init_scale": 2.0, "seed": 5}], lr=0.02)
    _train(model, opt, 1)
    keys = {"lr", "weight_decay", "momentum", "weight_decay_method", "beta_lip", "precond_lr", "precond_init_scale",
            "damping_noise_scale", "min_precond_lr", "warmup_steps", "max_update_rms", "max_dense_dim", "seed"}
    for group in opt.state_dict()["param_groups"]:
        assert keys <= set(group)
    assert opt.param_groups[1]["seed"] == 5 and opt.param_groups[1]["precond_init_scale"] == 2.0
    assert opt.max_update_rms == 0.0  # the constructor's value, as the reference's attribute
    opt.max_update_rms = 0.3  # assigning sets every group
    assert [g["max_update_rms"] for g in opt.param_groups] == [0.3, 0.3]


def test_closure_returns_the_loss():
    model = _model()
    opt = PSGDPro(model.parameters(), lr=0.02)
    x, y = _batch()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    second = opt.step(closure)
    assert second.item() < first.item()


# ---------------------------------------------------------------------------------------------- shapes, dtypes
def test_bf16_params_keep_float32_state_through_a_checkpoint():
    model = _model(torch.bfloat16)
    opt = PSGDPro(model.parameters(), lr=0.02)
    losses = _train(model, opt, 20, dtype=torch.bfloat16)
    assert losses[-1] < 0.7 * losses[0], losses[::5]
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    opt2 = PSGDPro(model.parameters())
    opt2.load_state_dict(opt.state_dict())
    assert all(v.dtype == torch.float32 for s in opt2.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    _assert_states_equal(opt, opt2)


def test_fp16_and_scalar_params():
    half = torch.nn.Parameter(torch.randn(3, 4).half())
    scalar = torch.nn.Parameter(torch.tensor(2.0))
    opt = PSGDPro([half, scalar], lr=0.01)
    for _ in range(3):
        half.grad = torch.randn(3, 4).half()
        scalar.grad = torch.tensor(0.5)
        opt.step()
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert opt.state[half]["Q_0"].dtype == torch.float32
    assert opt.state[scalar]["Q_0"].shape == (1,) and scalar.item() < 2.0  # a size-1 diagonal factor


def test_large_and_1d_dimensions_get_diagonal_factors():
    bias = torch.nn.Parameter(torch.zeros(4096))
    wide = torch.nn.Parameter(torch.zeros(2, 8193))
    small = torch.nn.Parameter(torch.zeros(3, 10))
    opt = PSGDPro([{"params": [bias, wide]}, {"params": [small], "max_dense_dim": 5}])
    for p in (bias, wide, small):
        p.grad = torch.randn_like(p)
    opt.step()
    shapes = {id(p): [q.shape for q in kron_factors(opt.state[p])[0]] for p in (bias, wide, small)}
    assert shapes[id(bias)] == [(4096,)]
    assert shapes[id(wide)] == [(2, 2), (8193,)]
    assert shapes[id(small)] == [(3, 3), (10,)]
    assert max(q.numel() for s in opt.state.values() for q in kron_factors(s)[0]) == 8193  # no d x d for d > 8192


def test_update_needs_no_host_synchronization():
    """The pure update runs on the meta device, where any .item() or bool(tensor) raises."""
    shape = (3, 4, 5)
    m = torch.zeros(shape, device="meta")
    Q = [torch.eye(3, device="meta"), torch.ones(4, device="meta"), torch.eye(5, device="meta")]
    L = [torch.ones((), device="meta") for _ in Q]
    u = calculate_psgd_update(torch.zeros(shape, device="meta"), m, Q, L, torch.zeros(shape, device="meta"),
                              momentum=0.9, precond_lr=0.1, beta_lip=0.9, damping_noise_scale=0.1, max_update_rms=1.0)
    assert u.shape == shape
    for order in (2, 3):
        assert procrustes_step(torch.eye(4, device="meta"), order=order).shape == (4, 4)


# ---------------------------------------------------------------------------------------------- validation, wiring
@pytest.mark.parametrize("name,value", [
    ("lr", -1.0), ("weight_decay", -0.1), ("momentum", 1.0), ("beta_lip", -0.1), ("precond_lr", -1.0),
    ("precond_init_scale", 0.0), ("damping_noise_scale", float("nan")), ("min_precond_lr", -0.1),
    ("warmup_steps", 0), ("max_update_rms", -1.0), ("max_dense_dim", -1), ("max_dense_dim", 2.5), ("seed", "x"),
    ("precond_update_every", 0), ("precond_update_every", 1.5),
    ("weight_decay_method", "foo"),
])
def test_bad_hyperparameters_raise_naming_the_argument(name, value):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=name):
        PSGDPro([p], **{name: value})
    opt = PSGDPro([p])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], name: value})
    assert len(opt.param_groups) == 1


def test_registry_and_reference_layout():
    assert eo.get_optimizer_cls("psgd_pro") is PSGDPro
    from emerging_optimizers.psgd.psgd import PSGDPro as again

    assert again is PSGDPro
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = PSGDPro([p], 0.1, 0.0, 0.5)  # positional order of the reference: lr, weight_decay, momentum
    assert (opt.defaults["lr"], opt.defaults["weight_decay"], opt.defaults["momentum"]) == (0.1, 0.0, 0.5)


def test_usable_as_muon_adamw_matrix_side():
    model = _model()
    opt = eo.MuonAdamW(model.named_parameters(), matrix_optimizer="psgd_pro", lr=0.02)
    losses = _train(model, opt, 15)
    assert losses[-1] < losses[0]
