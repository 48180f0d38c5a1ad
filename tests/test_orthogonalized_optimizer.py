"""OrthogonalizedOptimizer: order of operations, hooks, group kwargs, precision, state, validation."""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any

import pytest
import torch

from emerging_optimizers.orthogonalized_optimizers import (
    NoOpWeightUpdateHook,
    OrthogonalizedOptimizer,
    WeightUpdateHook,
)

WD_METHODS = ["decoupled", "independent", "l2", "palm"]


def orth_fn(g: torch.Tensor) -> torch.Tensor:
    """A non-linear stand-in for an orthogonalization (so the order of operations matters)."""
    return torch.tanh(3 * g) / (1 + g.norm())


def make_opt(params: Any, **kw: Any) -> OrthogonalizedOptimizer:
    base: dict[str, Any] = {
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 0.05,
        "nesterov": False,
        "weight_decay_method": "decoupled",
        "fp32_matmul_prec": "highest",
        "scaled_orthogonalize_fn": orth_fn,
    }
    base.update(kw)
    lr, mom, wd = base.pop("lr"), base.pop("momentum"), base.pop("weight_decay")
    return OrthogonalizedOptimizer(params, lr, mom, wd, **base)


def reference_run(
    ws: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    lr: float,
    mu: float,
    wd: float,
    method: str,
    nesterov: bool,
) -> list[torch.Tensor]:
    """SPEC section 3 by hand, float64: decay, EMA, (Nesterov) direction, orth_fn, p -= lr * u."""
    ws = [w.double().clone() for w in ws]
    bufs = [torch.zeros_like(w) for w in ws]
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            g = g.double()
            if method == "l2":
                g = g + wd * ws[i]
            elif method == "decoupled":
                ws[i] = ws[i] * (1 - lr * wd)
            elif method == "independent":
                ws[i] = ws[i] * (1 - wd)
            elif method == "palm":
                ws[i] = ws[i] * (1 - lr * lr * wd)
            bufs[i] = mu * bufs[i] + (1 - mu) * g
            d = (1 - mu) * g + mu * bufs[i] if nesterov else bufs[i]
            ws[i] = ws[i] - lr * orth_fn(d)
    return ws


@pytest.mark.parametrize("method,nesterov", list(itertools.product(WD_METHODS, [False, True])))
def test_order_of_operations_against_hand_reference(method: str, nesterov: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)]
    grads = [[torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in w0] for _ in range(4)]
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = make_opt(params, weight_decay_method=method, nesterov=nesterov)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for p, ref in zip(params, reference_run(w0, grads, 0.1, 0.9, 0.05, method, nesterov)):
        torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-12)
    assert opt.state[params[0]]["step"] == 4 and isinstance(opt.state[params[0]]["step"], int)


def test_l2_never_mutates_grad_and_no_decay_when_zero() -> None:
    p = torch.nn.Parameter(torch.randn(3, 4))
    g = torch.randn(3, 4)
    p.grad = g.clone()
    make_opt([p], weight_decay_method="l2").step()
    assert torch.equal(p.grad, g)
    q = torch.nn.Parameter(torch.randn(3, 4))
    q0 = q.detach().clone()
    q.grad = torch.zeros(3, 4)
    make_opt([q], weight_decay=0.0, scaled_orthogonalize_fn=lambda d: d).step()
    assert torch.equal(q.detach(), q0)


class Recorder(OrthogonalizedOptimizer):
    def __init__(self, params: Any, log: list[Any], **kw: Any) -> None:
        self.log = log
        super().__init__(
            params,
            0.5,
            0.0,
            0.0,
            nesterov=False,
            weight_decay_method="decoupled",
            fp32_matmul_prec="high",
            scaled_orthogonalize_fn=orth_fn,
            **kw,
        )

    def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.log.append(("orth", torch.get_float32_matmul_precision(), kwargs))
        return grad * 2

    def pre_weight_update_fn_inplace(self, p: torch.Tensor, update: torch.Tensor) -> None:
        self.log.append(("sub_pre", p.detach().clone()))

    def post_weight_update_fn_inplace(self, p: torch.Tensor) -> None:
        self.log.append(("sub_post", p.detach().clone()))


class RecordingHook:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def pre_weight_update_inplace(self, p: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        self.log.append(("hook_pre", p.detach().clone()))
        update.mul_(10.0)  # a hook may rescale the update in place; it must not reach the momentum
        return torch.tensor(7.0)

    def post_weight_update_inplace(self, p: torch.Tensor, pre_update_state: torch.Tensor) -> None:
        self.log.append(("hook_post", p.detach().clone(), pre_update_state.item()))


def test_hooks_called_in_order_with_fresh_update() -> None:
    log: list[Any] = []
    p = torch.nn.Parameter(torch.ones(2, 3))
    opt = Recorder([p], log, weight_update_hook=RecordingHook(log))
    assert isinstance(opt.weight_update_hook, WeightUpdateHook)
    p.grad = torch.full((2, 3), 0.5)
    opt.step()
    names = [e[0] for e in log]
    assert names == ["orth", "sub_pre", "hook_pre", "sub_post", "hook_post"]
    assert torch.equal(log[1][1], torch.ones(2, 3)) and torch.equal(log[2][1], torch.ones(2, 3))
    expected = 1 - 0.5 * (2 * 0.5) * 10  # momentum 0: buf = g; u = 2 g, scaled by the hook
    assert torch.allclose(log[3][1], torch.full((2, 3), expected)) and log[4][2] == 7.0
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.full((2, 3), 0.5))


def test_identity_default_warns_and_hook_never_rescales_momentum() -> None:
    log: list[Any] = []
    p = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.warns(UserWarning, match="identity"):
        opt = OrthogonalizedOptimizer(
            [p],
            0.1,
            0.5,
            0.0,
            nesterov=False,
            weight_decay_method="decoupled",
            fp32_matmul_prec="highest",
            weight_update_hook=RecordingHook(log),
        )
    p.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.full((2, 2), 0.5))
    torch.testing.assert_close(p.detach(), torch.full((2, 2), 1 - 0.1 * 0.5 * 10))
    assert isinstance(NoOpWeightUpdateHook(), WeightUpdateHook)
    with pytest.raises(TypeError, match="weight_update_hook"):
        make_opt([p], weight_update_hook=object())
    with pytest.raises(TypeError, match="callable"):
        make_opt([p], scaled_orthogonalize_fn=3)


def test_group_kwargs_reach_orthogonalize_and_precision_is_scoped() -> None:
    log: list[Any] = []
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(3, 2))
    torch.set_float32_matmul_precision("highest")
    opt = Recorder(
        [{"params": [a]}, {"params": [b], "foo": 5, "fp32_matmul_prec": "medium", "lr": 0.1}], log, foo=3, bar="x"
    )
    a.grad, b.grad = torch.ones(2, 2), torch.ones(3, 2)
    opt.step()
    orth = [e for e in log if e[0] == "orth"]
    assert [e[1] for e in orth] == ["high", "medium"]
    assert orth[0][2]["foo"] == 3 and orth[1][2]["foo"] == 5 and orth[1][2]["bar"] == "x"
    assert orth[1][2]["lr"] == 0.1 and "params" not in orth[0][2]
    assert torch.get_float32_matmul_precision() == "highest"


def test_precision_restored_after_error() -> None:
    def boom(g: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    p = torch.nn.Parameter(torch.ones(2, 2))
    p.grad = torch.ones(2, 2)
    torch.set_float32_matmul_precision("highest")
    with pytest.raises(RuntimeError, match="boom"):
        make_opt([p], scaled_orthogonalize_fn=boom, fp32_matmul_prec="medium").step()
    assert torch.get_float32_matmul_precision() == "highest"


def test_per_group_hyperparameters_survive_state_dict() -> None:
    a, b = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3, 3))
    opt = make_opt([{"params": [a]}, {"params": [b], "nesterov": True, "weight_decay_method": "l2"}])
    sd = opt.state_dict()
    assert sd["param_groups"][1]["nesterov"] is True and sd["param_groups"][1]["weight_decay_method"] == "l2"
    assert opt.nesterov is False and opt.weight_decay_method == "decoupled" and opt.fp32_matmul_prec == "highest"
    # as in the reference library, assigning the attribute sets it for the whole optimizer (every group)
    opt.nesterov = True
    assert opt.nesterov is True and all(g["nesterov"] is True for g in opt.param_groups)
    with pytest.raises(ValueError, match="fp32_matmul_prec"):
        opt.fp32_matmul_prec = "low"  # type: ignore[assignment]
    assert opt.fp32_matmul_prec == "highest" and all(g["fp32_matmul_prec"] == "highest" for g in opt.param_groups)


def test_closure_lazy_state_and_init_group() -> None:
    w = torch.nn.Parameter(torch.randn(3, 4))
    unused = torch.nn.Parameter(torch.randn(2, 2))
    opt = make_opt([w, unused])
    x = torch.randn(5, 4)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (x @ w.T).square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.grad_fn is not None  # the closure ran with grad enabled
    assert set(opt.state[w]) == {"step", "momentum_buffer"} and unused not in opt.state
    opt._init_group(opt.param_groups[0], skip_non_grad_params=False)
    assert torch.equal(opt.state[unused]["momentum_buffer"], torch.zeros(2, 2)) and opt.state[unused]["step"] == 0


def test_state_dict_round_trip_bit_identical() -> None:
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(4, 5, generator=gen)
    grads = [torch.randn(4, 5, generator=gen) for _ in range(6)]

    def run(opt: OrthogonalizedOptimizer, p: torch.Tensor, gs: list[torch.Tensor]) -> None:
        for g in gs:
            p.grad = g.clone()
            opt.step()

    p1 = torch.nn.Parameter(w0.clone())
    o1 = make_opt([p1], nesterov=True)
    run(o1, p1, grads)
    p2 = torch.nn.Parameter(w0.clone())
    o2 = make_opt([p2], nesterov=True)
    run(o2, p2, grads[:3])
    sd = copy.deepcopy(o2.state_dict())
    p3 = torch.nn.Parameter(p2.detach().clone())
    o3 = make_opt([p3], nesterov=False)  # the saved group overrides the constructor's nesterov
    o3.load_state_dict(sd)
    assert o3.param_groups[0]["nesterov"] is True and o3.state[p3]["step"] == 3
    run(o3, p3, grads[3:])
    assert torch.equal(p3.detach(), p1.detach())


def test_momentum_dtype_and_bf16_params() -> None:
    p = torch.nn.Parameter(torch.randn(3, 3).bfloat16())
    opt = make_opt([p], momentum_dtype=torch.float32)
    p.grad = torch.randn(3, 3).bfloat16()
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.float32 and p.dtype == torch.bfloat16
    q = torch.nn.Parameter(torch.randn(3, 3).bfloat16())
    opt = make_opt([q])
    q.grad = torch.randn(3, 3).bfloat16()
    opt.step()
    assert opt.state[q]["momentum_buffer"].dtype == torch.bfloat16


def test_non_2d_rejected_by_default_orthogonalize() -> None:
    p = torch.nn.Parameter(torch.randn(2, 3, 4))
    p.grad = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="2-D"):
        make_opt([p]).step()


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"weight_decay_method": "l1"}, "weight_decay_method"),
        ({"fp32_matmul_prec": "low"}, "fp32_matmul_prec"),
        ({"nesterov": 1}, "nesterov"),
        ({"momentum_dtype": torch.int32}, "momentum_dtype"),
    ],
)
def test_constructor_and_group_validation(kw: dict[str, Any], match: str) -> None:
    p = torch.nn.Parameter(torch.randn(2, 2))
    exc = TypeError if "nesterov" in kw else ValueError
    with pytest.raises(exc, match=match):
        make_opt([p], **kw)
    opt = make_opt([p])
    with pytest.raises(exc, match=match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))], **kw})
    assert len(opt.param_groups) == 1


def test_no_warning_with_function() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_opt([torch.nn.Parameter(torch.randn(2, 2))])
