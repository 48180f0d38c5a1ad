"""Scalar optimizer classes: equality with torch.optim where they coincide, and early, clear errors."""

from __future__ import annotations

import pytest
import torch

import emerging_optimizers as eo
from emerging_optimizers.scalar_optimizers import Adam, AdamW, LaProp, Lion, MAdam, RMSProp, Signum

# Same formulas, evaluated in a different order (torch: addcdiv with lr/bc1; ours: (m/bc1)/denom, lerp for
# the first moment): the trajectories agree to a few fp32 ulps per step; over 25 steps 2e-6 relative.
RTOL, ATOL = 2e-6, 1e-7


def twin_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (3, 2, 2)]
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    return a, b


def drive(opt_a, opt_b, a, b, steps=25, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, q in zip(a, b):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g, g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("lr,betas,eps,wd", [(1e-3, (0.9, 0.999), 1e-8, 0.01), (3e-2, (0.8, 0.95), 1e-6, 0.3)])
def test_adam_decoupled_equals_torch_adamw(lr, betas, eps, wd):
    a, b = twin_params()
    drive(Adam(a, lr, betas, eps, wd, weight_decay_method="decoupled"),
          torch.optim.AdamW(b, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False), a, b)


def test_adamw_class_matches_torch_adamw_defaults():
    a, b = twin_params()
    drive(AdamW(a), torch.optim.AdamW(b, foreach=False), a, b)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam_l2_equals_torch_adam(wd):
    a, b = twin_params()
    drive(Adam(a, 1e-2, weight_decay=wd, weight_decay_method="l2"),
          torch.optim.Adam(b, lr=1e-2, weight_decay=wd, foreach=False), a, b)


def test_adam_nesterov_matches_formula_not_torch_nadam():
    """torch's NAdam uses a momentum-decay schedule; ours is the plain documented Nesterov form, checked in
    test_scalar_functions. Here: nesterov changes the trajectory and the flag lives in the group."""
    a, b = twin_params()
    o1, o2 = Adam(a, 1e-2, nesterov=True), Adam(b, 1e-2)
    assert o1.param_groups[0]["nesterov"] is True
    with pytest.raises(AssertionError):
        drive(o1, o2, a, b, steps=3)


@pytest.mark.parametrize("alpha,eps,wd", [(0.99, 1e-8, 0.0), (0.9, 1e-4, 0.1)])
def test_rmsprop_equals_torch_rmsprop(alpha, eps, wd):
    a, b = twin_params()
    drive(RMSProp(a, 1e-2, alpha, eps, wd, weight_decay_method="l2"),
          torch.optim.RMSprop(b, lr=1e-2, alpha=alpha, eps=eps, weight_decay=wd, momentum=0, centered=False,
                              foreach=False), a, b)


def test_signum_momentum_zero_is_signsgd_without_state():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.0]))
    opt = Signum([p], lr=0.5, momentum=0.0)
    p.grad = torch.tensor([3.0, -0.1, 0.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.5, -1.5, 0.0]))
    assert set(opt.state[p]) == {"step"}


def test_signum_shape_scaling():
    p = torch.nn.Parameter(torch.zeros(3, 5))
    opt = Signum([p], lr=1.0, use_shape_scaling=True)
    p.grad = torch.ones(3, 5)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3, 5), -2 / 8))


def test_signum_shape_scaling_rejects_non_2d_params_at_construction():
    with pytest.raises(ValueError, match=r"use_shape_scaling needs a 2-D parameter, got shape \(4,\)"):
        Signum([torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(4))], use_shape_scaling=True)


def test_laprop_frob_normalize_keeps_norm():
    p = torch.nn.Parameter(torch.randn(7, 3))
    norm = p.detach().norm()
    opt = LaProp([p], lr=0.1, frob_normalize=True)
    for _ in range(5):
        p.grad = torch.randn(7, 3)
        opt.step()
    torch.testing.assert_close(p.detach().norm(), norm, rtol=1e-6, atol=0)


def test_l2_never_modifies_the_callers_grad():
    p = torch.nn.Parameter(torch.randn(4, 4))
    g = torch.randn(4, 4)
    p.grad = g.clone()
    Adam([p], weight_decay=0.5, weight_decay_method="l2").step()
    assert torch.equal(p.grad, g)


def test_weight_decay_methods_per_group():
    """Each group may use its own method; check the decay factor each applies when the update is zero."""
    ps = [torch.nn.Parameter(torch.ones(2)) for _ in range(4)]
    groups = [{"params": [p], "weight_decay_method": m} for p, m in zip(ps, ["decoupled", "independent", "palm", "l2"])]
    opt = Lion(groups, lr=0.5, betas=(0.0, 0.0), weight_decay=0.1)
    for p in ps:
        p.grad = torch.zeros(2)
    opt.step()
    assert ps[0][0].item() == pytest.approx(1 - 0.5 * 0.1)
    assert ps[1][0].item() == pytest.approx(1 - 0.1)
    assert ps[2][0].item() == pytest.approx(1 - 0.25 * 0.1)
    assert ps[3][0].item() == pytest.approx(1 - 0.5)  # l2: g = 0.1 * p > 0, Lion's update is sign(g) = 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_track_fp32(dtype):
    a, b = twin_params()
    low = [torch.nn.Parameter(p.detach().to(dtype)) for p in a]
    o1, o2 = Adam(low, 1e-2, fp32_state=True), Adam(b, 1e-2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        for p, q in zip(low, b):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.to(dtype), g
        o1.step()
        o2.step()
    for p, q in zip(low, b):
        assert p.dtype == dtype
        # bf16 keeps 8 mantissa bits: each step rounds the weight, 10 steps drift a few bf16 ulps (~1e-2).
        torch.testing.assert_close(p.float(), q.detach(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda ps: Adam(ps, lr=-1.0), r"Invalid learning rate \(lr\): -1.0"),
        (lambda ps: Adam(ps, betas=(0.9, 1.0)), r"Invalid beta at index 1 \(betas\[1\]\): 1.0"),
        (lambda ps: Adam(ps, betas=(0.9,)), "Invalid betas"),
        (lambda ps: Adam(ps, eps=-1e-8), r"Invalid epsilon \(eps\)"),
        (lambda ps: Adam(ps, weight_decay=-0.1), "Invalid weight_decay: -0.1"),
        (lambda ps: Adam(ps, weight_decay_method="l1"), "Invalid weight_decay_method: 'l1'"),
        (lambda ps: Adam(ps, lr=float("nan")), r"Invalid learning rate \(lr\): nan"),
        (lambda ps: Adam(ps, fused="yes"), "Invalid fused"),
        (lambda ps: Lion(ps, betas=(1.5, 0.9)), r"Invalid beta at index 0 \(betas\[0\]\): 1.5"),
        (lambda ps: Signum(ps, momentum=1.0), "Invalid momentum: 1.0"),
        (lambda ps: RMSProp(ps, alpha=-0.1), "Invalid alpha"),
        (lambda ps: MAdam(ps, scale_log2=15), "Invalid scale_log2: 15"),
        (lambda ps: eo.AdEMAMix(ps, num_alpha_warmup_steps=0), "Invalid num_alpha_warmup_steps: 0"),
        (lambda ps: eo.SimplifiedAdEMAMix(ps, min_beta_fast=1.0), "Invalid min_beta_fast"),
        (lambda ps: Adam([{"params": ps, "lr": -3.0}]), r"Invalid learning rate \(lr\): -3.0"),
    ],
)
def test_invalid_hyperparameters_raise_in_constructor(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.zeros(2, 2))])


def test_invalid_group_added_later_raises():
    opt = Adam([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=r"Invalid beta at index 0 \(betas\[0\]\)"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "betas": (2.0, 0.9)})


def test_fused_auto_threshold(monkeypatch):
    from emerging_optimizers.scalar_optimizers import base

    small = Adam([torch.nn.Parameter(torch.zeros(10))])
    assert small.param_groups[0]["fused"] is None and not small._auto_fuse
    monkeypatch.setattr(base, "AUTO_FUSE_MIN_NUMEL", 10)
    assert Adam([torch.nn.Parameter(torch.zeros(10))])._auto_fuse


def test_fused_falls_back_to_eager_with_a_warning(monkeypatch):
    from emerging_optimizers.scalar_optimizers import base

    def broken(kernel, static=None):
        def fn(*args, **kwargs):
            raise RuntimeError("no compiler")

        return fn

    monkeypatch.setattr(base, "_compiled_multi_param_step", broken)
    monkeypatch.setattr(base, "_COMPILED", base._CompiledChunks())
    monkeypatch.setattr(base, "compile_available", lambda device_type: True)
    a, b = twin_params()
    # nesterov: a path of our own (plain Adam/AdamW run torch's fused kernel, see test_torch_fused_adam_*)
    o1, o2 = Adam(a, fused=True, nesterov=True), Adam(b, fused=False, nesterov=True)
    with pytest.warns(RuntimeWarning, match="falling back to the eager step"):
        drive(o1, o2, a, b, steps=1)
    drive(o1, o2, a, b, steps=2)  # stays eager afterwards, and equal
    for p, q in zip(a, b):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------- fast path plumbing
class _FakeCompiler:
    """Stands in for torch.compile: records every call; ``gate`` holds compilation (the trial run) until set;
    ``fail_real`` makes calls on the real tensors write a little, then raise (a run-time failure)."""

    def __init__(self, fail_real: bool = False) -> None:
        import threading

        self.gate, self.calls, self.fail_real, self.trials = threading.Event(), [], fail_real, 0

    def __call__(self, kernel, static=None):
        from emerging_optimizers.scalar_optimizers.base import multi_param_step

        def fn(*args, **flags):
            self.calls.append((args, flags))
            if self.trials == 0:  # the first call is the trial compilation on scratch copies
                self.trials += 1
                self.gate.wait(10)
            elif self.fail_real:
                args[0][0].add_(1.0)
                raise RuntimeError("kernel crashed while running")
            multi_param_step(*args, kernel=kernel, **flags)

        return fn


def _wait_for(condition, timeout=10.0):
    import time

    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        time.sleep(0.001)


def _fast_path(monkeypatch, fake, path="dynamic"):
    """Route the fast path to ``fake``; ``path``: the dynamic-shape chunks of large optimizers (the threshold is
    lowered to 1 element), or the static ones of small optimizers (compiling from the first step)."""
    from emerging_optimizers.scalar_optimizers import base

    monkeypatch.setattr(base, "_compiled_multi_param_step", fake)
    # a fresh registry of compiled code: another test's (fake) compiler may have had the same id()
    monkeypatch.setattr(base, "_COMPILED", base._CompiledChunks())
    if path == "dynamic":
        monkeypatch.setattr(base, "AUTO_FUSE_MIN_NUMEL", 1)
    else:
        monkeypatch.setattr(base, "AUTO_FUSE_AFTER_S", 0.0)


PATHS = pytest.mark.parametrize("path", ["dynamic", "static"])


@PATHS
def test_auto_fused_first_step_does_not_wait_for_the_compiler(monkeypatch, path):
    """fused=None compiles in the background: steps run eagerly (equal to fused=False) until it is ready."""
    fake = _FakeCompiler()
    _fast_path(monkeypatch, fake, path)
    a, b = twin_params()
    o1, o2 = Adam(a, nesterov=True), Adam(b, fused=False, nesterov=True)  # our compiled path (not torch's kernel)
    drive(o1, o2, a, b, steps=2)  # returns although the compiler is held: the steps ran eagerly
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    _wait_for(lambda: fake.calls)  # the compile thread reaches its trial run (held there by the gate)
    assert len(fake.calls) == 1  # only the trial run, on copies
    fake.gate.set()
    from emerging_optimizers.scalar_optimizers.base import _COMPILED

    _COMPILED.wait(10)
    drive(o1, o2, a, b, steps=2)
    assert len(fake.calls) >= 2  # now the compiled code runs the real chunks


@PATHS
def test_switch_interval_is_short_while_compiling_in_the_background_then_restored(monkeypatch, path):
    """While fused=None compiles in its thread, the GIL changes hands every 0.1 ms (a training thread would
    otherwise wait up to 5 ms for it after each op); the user's interval comes back once the compile is done."""
    import sys

    from emerging_optimizers.scalar_optimizers import base
    from emerging_optimizers.scalar_optimizers.base import _GilShare

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.004)
        user = sys.getswitchinterval()
        fake = _FakeCompiler()
        _fast_path(monkeypatch, fake, path)
        a, b = twin_params()
        o1, o2 = Adam(a, nesterov=True), Adam(b, fused=False, nesterov=True)
        drive(o1, o2, a, b, steps=1)
        assert sys.getswitchinterval() <= _GilShare.INTERVAL_S  # compiling (held by the gate)
        fake.gate.set()
        base._COMPILED.wait(10)
        assert sys.getswitchinterval() == user
        # a failed compilation restores it too
        import threading

        gate = threading.Event()

        def raising(kernel, static=None):
            def fn(*args, **flags):
                gate.wait(10)
                raise RuntimeError("no compiler")

            return fn

        monkeypatch.setattr(base, "_compiled_multi_param_step", raising)
        c, d = twin_params()
        o3, o4 = Lion(c), Lion(d, fused=False)
        drive(o3, o4, c, d, steps=1)
        assert sys.getswitchinterval() <= _GilShare.INTERVAL_S
        gate.set()
        base._COMPILED.wait(10)
        assert sys.getswitchinterval() == user
        drive(o3, o4, c, d, steps=1)  # stays eager, equal
        for p, q in zip(c, d):
            assert torch.equal(p, q)
    finally:
        sys.setswitchinterval(before)


def test_gil_share_pairs_up_and_leaves_a_users_own_setting_alone():
    import sys

    from emerging_optimizers.scalar_optimizers.base import _GilShare

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        user = sys.getswitchinterval()
        share = _GilShare()
        share.begin()
        share.begin()  # two compilations at once
        assert sys.getswitchinterval() <= _GilShare.INTERVAL_S
        share.end()
        assert sys.getswitchinterval() <= _GilShare.INTERVAL_S  # one still running
        share.end()
        assert sys.getswitchinterval() == user
        # the user sets an interval of their own meanwhile: it stays
        share.begin()
        sys.setswitchinterval(0.002)
        mine = sys.getswitchinterval()
        share.end()
        assert sys.getswitchinterval() == mine
        # an interval already shorter than ours is not touched
        sys.setswitchinterval(5e-5)
        short = sys.getswitchinterval()
        share.begin()
        assert sys.getswitchinterval() == short
        share.end()
        assert sys.getswitchinterval() == short
    finally:
        sys.setswitchinterval(before)


def test_small_optimizer_compiles_once_its_eager_steps_took_auto_fuse_after_s(monkeypatch):
    """Below AUTO_FUSE_MIN_NUMEL, fused=None steps eagerly (no compilation) until its eager steps have taken
    AUTO_FUSE_AFTER_S seconds in all; then it compiles in the background (static shapes) and uses it."""
    from emerging_optimizers.scalar_optimizers import base

    fake = _FakeCompiler()
    fake.gate.set()
    monkeypatch.setattr(base, "_compiled_multi_param_step", fake)
    monkeypatch.setattr(base, "_COMPILED", base._CompiledChunks())
    monkeypatch.setattr(base, "AUTO_FUSE_AFTER_S", 0.02)
    a, b = twin_params()
    o1, o2 = Adam(a, nesterov=True), Adam(b, fused=False, nesterov=True)
    assert not o1._auto_fuse and o1._static
    steps = 0
    while o1._eager_s < 0.02:
        drive(o1, o2, a, b, steps=1, seed=steps)
        steps += 1
        assert not fake.calls and steps < 10_000  # eager so far: nothing compiled
    assert o2._eager_s == 0.0  # fused=False never counts
    drive(o1, o2, a, b, steps=1, seed=steps)  # starts the compilation (the trial run), this step eager
    base._COMPILED.wait(10)
    assert fake.trials == 1 and len(fake.calls) == 1
    spent = o1._eager_s
    drive(o1, o2, a, b, steps=3, seed=steps + 1)
    assert len(fake.calls) == 4 and o1._eager_s == spent  # compiled steps are not counted
    static = fake.calls[0][0]
    assert [t.shape for t in static[0]] == [p.shape for p in a]  # whole tensors (static shapes), not flat views


def test_auto_fuse_after_s_none_never_compiles_small_optimizers(monkeypatch):
    from emerging_optimizers.scalar_optimizers import base

    fake = _FakeCompiler()
    fake.gate.set()
    monkeypatch.setattr(base, "_compiled_multi_param_step", fake)
    monkeypatch.setattr(base, "_COMPILED", base._CompiledChunks())
    monkeypatch.setattr(base, "AUTO_FUSE_AFTER_S", None)
    a, b = twin_params()
    o1, o2 = Adam(a, nesterov=True), Adam(b, fused=False, nesterov=True)
    o1._eager_s = 1e9
    drive(o1, o2, a, b, steps=3)
    assert not fake.calls


@PATHS
def test_compiled_chunk_failing_at_run_time_raises_and_is_not_rerun(monkeypatch, path):
    fake = _FakeCompiler(fail_real=True)
    fake.gate.set()
    _fast_path(monkeypatch, fake, path)
    p = torch.nn.Parameter(torch.zeros(4))
    opt = Adam([p], lr=0.1, fused=True, nesterov=True)
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="crashed while running"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4))  # written once (+1), never re-run eagerly (no Adam step after)


@PATHS
def test_failed_recompilation_warns_and_steps_eagerly_from_then_on(monkeypatch, path):
    """A recompilation that fails raises before the compiled code runs (nothing written): that chunk steps
    eagerly, with a warning, and its signature stays eager (the compiler is not asked again)."""
    import torch._dynamo.exc as dynamo_exc

    from emerging_optimizers.scalar_optimizers.base import multi_param_step

    calls = []

    def recompile_fails(kernel, static=None):
        def fn(*args, **flags):
            calls.append(len(calls))
            if len(calls) > 1:  # the trial run compiled; a later call needs a recompilation, which fails
                raise dynamo_exc.TorchDynamoException("recompilation failed")
            multi_param_step(*args, kernel=kernel, **flags)

        return fn

    _fast_path(monkeypatch, recompile_fails, path)
    a, b = twin_params()
    o1, o2 = Adam(a, fused=True, nesterov=True), Adam(b, fused=False, nesterov=True)
    with pytest.warns(RuntimeWarning, match="recompiling the fused step failed"):
        drive(o1, o2, a, b, steps=1)
    drive(o1, o2, a, b, steps=3, seed=2)
    for p, q in zip(a, b):
        assert torch.equal(p, q)  # eager steps only (the trial ran on copies)
    assert len(calls) == 2


@PATHS
def test_float64_params_get_float64_scalars_and_decay_never_recompiles(monkeypatch, path):
    fake = _FakeCompiler()
    fake.gate.set()
    _fast_path(monkeypatch, fake, path)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = Adam([p], lr=0.1, weight_decay=0.1, fused=True, nesterov=True)
    for lr in (0.1, 0.0, 0.1):  # a schedule reaching lr 0 (decay factor exactly 1)
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.randn(5, dtype=torch.float64)
        opt.step()
    args, flags = fake.calls[-1]
    assert args[3].dtype == torch.float64 and args[6]["beta1"].dtype == torch.float64
    assert {tuple(f.items()) for _, f in fake.calls} == {tuple(flags.items())}  # one signature: one compile
    assert fake.trials == 1


@PATHS
def test_fused_views_follow_swapped_data_and_loaded_state(monkeypatch, path):
    """The fused path keeps flat views of each param and its state between steps: they must follow a param
    whose data is swapped (``p.data = ...``) and state replaced by ``load_state_dict`` (else silent no-ops)."""
    fake = _FakeCompiler()
    fake.gate.set()
    _fast_path(monkeypatch, fake, path)
    a, b = twin_params()
    o1, o2 = Adam(a, fused=True, nesterov=True), Adam(b, fused=False, nesterov=True)
    drive(o1, o2, a, b, steps=2)
    for p, q in zip(a, b):  # new storage, same values
        p.data = p.detach().clone() * 2
        q.data = q.detach().clone() * 2
    drive(o1, o2, a, b, steps=2, seed=2)
    saved = o2.state_dict()
    drive(o1, o2, a, b, steps=1, seed=3)
    o1.load_state_dict(saved)
    o2.load_state_dict(saved)
    for p, q in zip(a, b):
        with torch.no_grad():
            p.mul_(0.5)
            q.mul_(0.5)
    drive(o1, o2, a, b, steps=2, seed=4)  # compares within RTOL/ATOL
    assert len(fake.calls) > 5  # the compiled (fake) path ran the real chunks


@PATHS
def test_fused_scalars_per_param_where_they_depend_on_it(monkeypatch, path):
    """Signum's shape scaling makes its scalars differ per parameter: each shape keeps its own."""
    fake = _FakeCompiler()
    fake.gate.set()
    _fast_path(monkeypatch, fake, path)
    gen = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((6, 5), (4, 9), (6, 5))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    o1 = Signum(a, lr=0.1, use_shape_scaling=True, fused=True)
    o2 = Signum(b, lr=0.1, use_shape_scaling=True, fused=False)
    drive(o1, o2, a, b, steps=3)  # compares within RTOL/ATOL (0-d scalars vs Python floats: last bits)
    scales = {round(float(args[6]["scale"]), 12) for args, _ in fake.calls[1:]}
    assert len(scales) == 2  # (6, 5) and (4, 9) each ran with their own scale


def test_laprop_frob_normalize_keeps_float64_weights_norm():
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    norm = torch.linalg.vector_norm(p).item()
    opt = eo.LaProp([p], frob_normalize=True, weight_decay=0.0)
    p.grad = torch.randn_like(p)
    opt.step()
    assert abs(torch.linalg.vector_norm(p).item() - norm) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("make", [
    lambda ps, **k: eo.AdamW(ps, lr=1e-2, weight_decay=0.1, **k),
    lambda ps, **k: Adam(ps, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, weight_decay_method="l2", **k),
    lambda ps, **k: Adam(ps, lr=1e-2, **k),
], ids=["adamw", "adam-l2", "adam-no-decay"])
def test_torch_fused_adam_equals_our_kernel(make, dtype):
    """Plain Adam/AdamW run torch's fused kernel (fused=None); the same update as our kernel's path (fused=False).

    Tolerance: both compute m/bc1 / (sqrt(v)/sqrt(bc2) + eps), in another order of operations (torch folds
    lr/bc1 into one step size): a few ulps per step of the parameter dtype, over 25 steps. bf16: torch's
    kernel computes in float32 and rounds once per step, ours rounds every operation in bf16 (state in the
    parameter's dtype, as torch.optim); they differ by several bf16 ulps, so there each is compared with a
    float64 run, and torch's kernel must be at least as close to it as our bf16 path.
    """
    a, b = twin_params()
    ref = [torch.nn.Parameter(p.detach().double()) for p in a]
    a = [torch.nn.Parameter(p.detach().to(dtype)) for p in a]
    b = [torch.nn.Parameter(p.detach().to(dtype)) for p in b]
    o1, o2, o3 = make(a), make(b, fused=False), make(ref, fused=False)
    from emerging_optimizers.scalar_optimizers.adam import _torch_fused_kernel

    for p in a:
        p.grad = torch.zeros_like(p)
    o1._init_group(o1.param_groups[0])
    assert _torch_fused_kernel(o1, o1.param_groups[0], a) is not None
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        for p, q, r in zip(a, b, ref):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad, r.grad = g, g.clone(), g.double()
        o1.step()
        o2.step()
        o3.step()
    if dtype == torch.bfloat16:
        for p, q, r in zip(a, b, ref):
            fused_err, eager_err = (p.double() - r).abs().max(), (q.double() - r).abs().max()
            assert fused_err <= eager_err + 2**-7, (fused_err, eager_err)
        return
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    assert o1.state[a[0]]["step"] == 25 and o1.state_dict()["state"][0]["step"] == 25


def test_torch_fused_adam_not_used_where_it_would_differ():
    from emerging_optimizers.scalar_optimizers.adam import _torch_fused_kernel

    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    for opt in (Adam([p], nesterov=True), Adam([p], correct_bias=False), Adam([p], fused=False),
                Adam([p], weight_decay=0.1, weight_decay_method="independent"),
                Adam([torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))], fp32_state=True)):
        q = opt.param_groups[0]["params"][0]
        q.grad = torch.randn_like(q)
        opt._init_group(opt.param_groups[0])
        assert _torch_fused_kernel(opt, opt.param_groups[0], [q]) is None


@pytest.mark.parametrize("make,steps", [
    (lambda ps, **k: Lion(ps, lr=0.01, weight_decay=0.1, **k), 3),
    # bc1 = 1 - 0.5**t reaches exactly 1.0 = the decay factor (no weight decay) at t = 54: equal values that
    # shared one 0-d tensor made Dynamo's aliasing guard fail then, and recompile inline
    (lambda ps, **k: Adam(ps, lr=0.01, betas=(0.5, 0.5), nesterov=True, **k), 60),
], ids=["lion", "adam-bc1-reaches-1"])
@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_background_compilation_is_what_the_real_steps_run(monkeypatch, path, make, steps):
    """The background compile traces scratch copies; the real steps must then hit that code, not fail a guard
    (a Parameter's requires_grad, inputs that alias, ...) and recompile inline: that would block a step for
    seconds. Real torch.compile; exactly one graph per signature, and the compiled steps equal the eager ones."""
    import torch._dynamo.utils as dynamo_utils

    from emerging_optimizers.scalar_optimizers import base

    monkeypatch.setattr(base, "_COMPILED", base._CompiledChunks())
    if path == "dynamic":
        monkeypatch.setattr(base, "AUTO_FUSE_MIN_NUMEL", 1)
    else:
        monkeypatch.setattr(base, "AUTO_FUSE_AFTER_S", 0.0)
    a, b = twin_params(seed=3)
    o1, o2 = make(a), make(b, fused=False)
    assert o1._static == (path == "static")
    drive(o1, o2, a, b, steps=1)  # starts the compilation
    base._COMPILED.wait(600)
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    calls = []
    real = base._CompiledChunks.get

    def spy(self, *args, **kwargs):
        fn = real(self, *args, **kwargs)
        calls.append(fn is not None)
        return fn

    monkeypatch.setattr(base._CompiledChunks, "get", spy)
    drive(o1, o2, a, b, steps=steps, seed=2)  # compiled (FMA contraction: within RTOL/ATOL of eager)
    assert calls and all(calls)  # the compiled code ran every chunk
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs  # and nothing was recompiled
