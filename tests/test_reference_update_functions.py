"""The reference library's API on top of ours: ``scalar_optimizers.update_functions`` and the base classes
``SingleMomentumOptimizer`` / ``TwoMomentsOptimizer``.

The keyword-only functions must give the same numbers as the documented ones (they call the same kernels),
so every comparison here is ``torch.equal``: same update, same state afterwards, ``grad`` untouched. Optimizers
written the reference's way (update function + ``update_kwarg_names``) must equal our own classes.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import pytest
import torch

import emerging_optimizers.scalar_optimizers.update_functions as uf
from emerging_optimizers.scalar_optimizers import (
    LaProp,
    Lion,
    Signum,
    SimplifiedAdEMAMix,
    SingleMomentumOptimizer,
    TwoMomentsOptimizer,
    calculate_adam_update,
    calculate_ademamix_update,
    calculate_laprop_update,
    calculate_lion_update,
    calculate_madam_update,
    calculate_rmsprop_update,
    calculate_signum_update,
    calculate_sim_ademamix_update,
)
from emerging_optimizers.scalar_optimizers import _schedulers as ours_sched
from emerging_optimizers.scalar_optimizers.base import _validate_common_hparams
from emerging_optimizers.scalar_optimizers.update_functions import _schedulers as ref_sched

STEPS = 5
SHAPE = (6, 5)
DTYPES = [torch.float32, torch.bfloat16]


# --------------------------------------------------------------------------------------------------------------
# Each case: (id, number of state tensors, reference-style call, documented call); a call is f(grad, state, t).
# --------------------------------------------------------------------------------------------------------------


def adam(cb, nesterov, betas=(0.9, 0.999), eps=1e-8):
    return (lambda g, s, t: uf.calculate_adam_update(g, *s, betas=betas, eps=eps, correct_bias=cb, nesterov=nesterov,
                                                     step=t),
            lambda g, s, t: calculate_adam_update(g, *s, betas, cb, nesterov, t, eps))


def ademamix(cb, n_beta, n_alpha, alpha=None, betas=(0.9, 0.999, 0.9999), eps=1e-8):
    extra = {} if alpha is None else {"alpha": alpha}
    return (lambda g, s, t: uf.calculate_ademamix_update(g, *s, betas=betas, eps=eps, correct_bias=cb, step=t,
                                                         num_beta_slow_warmup_steps=n_beta,
                                                         num_alpha_warmup_steps=n_alpha, **extra),
            lambda g, s, t: calculate_ademamix_update(g, *s, n_beta, n_alpha, betas, t, eps, cb, **extra))


def sim_ademamix(cb, n_beta, min_beta_fast=0.9, alpha=None, betas=(0.99, 0.999), eps=1e-8):
    extra = {} if alpha is None else {"alpha": alpha}
    return (lambda g, s, t: uf.calculate_sim_ademamix_update(g, *s, betas=betas, eps=eps, correct_bias=cb, step=t,
                                                             num_beta_fast_warmup_steps=n_beta,
                                                             min_beta_fast=min_beta_fast, **extra),
            lambda g, s, t: calculate_sim_ademamix_update(g, *s, n_beta, min_beta_fast, betas, t, eps, cb, **extra))


def laprop(cb, betas=(0.9, 0.999), eps=1e-8):
    return (lambda g, s, t: uf.calculate_laprop_update(g, *s, betas=betas, eps=eps, correct_bias=cb, step=t),
            lambda g, s, t: calculate_laprop_update(g, *s, cb, betas, t, eps))


def lion(betas):
    return (lambda g, s, t: uf.calculate_lion_update(g, *s, betas=betas, step=t),
            lambda g, s, t: calculate_lion_update(g, *s, betas[0], betas[1]))


def madam(cb, scale_log2, betas=(0.9, 0.999)):
    return (lambda g, s, t: uf.calculate_madam_update(g, *s, betas=betas, correct_bias=cb, step=t,
                                                      scale_log2=scale_log2),
            lambda g, s, t: calculate_madam_update(g, *s, betas, cb, t, int(scale_log2)))


def rmsprop(alpha, eps, pass_step):
    return (lambda g, s, t: uf.calculate_rmsprop_update(g, *s, alpha=alpha, eps=eps,
                                                        **({"step": t} if pass_step else {})),
            lambda g, s, t: calculate_rmsprop_update(g, *s, alpha, eps))


def signum(momentum, cb, nesterov, shape_scaling=None):
    extra = {} if shape_scaling is None else {"use_shape_scaling": shape_scaling}
    return (lambda g, s, t: uf.calculate_signum_update(g, *s, momentum=momentum, correct_bias=cb, nesterov=nesterov,
                                                       step=t, **extra),
            lambda g, s, t: calculate_signum_update(g, *s, momentum, cb, nesterov, t, **extra))


CASES = [
    *[(f"adam-cb{cb}-nesterov{n}", 2, adam(cb, n)) for cb in (True, False) for n in (True, False)],
    ("adam-betas", 2, adam(True, False, betas=(0.5, 0.75), eps=1e-3)),
    ("ademamix-plain", 3, ademamix(True, None, None)),
    ("ademamix-warmups", 3, ademamix(True, 3, 4, alpha=5.0)),
    ("ademamix-nocb-beta-warmup", 3, ademamix(False, 2, None, alpha=0.5)),
    ("ademamix-alpha-warmup-only", 3, ademamix(True, None, 10)),
    ("sim_ademamix-plain", 2, sim_ademamix(True, None)),
    ("sim_ademamix-warmup", 2, sim_ademamix(True, 3, min_beta_fast=0.8, alpha=0.5)),
    ("sim_ademamix-nocb", 2, sim_ademamix(False, 10, alpha=0.0)),
    *[(f"laprop-cb{cb}", 2, laprop(cb)) for cb in (True, False)],
    ("lion-default", 1, lion((0.9, 0.99))),
    ("lion-equal-betas", 1, lion((0.95, 0.95))),
    ("madam-16", 2, madam(True, 16)),
    ("madam-16.0", 2, madam(True, 16.0)),
    ("madam-8-nocb", 2, madam(False, 8)),
    ("madam-0", 2, madam(True, 0)),
    ("rmsprop-step", 1, rmsprop(0.99, 1e-8, True)),
    ("rmsprop-nostep", 1, rmsprop(0.9, 1e-4, False)),
    *[(f"signum-cb{cb}-nesterov{n}", 1, signum(0.9, cb, n)) for cb in (True, False) for n in (True, False)],
    ("signum-shape-scaling", 1, signum(0.5, True, True, shape_scaling=True)),
    ("signum-no-shape-scaling", 1, signum(0.99, False, False, shape_scaling=False)),
    ("signum-momentum0", 1, signum(0.0, True, False)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_state,calls", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_same_numbers_as_documented_function(n_state, calls, dtype):
    ref_call, doc_call = calls
    gen = torch.Generator().manual_seed(0)
    ref_state = [torch.zeros(SHAPE, dtype=dtype) for _ in range(n_state)]
    doc_state = [s.clone() for s in ref_state]
    ids = [id(s) for s in ref_state]
    for t in range(1, STEPS + 1):
        g = torch.randn(SHAPE, generator=gen).to(dtype)
        g[0, 0] = 0.0  # a zero gradient entry: sign(0), MAdam's mask
        g_copy = g.clone()
        u_ref = ref_call(g, ref_state, t)
        u_doc = doc_call(g.clone(), doc_state, t)
        assert torch.equal(g, g_copy), "grad was modified"
        assert u_ref.dtype == u_doc.dtype == dtype
        assert torch.equal(u_ref, u_doc), f"update differs at step {t}"
        for a, b in zip(ref_state, doc_state):
            assert torch.equal(a, b), f"state differs at step {t}"
        assert u_ref.abs().sum() > 0
    assert [id(s) for s in ref_state] == ids, "state must be updated in place"


@pytest.mark.parametrize("n_state,calls", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_runs_under_no_grad(n_state, calls):
    g = torch.randn(SHAPE, requires_grad=True)
    u = calls[0](g, [torch.zeros(SHAPE) for _ in range(n_state)], 1)
    assert not u.requires_grad and u.grad_fn is None


# --------------------------------------------------------------------------------------------------------------
# The reference's signatures, keyword-only-ness and module contents
# --------------------------------------------------------------------------------------------------------------

E = inspect.Parameter.empty
SIGNATURES: dict[str, tuple[list[str], list[tuple[str, Any]]]] = {
    "calculate_adam_update": (["grad", "exp_avg", "exp_avg_sq"],
                              [("betas", E), ("eps", E), ("correct_bias", E), ("nesterov", E), ("step", E)]),
    "calculate_ademamix_update": (["grad", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq"],
                                  [("betas", E), ("eps", E), ("correct_bias", E), ("step", E),
                                   ("num_beta_slow_warmup_steps", E), ("num_alpha_warmup_steps", E), ("alpha", 2)]),
    "calculate_sim_ademamix_update": (["grad", "exp_avg", "exp_avg_sq"],
                                      [("betas", E), ("eps", E), ("correct_bias", E), ("step", E),
                                       ("num_beta_fast_warmup_steps", E), ("min_beta_fast", E), ("alpha", 2)]),
    "calculate_laprop_update": (["grad", "exp_avg", "exp_avg_sq"],
                                [("betas", E), ("eps", E), ("correct_bias", E), ("step", E)]),
    "calculate_lion_update": (["grad", "exp_avg"], [("betas", E), ("step", E)]),
    "calculate_madam_update": (["grad", "exp_avg", "exp_avg_sq_scaled"],
                               [("betas", E), ("correct_bias", E), ("step", E), ("scale_log2", E)]),
    "calculate_rmsprop_update": (["grad", "exp_avg_sq"], [("alpha", E), ("eps", E), ("step", None)]),
    "calculate_signum_update": (["grad", "exp_avg"],
                                [("momentum", E), ("correct_bias", E), ("nesterov", E), ("step", E),
                                 ("use_shape_scaling", False)]),
}

SUBMODULE_ALL = {
    "adam": ["calculate_adam_update"],
    "ademamix": ["calculate_ademamix_update", "calculate_sim_ademamix_update"],
    "laprop": ["calculate_laprop_update"],
    "lion": ["calculate_lion_update"],
    "madam": ["calculate_madam_update"],
    "rmsprop": ["calculate_rmsprop_update"],
    "signum": ["calculate_signum_update"],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_is_the_references(name):
    positional, keyword_only = SIGNATURES[name]
    params = list(inspect.signature(getattr(uf, name)).parameters.values())
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    assert [(p.name, p.default) for p in params if p.kind is p.KEYWORD_ONLY] == keyword_only
    assert len(params) == len(positional) + len(keyword_only)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_hyperparameters_are_keyword_only(name):
    n_tensors = len(SIGNATURES[name][0])
    tensors = [torch.zeros(3, 3) for _ in range(n_tensors)]
    with pytest.raises(TypeError):
        getattr(uf, name)(*tensors, (0.9, 0.99))


def test_module_contents_are_the_references():
    import importlib

    assert sorted(uf.__all__) == sorted(SIGNATURES)
    for sub, names in SUBMODULE_ALL.items():
        module = importlib.import_module(f"emerging_optimizers.scalar_optimizers.update_functions.{sub}")
        assert module.__all__ == names
        assert getattr(uf, sub) is module
        for name in names:
            assert getattr(uf, name) is getattr(module, name)
    assert uf._schedulers is ref_sched
    assert not hasattr(ref_sched, "__all__")  # as in the reference: nothing public
    for name in ("_half_life_steps", "_inverse_half_life_beta", "_linear_half_life_warmup_scheduler",
                 "_linear_warmup_scheduler"):
        assert callable(getattr(ref_sched, name))


def test_package_exports():
    import emerging_optimizers.scalar_optimizers as so

    for name in ("SingleMomentumOptimizer", "TwoMomentsOptimizer", "update_functions"):
        assert name in so.__all__
    assert SingleMomentumOptimizer.state_keys == ("exp_avg",)
    assert TwoMomentsOptimizer.state_keys == ("exp_avg", "exp_avg_sq")
    # the documented functions stay at their own paths with their own signatures
    assert so.calculate_lion_update is calculate_lion_update is not uf.calculate_lion_update
    assert list(inspect.signature(so.calculate_lion_update).parameters) == ["grad", "exp_avg", "momentum_beta",
                                                                            "momentum_beta2"]


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_log2", [15, 15.0, 16.5, -3, float("inf"), float("nan"), True, "16", None])
def test_madam_rejects_a_scale_log2_that_is_not_an_even_integer(scale_log2):
    with pytest.raises(ValueError, match="scale_log2"):
        uf.calculate_madam_update(torch.ones(3), torch.zeros(3), torch.zeros(3), betas=(0.9, 0.99),
                                  correct_bias=True, step=1, scale_log2=scale_log2)


@pytest.mark.parametrize("scale_log2", [16, 16.0, -4, -4.0, 0.0])
def test_madam_accepts_int_and_float_even_scale_log2(scale_log2):
    g = torch.randn(4, 3)
    states = [[torch.zeros(4, 3), torch.zeros(4, 3)] for _ in range(2)]
    u_float = uf.calculate_madam_update(g, *states[0], betas=(0.9, 0.99), correct_bias=True, step=1,
                                        scale_log2=scale_log2)
    u_int = uf.calculate_madam_update(g, *states[1], betas=(0.9, 0.99), correct_bias=True, step=1,
                                      scale_log2=int(scale_log2))
    assert torch.equal(u_float, u_int)


@pytest.mark.parametrize("correct_bias", [True, False])
def test_madam_equals_adam_with_eps_zero_bitwise(correct_bias):
    """Powers of two are exact, so without underflow MAdam is Adam(eps=0) to the bit (our madam docstring says so)."""
    gen = torch.Generator().manual_seed(0)
    m1, v1, m2, v2 = (torch.zeros(SHAPE) for _ in range(4))
    for t in range(1, STEPS + 1):
        g = torch.randn(SHAPE, generator=gen)
        u_madam = uf.calculate_madam_update(g, m1, v1, betas=(0.9, 0.99), correct_bias=correct_bias, step=t,
                                            scale_log2=14)
        u_adam = uf.calculate_adam_update(g, m2, v2, betas=(0.9, 0.99), eps=0.0, correct_bias=correct_bias,
                                          nesterov=False, step=t)
        assert torch.equal(v1, v2 * 2**14)
        assert torch.equal(u_madam, u_adam)


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4)])
def test_signum_shape_scaling_needs_a_matrix(shape):
    with pytest.raises(ValueError, match="use_shape_scaling"):
        uf.calculate_signum_update(torch.ones(shape), torch.zeros(shape), momentum=0.9, correct_bias=True,
                                   nesterov=False, step=1, use_shape_scaling=True)


def test_signum_shape_scaling_value():
    u = uf.calculate_signum_update(-torch.ones(8, 12), torch.zeros(8, 12), momentum=0.5, correct_bias=False,
                                   nesterov=False, step=1, use_shape_scaling=True)
    assert torch.equal(u, torch.full((8, 12), -2 / 20))


# --------------------------------------------------------------------------------------------------------------
# Schedulers against their plain formulas
# --------------------------------------------------------------------------------------------------------------


def h(b, eps=1e-8):
    return math.log(0.5) / math.log(b + eps) - 1


def h_inv(s):
    return 0.5 ** (1 / (s + 1))


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.999, 0.9999])
def test_half_life_functions(beta):
    assert ref_sched._half_life_steps(beta) == pytest.approx(h(beta), rel=1e-15)
    assert ref_sched._half_life_steps(beta, eps=1e-6) == pytest.approx(h(beta, 1e-6), rel=1e-15)
    assert ref_sched._inverse_half_life_beta(h(beta)) == pytest.approx(h_inv(h(beta)), rel=1e-15)
    if beta > 0:
        assert ref_sched._inverse_half_life_beta(ref_sched._half_life_steps(beta, eps=0.0)) == pytest.approx(beta)


@pytest.mark.parametrize("n", [1, 4, 10])
def test_linear_half_life_warmup_scheduler(n):
    b0, b1 = 0.9, 0.9999
    for step in range(n + 3):
        got = ref_sched._linear_half_life_warmup_scheduler(step, beta_end=b1, beta_start=b0, num_warmup_steps=n)
        a = step / n
        want = h_inv((1 - a) * h(b0) + a * h(b1)) if step < n else b1
        assert got == pytest.approx(want, rel=1e-15)
    # the reference's defaults: beta_start=0, num_warmup_steps=1
    assert ref_sched._linear_half_life_warmup_scheduler(0, 0.99) == pytest.approx(h_inv(h(0.0)), rel=1e-15)
    assert ref_sched._linear_half_life_warmup_scheduler(1, 0.99) == 0.99


@pytest.mark.parametrize("start,end,n", [(0.0, 5.0, 4), (1.0, 5.0, 4), (8.0, 2.0, 3), (0.0, 2.0, 1)])
def test_linear_warmup_scheduler(start, end, n):
    for step in range(n + 3):
        got = ref_sched._linear_warmup_scheduler(step, alpha_end=end, alpha_start=start, num_warmup_steps=n)
        a = step / n
        assert got == pytest.approx((1 - a) * start + a * end if step < n else end, rel=1e-15)
    assert ref_sched._linear_warmup_scheduler(0, 3.0) == 0.0  # defaults: from 0 over one step
    assert ref_sched._linear_warmup_scheduler(1, 3.0) == 3.0


def test_our_linear_warmup_keeps_its_behaviour():
    for step in range(10):
        assert ours_sched.linear_warmup(step, 2.5, 7) == (step / 7 * 2.5 if step < 7 else 2.5)
    assert ours_sched.linear_warmup(3, 2.5, None) == 2.5


# --------------------------------------------------------------------------------------------------------------
# Optimizers declared the reference's way equal our own classes
# --------------------------------------------------------------------------------------------------------------


class RefStyleLion(SingleMomentumOptimizer):
    """Lion declared as in the reference: update function + the group keys it needs."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01, *, weight_decay_method="decoupled"):
        _validate_common_hparams(lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(params, defaults=dict(lr=lr, betas=betas, weight_decay=weight_decay),
                         update_fn=uf.calculate_lion_update, update_kwarg_names=("betas",),
                         weight_decay_method=weight_decay_method)


class RefStyleSignum(SingleMomentumOptimizer):
    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, *, correct_bias=True, nesterov=False,
                 use_shape_scaling=False, weight_decay_method="decoupled"):
        _validate_common_hparams(lr=lr, weight_decay=weight_decay)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, correct_bias=correct_bias,
                        nesterov=nesterov, use_shape_scaling=use_shape_scaling)
        super().__init__(params, defaults=defaults, update_fn=uf.calculate_signum_update,
                         update_kwarg_names=("momentum", "correct_bias", "nesterov", "use_shape_scaling"),
                         weight_decay_method=weight_decay_method)


class RefStyleLaProp(TwoMomentsOptimizer):
    """LaProp as in the reference, with ``frob_normalize`` on ``self`` and done in the two hooks."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, correct_bias=True,
                 frob_normalize=False, weight_decay_method="decoupled"):
        _validate_common_hparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.frob_normalize = frob_normalize
        super().__init__(params, defaults=dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                               correct_bias=correct_bias),
                         update_fn=uf.calculate_laprop_update, update_kwarg_names=("betas", "eps", "correct_bias"),
                         weight_decay_method=weight_decay_method)

    def pre_step_inplace(self, p, group):
        return torch.linalg.vector_norm(p, dtype=torch.float32) if self.frob_normalize else None

    def post_step_inplace(self, p, group, ctx):
        if self.frob_normalize:
            norm = torch.linalg.vector_norm(p, dtype=torch.float32)
            p.mul_((ctx / norm.clamp_min(group["eps"])).to(p.dtype))


class RefStyleSimAdEMAMix(TwoMomentsOptimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9999, 0.999), eps=1e-8, weight_decay=0.0, *, correct_bias=True,
                 num_beta_fast_warmup_steps=None, min_beta_fast=0.9, alpha=2.0, weight_decay_method="decoupled"):
        _validate_common_hparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        names = ("betas", "eps", "correct_bias", "num_beta_fast_warmup_steps", "min_beta_fast", "alpha")
        values = (betas, eps, correct_bias, num_beta_fast_warmup_steps, min_beta_fast, alpha)
        super().__init__(params, defaults=dict(lr=lr, weight_decay=weight_decay, **dict(zip(names, values))),
                         update_fn=uf.calculate_sim_ademamix_update, update_kwarg_names=names,
                         weight_decay_method=weight_decay_method)


PAIRS = [
    *[(f"lion-{m}", RefStyleLion, Lion, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, weight_decay_method=m))
      for m in ("decoupled", "independent", "l2", "palm")],
    ("signum", RefStyleSignum, Signum, dict(lr=1e-2, momentum=0.9, weight_decay=0.05)),
    ("signum-nesterov-shape", RefStyleSignum, Signum,
     dict(lr=1e-2, momentum=0.8, nesterov=True, correct_bias=False, use_shape_scaling=True)),
    ("laprop", RefStyleLaProp, LaProp, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05)),
    ("laprop-frob", RefStyleLaProp, LaProp, dict(lr=1e-2, frob_normalize=True, correct_bias=False)),
    ("sim_ademamix", RefStyleSimAdEMAMix, SimplifiedAdEMAMix,
     dict(lr=1e-3, betas=(0.99, 0.999), num_beta_fast_warmup_steps=3, alpha=0.5, weight_decay=0.1,
          weight_decay_method="l2")),
]


def make_params(dtype, seed=0, two_d_only=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (4, 3)] if two_d_only else [(6, 5), (4,), (2, 3, 2)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def groups(params):
    """Two groups, the second with its own lr: hyperparameters are read per group."""
    return [{"params": params[:1]}, {"params": params[1:], "lr": 3e-3}]


def set_grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def assert_same(opt_a, opt_b, a, b):
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]) if isinstance(sa[key], torch.Tensor) else sa[key] == sb[key]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ref_cls,our_cls,kwargs", [p[1:] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_reference_style_optimizer_equals_ours(ref_cls, our_cls, kwargs, dtype):
    two_d = kwargs.get("use_shape_scaling", False)
    a, b = make_params(dtype, two_d_only=two_d), make_params(dtype, two_d_only=two_d)
    opt_a = ref_cls(groups(a), **kwargs)
    opt_b = our_cls(groups(b), **kwargs, fused=False)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        set_grads(a, gen_a)
        set_grads(b, gen_b)
        grads = [p.grad.clone() for p in a]
        opt_a.step()
        opt_b.step()
        assert_same(opt_a, opt_b, a, b)
        assert all(torch.equal(p.grad, g) for p, g in zip(a, grads)), "the caller's grad must survive (also l2)"
    assert set(opt_a.state[a[0]]) == {"step", *ref_cls.state_keys}
    assert opt_a.state[a[0]]["step"] == STEPS


@pytest.mark.parametrize("ref_cls,our_cls,kwargs", [p[1:] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_reference_style_state_dict_round_trip(ref_cls, our_cls, kwargs):
    two_d = kwargs.get("use_shape_scaling", False)
    a = make_params(torch.float32, two_d_only=two_d)
    opt_a = ref_cls(groups(a), **kwargs)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        set_grads(a, gen)
        opt_a.step()
    saved = copy.deepcopy(opt_a.state_dict())
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = ref_cls(groups(b), **kwargs)
    opt_b.load_state_dict(saved)
    assert_same(opt_a, opt_b, a, b)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(2):
        set_grads(a, gen_a)
        set_grads(b, gen_b)
        opt_a.step()
        opt_b.step()
    assert_same(opt_a, opt_b, a, b)


def test_missing_update_kwarg_names_raise():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"update_kwarg_names \['betas'\] not present in defaults"):
        SingleMomentumOptimizer([p], dict(lr=1e-3, weight_decay=0.0), update_fn=uf.calculate_lion_update,
                                update_kwarg_names=("betas",))
    with pytest.raises(ValueError, match="eps"):
        TwoMomentsOptimizer([p], dict(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99), correct_bias=True),
                            update_fn=uf.calculate_laprop_update, update_kwarg_names=("betas", "eps", "correct_bias"))


def test_update_fn_receives_step_and_the_named_group_values():
    calls = []

    def update_fn(grad, exp_avg, **kwargs):
        calls.append(kwargs)
        exp_avg.add_(grad)
        return exp_avg.clone()

    p = torch.nn.Parameter(torch.zeros(3))
    opt = SingleMomentumOptimizer([p], dict(lr=0.5, weight_decay=0.0, beta=0.7, unused=1), update_fn=update_fn,
                                  update_kwarg_names=("beta",))
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    assert calls == [{"beta": 0.7, "step": t} for t in (1, 2, 3)]
    assert torch.equal(p.detach(), torch.full((3,), -0.5 * (1 + 2 + 3)))


def test_hooks_bracket_weight_decay_and_update():
    seen = {}

    class Hooked(RefStyleLion):
        def pre_step_inplace(self, p, group):
            return p.detach().clone()

        def post_step_inplace(self, p, group, ctx):
            seen["before"], seen["after"] = ctx, p.detach().clone()

    p = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = Hooked([p], lr=0.5, weight_decay=0.1)
    p.grad = torch.ones(4)
    opt.step()
    assert torch.equal(seen["before"], torch.full((4,), 2.0))  # before the decay
    assert torch.equal(seen["after"], torch.full((4,), 2.0 * (1 - 0.05) - 0.5))  # after decay and update


def test_closure_is_accepted_and_its_loss_returned():
    p = torch.nn.Parameter(torch.ones(3))
    opt = RefStyleLion([p], lr=0.1, weight_decay=0.0)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    assert torch.allclose(p.detach(), torch.full((3,), 0.9))


def test_fused_is_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = RefStyleLion([p])
    assert opt.param_groups[0]["fused"] is False
    with pytest.raises(ValueError, match="fused"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "fused": True})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.9)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
])
def test_validate_common_hparams(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _validate_common_hparams(**kwargs)
    _validate_common_hparams(lr=1e-3, betas=(0.0, 0.999), eps=0.0, weight_decay=0.0)


def test_invalid_weight_decay_method_is_refused():
    with pytest.raises(ValueError, match="weight_decay_method"):
        RefStyleLion([torch.nn.Parameter(torch.zeros(3))], weight_decay_method="bogus")
