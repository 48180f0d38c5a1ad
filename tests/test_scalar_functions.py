"""Each documented update function against an independent float64 reference written from SPEC.md's formulas.

Every case runs several steps with the same state tensors, checks the returned update, the state updated
in place (same tensor objects) and that ``grad`` is untouched. Inputs are float64, so the only differences
are rounding of the same formulas written differently: tolerance 1e-12 relative.
"""

import itertools
import math

import pytest
import torch

from emerging_optimizers.scalar_optimizers import (
    calculate_adam_update,
    calculate_ademamix_update,
    calculate_laprop_update,
    calculate_lion_update,
    calculate_madam_update,
    calculate_rmsprop_update,
    calculate_signum_update,
    calculate_sim_ademamix_update,
)

RTOL, ATOL = 1e-12, 1e-14
STEPS = 6
SHAPE = (5, 7)


def grads(n=STEPS, shape=SHAPE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def run(fn_call, ref_call, state, ref_state):
    """Drive ``fn_call(g, t)`` and ``ref_call(g, t)`` (both return the update) and compare everything."""
    ids = [id(s) for s in state]
    for t, g in enumerate(grads(), start=1):
        g_copy = g.clone()
        u = fn_call(g, t)
        u_ref = ref_call(g.clone(), t)
        assert torch.equal(g, g_copy), "grad was modified"
        close(u, u_ref)
        for s, r in zip(state, ref_state):
            close(s, r)
    assert [id(s) for s in state] == ids


def half_life_beta(t, b_start, b_end, n):
    if n is None or t >= n:
        return b_end
    h = lambda b: math.log(0.5) / math.log(b + 1e-8) - 1  # noqa: E731
    a = t / n
    return 0.5 ** (1 / ((1 - a) * h(b_start) + a * h(b_end) + 1))


@pytest.mark.parametrize("correct_bias,nesterov", itertools.product([True, False], [True, False]))
@pytest.mark.parametrize("betas,eps", [((0.9, 0.999), 1e-8), ((0.5, 0.9), 1e-3)])
def test_adam(correct_bias, nesterov, betas, eps):
    b1, b2 = betas
    m, v = torch.zeros(SHAPE, dtype=torch.float64), torch.zeros(SHAPE, dtype=torch.float64)
    rm, rv = m.clone(), v.clone()

    def ref(g, t):
        rm.copy_(b1 * rm + (1 - b1) * g)
        rv.copy_(b2 * rv + (1 - b2) * g * g)
        bc1 = 1 - b1**t if correct_bias else 1
        bc2 = 1 - b2**t if correct_bias else 1
        bcn = 1 - b1 ** (t + 1) if correct_bias else 1
        mh = b1 * rm / bcn + (1 - b1) * g / bc1 if nesterov else rm / bc1
        return mh / ((rv / bc2).sqrt() + eps)

    run(lambda g, t: calculate_adam_update(g, m, v, betas, correct_bias, nesterov, t, eps), ref, [m, v], [rm, rv])


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("beta_warmup,alpha_warmup", [(None, None), (4, None), (None, 3), (10, 10)])
@pytest.mark.parametrize("alpha", [2, 5.0])
def test_ademamix(correct_bias, beta_warmup, alpha_warmup, alpha):
    betas = (0.9, 0.999, 0.9999)
    bf, b2, bs_final = betas
    mf, ms, v = (torch.zeros(SHAPE, dtype=torch.float64) for _ in range(3))
    rf, rs, rv = mf.clone(), ms.clone(), v.clone()

    def ref(g, t):
        a_t = alpha if alpha_warmup is None or t >= alpha_warmup else t / alpha_warmup * alpha
        bs = half_life_beta(t, bf, bs_final, beta_warmup)
        rf.copy_(bf * rf + (1 - bf) * g)
        rs.copy_(bs * rs + (1 - bs) * g)
        rv.copy_(b2 * rv + (1 - b2) * g * g)
        bc1 = 1 - bf**t if correct_bias else 1
        bc2 = 1 - b2**t if correct_bias else 1
        return (rf / bc1 + a_t * rs) / ((rv / bc2).sqrt() + 1e-8)

    def fn(g, t):
        return calculate_ademamix_update(g, mf, ms, v, beta_warmup, alpha_warmup, betas, t, 1e-8, correct_bias, alpha)

    run(fn, ref, [mf, ms, v], [rf, rs, rv])


def test_ademamix_default_alpha_is_2():
    g = grads(1)[0]
    a = [torch.zeros(SHAPE, dtype=torch.float64) for _ in range(3)]
    b = [torch.zeros(SHAPE, dtype=torch.float64) for _ in range(3)]
    u1 = calculate_ademamix_update(g, *a, None, None, (0.9, 0.999, 0.9999), 1, 1e-8, True)
    u2 = calculate_ademamix_update(g, *b, None, None, (0.9, 0.999, 0.9999), 1, 1e-8, True, 2)
    assert torch.equal(u1, u2)


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("warmup", [None, 4])
@pytest.mark.parametrize("alpha", [2, 0.5])
def test_sim_ademamix(correct_bias, warmup, alpha):
    betas, min_bf = (0.99, 0.999), 0.9
    m, v = torch.zeros(SHAPE, dtype=torch.float64), torch.zeros(SHAPE, dtype=torch.float64)
    rm, rv = m.clone(), v.clone()

    def ref(g, t):
        bf = half_life_beta(t, min_bf, betas[0], warmup)
        rm.copy_(bf * rm + g)
        rv.copy_(betas[1] * rv + (1 - betas[1]) * g * g)
        bc1 = (1 - bf**t) / (1 - bf) if correct_bias else 1
        bc2 = 1 - betas[1] ** t if correct_bias else 1
        return (alpha * g + rm / bc1) / ((rv / bc2).sqrt() + 1e-8)

    def fn(g, t):
        return calculate_sim_ademamix_update(g, m, v, warmup, min_bf, betas, t, 1e-8, correct_bias, alpha)

    run(fn, ref, [m, v], [rm, rv])


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("betas,eps", [((0.9, 0.999), 1e-8), ((0.6, 0.95), 1e-2)])
def test_laprop(correct_bias, betas, eps):
    b1, b2 = betas
    m, v = torch.zeros(SHAPE, dtype=torch.float64), torch.zeros(SHAPE, dtype=torch.float64)
    rm, rv = m.clone(), v.clone()

    def ref(g, t):
        bc1 = 1 - b1**t if correct_bias else 1
        bc2 = 1 - b2**t if correct_bias else 1
        rv.copy_(b2 * rv + (1 - b2) * g * g)
        rm.copy_(b1 * rm + (1 - b1) * g / ((rv / bc2).sqrt() + eps))
        return rm / bc1

    run(lambda g, t: calculate_laprop_update(g, m, v, correct_bias, betas, t, eps), ref, [m, v], [rm, rv])


@pytest.mark.parametrize("b1,b2", [(0.9, None), (0.9, 0.99), (0.5, 0.0)])
def test_lion(b1, b2):
    m = torch.zeros(SHAPE, dtype=torch.float64)
    rm = m.clone()
    beta2 = b1 if b2 is None else b2

    def ref(g, t):
        u = torch.sign(b1 * rm + (1 - b1) * g)
        rm.copy_(beta2 * rm + (1 - beta2) * g)
        return u

    run(lambda g, t: calculate_lion_update(g, m, b1, b2), ref, [m], [rm])


@pytest.mark.parametrize("correct_bias,nesterov,shape_scaling", itertools.product([True, False], repeat=3))
@pytest.mark.parametrize("beta", [0.9, 0.0])
def test_signum(correct_bias, nesterov, shape_scaling, beta):
    m = torch.zeros(SHAPE, dtype=torch.float64)
    rm = m.clone()
    scale = 2 / (SHAPE[0] + SHAPE[1]) if shape_scaling else 1

    def ref(g, t):
        rm.copy_(beta * rm + (1 - beta) * g)
        bc1 = 1 - beta**t if correct_bias else 1
        bcn = 1 - beta ** (t + 1) if correct_bias else 1
        mh = beta * rm / bcn + (1 - beta) * g / bc1 if nesterov else rm / bc1
        return torch.sign(mh) * scale

    run(lambda g, t: calculate_signum_update(g, m, beta, correct_bias, nesterov, t, shape_scaling), ref, [m], [rm])


def test_signum_shape_scaling_needs_2d():
    with pytest.raises(ValueError, match="use_shape_scaling needs a 2-D parameter"):
        calculate_signum_update(torch.ones(3), torch.zeros(3), 0.9, True, False, 1, use_shape_scaling=True)


@pytest.mark.parametrize("alpha,eps", [(0.99, 1e-8), (0.5, 1e-2)])
def test_rmsprop(alpha, eps):
    v = torch.zeros(SHAPE, dtype=torch.float64)
    rv = v.clone()

    def ref(g, t):
        rv.copy_(alpha * rv + (1 - alpha) * g * g)
        return g / (rv.sqrt() + eps)

    run(lambda g, t: calculate_rmsprop_update(g, v, alpha, eps, t), ref, [v], [rv])


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("scale_log2", [0, 16, -4])
def test_madam(correct_bias, scale_log2):
    b1, b2 = 0.9, 0.99
    m, v = torch.zeros(SHAPE, dtype=torch.float64), torch.zeros(SHAPE, dtype=torch.float64)
    rm, rv = m.clone(), v.clone()
    s = 2.0**scale_log2

    def ref(g, t):
        g = g.clone()
        g[0, 0] = 0.0  # an exactly-zero moment entry must give a zero update, not 0/0
        rm.copy_(b1 * rm + (1 - b1) * g)
        rv.copy_(b2 * rv + (1 - b2) * s * g * g)
        bc1 = 1 - b1**t if correct_bias else 1
        bc2 = 1 - b2**t if correct_bias else 1
        u = math.sqrt(s) * (rm / bc1) / (rv / bc2).sqrt()
        return torch.where(rm == 0, torch.zeros_like(u), u)

    def fn(g, t):
        g[0, 0] = 0.0
        return calculate_madam_update(g, m, v, (b1, b2), correct_bias, t, scale_log2)

    for t, g in enumerate(grads(), start=1):
        u = fn(g, t)
        close(u, ref(g, t))
        close(m, rm)
        close(v, rv)
        assert torch.isfinite(u).all()


def test_madam_equals_adam_with_zero_eps():
    g_list = grads()
    m1, v1, m2, v2 = (torch.zeros(SHAPE, dtype=torch.float64) for _ in range(4))
    for t, g in enumerate(g_list, start=1):
        u1 = calculate_madam_update(g, m1, v1, (0.9, 0.999), True, t, 16)
        u2 = calculate_adam_update(g, m2, v2, (0.9, 0.999), True, False, t, 0.0)
        close(u1, u2)


def test_madam_rejects_odd_scale():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="scale_log2"):
        calculate_madam_update(z, z.clone(), z.clone(), (0.9, 0.999), True, 1, 3)


def test_functions_importable_from_submodules():
    from emerging_optimizers.scalar_optimizers.adam import calculate_adam_update as a
    from emerging_optimizers.scalar_optimizers.ademamix import calculate_ademamix_update as b
    from emerging_optimizers.scalar_optimizers.ademamix import calculate_sim_ademamix_update as c
    from emerging_optimizers.scalar_optimizers.laprop import calculate_laprop_update as d
    from emerging_optimizers.scalar_optimizers.lion import calculate_lion_update as e
    from emerging_optimizers.scalar_optimizers.signum import calculate_signum_update as f

    assert (a, b, c, d, e, f) == (calculate_adam_update, calculate_ademamix_update, calculate_sim_ademamix_update,
                                  calculate_laprop_update, calculate_lion_update, calculate_signum_update)


def test_spec_signatures():
    """Argument names and order are the documented contract (SPEC.md section 1)."""
    import inspect

    expected = {
        calculate_adam_update: "grad exp_avg exp_avg_sq betas correct_bias use_nesterov step eps",
        calculate_ademamix_update: "grad exp_avg_fast exp_avg_slow exp_avg_sq num_beta_slow_warmup_steps "
        "num_alpha_warmup_steps betas step eps correct_bias alpha",
        calculate_laprop_update: "grad exp_avg exp_avg_sq correct_bias betas step eps",
        calculate_lion_update: "grad exp_avg momentum_beta momentum_beta2",
        calculate_signum_update: "grad exp_avg momentum_beta correct_bias use_nesterov step use_shape_scaling",
        calculate_sim_ademamix_update: "grad exp_avg exp_avg_sq num_beta_fast_warmup_steps min_beta_fast betas step "
        "eps correct_bias alpha",
    }
    for fn, names in expected.items():
        assert " ".join(inspect.signature(fn).parameters) == names
    assert inspect.signature(calculate_ademamix_update).parameters["alpha"].default == 2
    assert inspect.signature(calculate_lion_update).parameters["momentum_beta2"].default is None
    assert inspect.signature(calculate_signum_update).parameters["use_shape_scaling"].default is False
