"""One table of optimizers (contract_cases.CASES) through the torch.optim contract.

state_dict round trip with bit-identical resume, per-group hyperparameters, params without grads, closures,
LR schedulers, a decreasing loss on a fixed problem, the fast path equal to the single-tensor path, bf16
params, eager state allocation, and load_state_dict refusing foreign or mismatched state.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from contract_cases import CASES, Case

IDS = [c.id for c in CASES]


def make_model(case: Case, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    bias = not case.matrix_only
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16, bias=bias), torch.nn.Tanh(), torch.nn.Linear(16, 4, bias=bias)
    ).to(dtype)


def data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen)
    teacher = torch.randn(8, 4, generator=gen)
    return x.to(dtype), torch.tanh(x @ teacher).to(dtype)


def loss_fn(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x, y = data(dtype)
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


def train(model, opt, steps, dtype=torch.float32):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, dtype)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def build(case: Case, params, **kw):
    return case.build(params, **{case.lr_arg: case.lr, **kw})


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_resume_is_bit_identical(case):
    model = make_model(case)
    opt = build(case, model.parameters())
    train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 4)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = make_model(case, seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = build(case, resumed.parameters(), **{case.lr_arg: case.lr * 7})  # hyperparameters come from the ckpt
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, 4)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["param_groups"] == opt2.state_dict()["param_groups"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_deepcopy_continues_identically(case):
    """Deep-copying model and optimizer together (one memo, so the copy points at the copied params)."""
    model = make_model(case)
    opt = build(case, model.parameters())
    train(model, opt, 2)
    model2, opt2 = copy.deepcopy((model, opt))
    copied = {id(p) for p in model2.parameters()}
    assert all(id(q) in copied for g in opt2.param_groups for q in g["params"])
    train(model, opt, 3)
    train(model2, opt2, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_param_groups_equal_separate_optimizers(case):
    model, ref = make_model(case), make_model(case)
    first, rest = list(model[0].parameters()), list(model[2].parameters())
    opt = build(case, [{"params": first}, {"params": rest, "lr": case.lr / 3}])
    opt_a = build(case, list(ref[0].parameters()))
    opt_b = build(case, list(ref[2].parameters()), **{case.lr_arg: case.lr / 3})
    for _ in range(3):
        for o in (opt, opt_a, opt_b):
            o.zero_grad()
        loss_fn(model).backward()
        loss_fn(ref).backward()
        opt.step()
        opt_a.step()
        opt_b.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_params_without_grad_are_skipped(case):
    model = make_model(case)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = build(case, model.parameters())
    train(model, opt, 3)
    assert torch.equal(frozen, before)
    assert frozen not in opt.state or not opt.state[frozen]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_closure_returns_loss_and_matches_manual_step(case):
    model, ref = make_model(case), make_model(case)
    opt, opt_ref = build(case, model.parameters()), build(case, ref.parameters())

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        return loss

    for _ in range(3):
        with torch.no_grad():  # step must enable grad for the closure itself
            loss = opt.step(closure)
        expected = train(ref, opt_ref, 1)[0]
        assert loss.item() == expected
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loss_decreases_on_fixed_problem(case):
    model = make_model(case)
    opt = build(case, model.parameters())
    losses = train(model, opt, 40)
    assert losses[-1] < 0.5 * losses[0], losses[::8]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lr_scheduler_drives_the_step(case):
    model = make_model(case)
    opt = build(case, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    train(model, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    wd_keys = ("weight_decay", "wd", "wd_lh")
    independent = any(g.get("weight_decay_method") == "independent" and g.get("weight_decay") for g in opt.param_groups)
    train(model, opt, 2)
    if not independent:  # "independent" decay is by definition not scaled by lr
        for b, p in zip(before, model.parameters()):
            assert torch.equal(b, p), [k for k in wd_keys if k in opt.param_groups[0]]


@pytest.mark.parametrize("path", ["dynamic", "static"])
@pytest.mark.parametrize("case", [c for c in CASES if c.fused], ids=[c.id for c in CASES if c.fused])
def test_fast_path_equals_single_tensor_path(case, path, monkeypatch):
    from emerging_optimizers.scalar_optimizers import base

    if path == "dynamic":  # the chunks of optimizers above AUTO_FUSE_MIN_NUMEL
        monkeypatch.setattr(base, "AUTO_FUSE_MIN_NUMEL", 1)
        # Chunks of 2: the 4 tensors run as two calls of one compiled graph (compiling is the slow part of the
        # suite, and a 2-tensor graph compiles about twice as fast as a 4-tensor one).
        monkeypatch.setattr(base, "FUSED_CHUNK", 2)
    # else: this small model's own path, one static-shape graph over its 4 tensors
    model, ref = make_model(case), make_model(case)
    opt = build(case, model.parameters(), fused=True)
    opt_ref = build(case, ref.parameters(), fused=False)
    assert opt._static == (path == "static")
    with _no_fallback_warning():
        for _ in range(4):
            train(model, opt, 1)
            train(ref, opt_ref, 1)
    for a, b in zip(model.parameters(), ref.parameters()):
        # The compiled kernel evaluates the same expression but may contract multiply-adds (FMA) and vectorize
        # divisions differently, so single results differ in the last bits; through the division by
        # sqrt(v) + eps and four steps that grows to ~30 fp32 ulps of these O(0.3) weights.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _no_fallback_warning:
    """Fail if the fast path silently fell back to eager (then the test would compare eager with eager)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self._log = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        fallbacks = [w for w in self._log if "eager" in str(w.message)]
        assert not fallbacks, [str(w.message) for w in fallbacks]
        return False


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_params(case):
    model = make_model(case, dtype=torch.bfloat16)
    opt = build(case, model.parameters())
    losses = train(model, opt, 30, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.7 * losses[0], losses[::6]
    if case.state_in_param_dtype:
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                    assert v.dtype == torch.bfloat16


FP32_STATE = [c for c in CASES if c.fp32_state]


@pytest.mark.parametrize("case", FP32_STATE, ids=[c.id for c in FP32_STATE])
def test_fp32_state_for_bf16_params_survives_checkpoint(case):
    model = make_model(case, dtype=torch.bfloat16)
    opt = build(case, model.parameters(), fp32_state=True)
    train(model, opt, 2, dtype=torch.bfloat16)
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert all(t.dtype == torch.float32 for t in tensors)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = build(case, model.parameters(), fp32_state=True)
    opt2.load_state_dict(sd)
    tensors2 = [v for s in opt2.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert all(t.dtype == torch.float32 for t in tensors2)  # torch alone would cast them to bf16
    assert all(torch.equal(a, b) for a, b in zip(tensors, tensors2))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_init_group_allocates_state_without_grads(case):
    model = make_model(case)
    opt = build(case, model.parameters())
    for group in opt.param_groups:
        opt._init_group(group, skip_non_grad_params=False)
    assert all(p in opt.state and opt.state[p] is not None for p in model.parameters())
    # and a fresh-state checkpoint loads back
    opt2 = build(case, model.parameters())
    opt2.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_load_state_dict_rejects_mismatch_and_changes_nothing(case):
    model = make_model(case)
    opt = build(case, model.parameters())
    train(model, opt, 2)
    good = copy.deepcopy(opt.state_dict())

    # Another optimizer's state dict (different hyperparameters and state keys).
    other = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, other, 1)
    with pytest.raises(ValueError, match="different optimizer"):
        opt.load_state_dict(other.state_dict())
    assert opt.state_dict()["param_groups"] == good["param_groups"]

    # Same optimizer, but for parameters of other shapes.
    wide = torch.nn.Sequential(torch.nn.Linear(8, 32, bias=not case.matrix_only), torch.nn.Tanh(),
                               torch.nn.Linear(32, 4, bias=not case.matrix_only))
    opt_wide = build(case, wide.parameters())
    train(wide, opt_wide, 1)
    if any(isinstance(v, torch.Tensor) and v.dim() > 0 for s in opt_wide.state.values() for v in s.values()):
        with pytest.raises(ValueError, match="shape"):
            opt.load_state_dict(opt_wide.state_dict())
    after = opt.state_dict()
    for pid, st in good["state"].items():
        for k, v in st.items():
            w = after["state"][pid][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sparse_and_complex_grads_rejected(case):
    p = torch.nn.Parameter(torch.ones(4, 3))  # not zeros: MuonHyperball refuses a matrix of norm 0
    opt = build(case, [p])
    p.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    # Complex parameters: refused at construction (earliest) or, at the latest, at the first step.
    q = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        opt = build(case, [q])
        q.grad = torch.zeros(4, 3, dtype=torch.complex64)
        opt.step()
