"""The non-finite gradient policy (``nonfinite="skip" | "raise" | "off"``) of every optimizer.

Every case of contract_cases.CASES (every registered optimizer, several configurations) x every kind of bad
gradient (NaN, +Inf, -Inf; in one element of one tensor, or in every tensor):

* ``"skip"``: parameters and the whole optimizer state are bit-identical to before the bad step, the
  counter is incremented (and saved in ``state_dict``), a warning names the parameter, and training goes on
  exactly as a run that never saw the bad batch (``torch.equal`` on the parameters after three more steps);
* ``"raise"``: :class:`NonFiniteGradientError` naming the parameter, nothing changed;
* ``"off"``: no check (the bad value reaches the weights, as before the policy existed).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from contract_cases import CASES, Case
from distributed_helpers import gloo_rank, run_ranks

import emerging_optimizers as eo
from emerging_optimizers.base import NonFiniteGradientError
from emerging_optimizers.utils.nonfinite import nonfinite_flag

IDS = [c.id for c in CASES]
BAD_KINDS = [f"{value}-{where}" for value in ("nan", "inf", "neginf") for where in ("one", "all")]


def make_model(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    bias = not case.matrix_only
    return torch.nn.Sequential(torch.nn.Linear(6, 8, bias=bias), torch.nn.Tanh(), torch.nn.Linear(8, 3, bias=bias))


def build(case: Case, model: torch.nn.Module, **kw: Any) -> torch.optim.Optimizer:
    # the whole-model optimizer routes by name: give it names (plain tensors would all go to AdamW)
    params = list(model.named_parameters()) if case.id.startswith("muon_adamw") else list(model.parameters())
    return case.build(params, **{case.lr_arg: case.lr, **kw})


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)


def good_step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> float:
    x, y = batch(i)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def set_bad_grads(model: torch.nn.Module, kind: str) -> None:
    value = {"nan": math.nan, "inf": math.inf, "neginf": -math.inf}[kind.split("-")[0]]
    x, y = batch(99)
    for p in model.parameters():
        p.grad = None
    torch.nn.functional.mse_loss(model(x), y).backward()
    params = list(model.parameters())
    for p in params if kind.endswith("-all") else params[:1]:
        p.grad.view(-1)[0] = value


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict[str, Any]]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_skip_changes_nothing_counts_warns_and_training_goes_on(case, kind):
    clean_model = make_model(case)
    clean = build(case, clean_model)
    model = make_model(case)
    opt = build(case, model)
    assert opt.param_groups[0]["nonfinite"] == "skip"  # the default
    for i in range(2):
        assert good_step(clean_model, clean, i) == good_step(model, opt, i)

    params_before, state_before = snapshot(model, opt)
    set_bad_grads(model, kind)
    with pytest.warns(RuntimeWarning, match=r"skipped \(non-finite gradient in .*shape \(8, 6\)"):
        assert opt.step() is None
    for p, q in zip(model.parameters(), params_before):
        assert torch.equal(p, q)
    assert_same(opt.state_dict()["state"], state_before)
    assert opt.nonfinite_skipped == 1
    assert all(g["nonfinite_skipped"] == 1 for g in opt.state_dict()["param_groups"])

    # the rest of training is that of a run that never saw the bad batch
    for i in range(2, 5):
        assert good_step(model, opt, i) == good_step(clean_model, clean, i)
    for p, q in zip(model.parameters(), clean_model.parameters()):
        assert torch.equal(p, q)
    assert opt.nonfinite_skipped == 1


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_raise_names_the_parameter_and_changes_nothing(case):
    model = make_model(case)
    opt = build(case, model, nonfinite="raise")
    good_step(model, opt, 0)
    params_before, state_before = snapshot(model, opt)
    set_bad_grads(model, "inf-one")
    with pytest.raises(NonFiniteGradientError, match=r"non-finite gradient in .*\(shape \(8, 6\): 1 \+Inf\); "
                                                     r"nothing was changed"):
        opt.step()
    for p, q in zip(model.parameters(), params_before):
        assert torch.equal(p, q)
    assert_same(opt.state_dict()["state"], state_before)
    assert opt.nonfinite_skipped == 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_off_is_the_unchecked_step(case):
    """No check, no skip, no warning: the step does what it did before the policy existed (NaN into the
    weights or state, a linear-algebra error for the eigendecomposition-based ones, or nothing visible for
    sign methods that map sign(NaN) to 0)."""
    model = make_model(case)
    opt = build(case, model, nonfinite="off")
    good_step(model, opt, 0)
    set_bad_grads(model, "nan-all")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no skip warning
        try:
            opt.step()
        except NonFiniteGradientError:
            pytest.fail("nonfinite='off' raised the policy's error")
        except (RuntimeError, ValueError):  # the algorithm's own reaction, e.g. eigh of a NaN matrix
            pass
    assert opt.nonfinite_skipped == 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_first_step_creates_no_state(case):
    model = make_model(case)
    opt = build(case, model)
    set_bad_grads(model, "nan-one")
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert len(opt.state) == 0 or all(not s for s in opt.state.values())


def test_invalid_policy_names_the_option():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="nonfinite"):
        eo.AdamW([p], nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite"):
        eo.Muon([torch.nn.Parameter(torch.zeros(3, 3))], nonfinite=True)
    opt = eo.AdamW([p])
    with pytest.raises(ValueError, match="nonfinite"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "nonfinite": "nope"})
    assert len(opt.param_groups) == 1


def test_every_constructor_takes_nonfinite_keyword_only():
    import inspect

    for name in eo.registry.get_optimizer_name_list():
        cls = eo.registry.get_optimizer_cls(name)
        param = inspect.signature(cls.__init__).parameters.get("nonfinite")
        assert param is not None, name
        assert param.kind is param.KEYWORD_ONLY and param.default == "skip", name


def test_warnings_are_rate_limited_and_counter_survives_state_dict():
    p = torch.nn.Parameter(torch.ones(4))
    opt = eo.Lion([p], lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(9):
            p.grad = torch.tensor([1.0, math.nan, 1.0, 1.0])
            opt.step()
    skipped = [w for w in caught if "skipped" in str(w.message)]
    assert [int(str(w.message).split("; ")[1].split()[0]) for w in skipped] == [1, 2, 4, 8]
    assert opt.nonfinite_skipped == 9 and torch.equal(p, torch.ones(4))
    sd = opt.state_dict()
    fresh = eo.Lion([p], lr=0.1)
    fresh.load_state_dict(sd)
    assert fresh.nonfinite_skipped == 9


def test_closure_loss_is_returned_on_a_skipped_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = eo.AdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p * torch.tensor([1.0, math.inf, 1.0])).sum()
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning):
        loss = opt.step(closure)
    assert loss.item() == math.inf and torch.equal(p, torch.ones(3)) and opt.nonfinite_skipped == 1


def test_per_group_policy():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    # a bad gradient in an unchecked group does not stop the step
    opt = eo.AdamW([{"params": [a], "nonfinite": "off"}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.tensor([math.nan, 1.0]), torch.ones(2)
    opt.step()
    assert torch.isnan(a).any() and not torch.equal(b, torch.ones(2)) and opt.nonfinite_skipped == 0
    # a bad gradient in a checked group skips the whole step (every group), counted in every group
    a2, b2 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = eo.AdamW([{"params": [a2], "nonfinite": "off"}, {"params": [b2]}], lr=0.1)
    a2.grad, b2.grad = torch.ones(2), torch.tensor([math.inf, 1.0])
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert torch.equal(a2, torch.ones(2)) and torch.equal(b2, torch.ones(2))
    assert [g["nonfinite_skipped"] for g in opt.param_groups] == [1, 1]
    # "raise" in one group wins over "skip" in another
    c, d = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = eo.AdamW([{"params": [c], "nonfinite": "raise"}, {"params": [d]}], lr=0.1)
    c.grad, d.grad = torch.tensor([math.nan, 1.0]), torch.tensor([math.nan, 1.0])
    with pytest.raises(NonFiniteGradientError, match=r"param_groups\[0\]\['params'\]\[0\]"):
        opt.step()


def test_named_parameters_are_named_in_the_error():
    model = torch.nn.Linear(3, 2)
    opt = eo.AdamW(model.named_parameters(), nonfinite="raise")
    model.weight.grad, model.bias.grad = torch.zeros(2, 3), torch.tensor([0.0, -math.inf])
    with pytest.raises(NonFiniteGradientError, match=r"'bias' \(shape \(2,\): 1 -Inf\)"):
        opt.step()


def test_grad_scaler_keeps_its_own_inf_check():
    """torch.amp.GradScaler unscales, finds the inf itself and does not call step: our counter stays 0."""
    model = torch.nn.Linear(4, 2)
    opt = eo.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.ones(3, 4)).sum()).backward()
    model.weight.grad[0, 0] = math.inf
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**3  # the scaler saw the inf and backed off
    assert opt.nonfinite_skipped == 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.zero_grad()
    scaler.scale(model(torch.ones(3, 4)).sum()).backward()
    scaler.step(opt)  # a finite step goes through
    assert not torch.equal(model.weight, before[0])


def test_flag_is_one_fused_check_over_devices_and_dtypes():
    ts = [torch.ones(3), torch.ones(2, dtype=torch.bfloat16), torch.empty(0), torch.ones(2, dtype=torch.float64)]
    assert nonfinite_flag(ts).item() == 0.0
    for i, value in [(0, math.nan), (1, math.inf), (3, -math.inf)]:
        bad = [t.clone() for t in ts]
        bad[i][0] = value
        assert nonfinite_flag(bad).item() == 1.0
    assert nonfinite_flag([]).item() == 0.0


def test_bf16_params():
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = eo.MuonAdamW(model, lr=0.02)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.weight.grad[1, 2] = math.nan
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and len(opt.state) == 0


# --------------------------------------------------------------------------------------------------------------
# All ranks decide together (gloo, loopback): a NaN on one rank skips the step on every rank
# --------------------------------------------------------------------------------------------------------------
def _rank_worker(rank: int, world: int, port: int, errors) -> None:
    with gloo_rank(rank, world, port, errors):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = eo.MuonAdamW(model, lr=0.02)
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        if rank == 1:  # a shard-local overflow only this rank sees
            model.bias.grad[0] = math.inf
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            opt.step()
        assert opt.nonfinite_skipped == 1, f"rank {rank} did not skip"
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()  # every rank finite: every rank steps
        assert opt.nonfinite_skipped == 1 and not torch.equal(model.weight, before[0])
        torch.distributed.barrier()


@pytest.mark.distributed
def test_all_ranks_skip_together():
    run_ranks(_rank_worker, 2)


@pytest.mark.parametrize("grad", [[3e38, 3e38, 1.0], [1e30, -1e30, 1.0]],
                         ids=["sum-and-norm-overflow", "norm-overflow"])
def test_huge_finite_gradients_are_not_skipped(grad):
    """Finite gradients whose fused reduction overflows (the CPU sum for 3e38 + 3e38, the 2-norm for 1e30) make
    a suspect step, which the per-tensor confirmation clears; a reduction that does not overflow is no suspect."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = eo.Lion([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.tensor(grad)
    suspect = not torch.stack([p.grad.sum(), torch.linalg.vector_norm(p.grad)]).isfinite().all()
    assert suspect  # the norm overflows in both cases
    assert nonfinite_flag([p.grad]).item() == float(bool(p.grad.sum().isinf()))  # CPU: the sum decides
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step()
    expected = torch.tensor([0.9, 0.9, 0.9]) if grad[1] > 0 else torch.tensor([0.9, 1.1, 0.9])
    assert opt.nonfinite_skipped == 0 and torch.equal(p.detach(), expected)


def test_the_cases_cover_every_registered_optimizer():
    """So "every optimizer" above means every registered one: a new optimizer needs a contract_cases row."""
    covered = {c.id.split("-")[0] for c in CASES}
    assert set(eo.registry.get_optimizer_name_list()) <= covered


@pytest.mark.parametrize("policies", [("off", "off"), ("skip", "skip"), ("raise", "raise"), ("off", "skip"),
                                      ("skip", "off")])
@pytest.mark.parametrize("make", [eo.AdamW, eo.Lion], ids=["adamw", "lion"])
def test_bad_gradients_refused_under_every_policy(policies, make):
    """Each gradient is validated once per step, before anything changes: by the non-finite check for the groups
    it reads, before the first group steps for groups with ``nonfinite="off"`` (a sparse gradient in a later
    group used to be found after the earlier groups had stepped)."""
    a, b = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(4, 3))
    opt = make([{"params": [a], "nonfinite": policies[0]}, {"params": [b], "nonfinite": policies[1]}], lr=0.1)
    a.grad = torch.ones(4, 3)
    b.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(4, 3)) and not opt.state[a] and not opt.state[b]
