"""Muon: float64 reference, torch.optim.Muon, layouts (conv, stacked, fused QKV), dtypes, state, errors."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from emerging_optimizers import registry
from emerging_optimizers.orthogonalized_optimizers import Muon, get_muon_scale_factor
from emerging_optimizers.orthogonalized_optimizers.muon_utils import COEFFICIENT_SETS, get_coefficients

SIMPLE = (3.4445, -4.7750, 2.0315)


# ---------------------------------------------------------------------------------------------- reference
def ns64(d: torch.Tensor, coeffs: list[tuple[float, float, float]]) -> torch.Tensor:
    tall = d.shape[0] > d.shape[1]
    x = (d.T if tall else d).double()
    x = x / x.norm()
    for a, b, c in coeffs:
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


def scale64(m: int, n: int, mode: str) -> float:
    return {"spectral": max(m, n) ** 0.5, "shape_scaling": max(1.0, m / n) ** 0.5, "unit_rms_norm": (m / n) ** 0.5}[
        mode
    ]


def muon_reference(
    w0: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    method: str,
    nesterov: bool,
    coefficient_type: str,
    steps: int,
    scale_mode: str,
    extra: float,
) -> list[torch.Tensor]:
    """Muon from its formulas, float64, one matrix at a time."""
    coeffs = get_coefficients(steps, coefficient_type)  # type: ignore[arg-type]
    ws = [w.double().clone() for w in w0]
    bufs = [torch.zeros_like(w) for w in ws]
    factor = {"decoupled": lr * weight_decay, "independent": weight_decay, "palm": lr * lr * weight_decay}
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            g = g.double()
            if method == "l2":
                g = g + weight_decay * ws[i]
            else:
                ws[i] = ws[i] * (1 - factor[method])
            bufs[i] = momentum * bufs[i] + (1 - momentum) * g
            d = (1 - momentum) * g + momentum * bufs[i] if nesterov else bufs[i]
            u = ns64(d, coeffs) * scale64(d.shape[0], d.shape[1], scale_mode) * extra
            ws[i] = ws[i] - lr * u
    return ws


def run_steps(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()


CONFIGS = [
    {
        "method": "decoupled",
        "nesterov": False,
        "coefficient_type": "quintic",
        "steps": 5,
        "scale_mode": "spectral",
        "extra": 1.0,
    },
    {
        "method": "l2",
        "nesterov": True,
        "coefficient_type": "polar_express",
        "steps": 8,
        "scale_mode": "shape_scaling",
        "extra": 1.0,
    },
    {
        "method": "independent",
        "nesterov": True,
        "coefficient_type": "simple",
        "steps": 4,
        "scale_mode": "unit_rms_norm",
        "extra": 0.2,
    },
    {
        "method": "palm",
        "nesterov": False,
        "coefficient_type": "cubic5",
        "steps": 5,
        "scale_mode": "spectral",
        "extra": 0.5,
    },
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['method']}-{c['coefficient_type']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(cfg: dict[str, Any], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 10), (12, 5), (7, 7)]
    w0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(4)]
    hp: dict[str, Any] = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.1}
    params = [torch.nn.Parameter(w.clone().to(dtype)) for w in w0]
    opt = Muon(
        params,
        **hp,
        nesterov=cfg["nesterov"],
        weight_decay_method=cfg["method"],
        coefficient_type=cfg["coefficient_type"],
        num_ns_steps=cfg["steps"],
        scale_mode=cfg["scale_mode"],
        extra_scale_factor=cfg["extra"],
    )
    run_steps(opt, params, grads)
    ref = muon_reference(w0, grads, **hp, **cfg)
    # float64: same arithmetic up to rounding. float32: Newton-Schulz rounding (<= ~1e-5 relative, see
    # test_newton_schulz) times lr * scale (<= 0.02 * sqrt(12)) per step, on weights of size ~1.
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------- torch.optim.Muon
def torch_ns_float32(
    grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """torch.optim.Muon's iteration with its bf16 cast removed (written here from its formulas)."""
    a, b, c = ns_coefficients
    x = grad.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize(
    "adjust,scale_mode,extra", [("match_rms_adamw", "spectral", 0.2), ("original", "shape_scaling", 1.0)]
)
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("bf16_ns", [False, True])
def test_matches_torch_muon(
    monkeypatch: pytest.MonkeyPatch, adjust: str, scale_mode: Any, extra: float, nesterov: bool, bf16_ns: bool
) -> None:
    """Coinciding settings: simple coefficients, 5 steps, decoupled decay, scale = torch's adjust_lr_fn."""
    if not bf16_ns:
        monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", torch_ns_float32)
    gen = torch.Generator().manual_seed(1)
    shapes = [(8, 12), (16, 6)]
    w0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    ours = [torch.nn.Parameter(w.clone()) for w in w0]
    theirs = [torch.nn.Parameter(w.clone()) for w in w0]
    hp: dict[str, Any] = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1, "nesterov": nesterov}
    run_steps(
        Muon(ours, **hp, coefficient_type="simple", num_ns_steps=5, scale_mode=scale_mode, extra_scale_factor=extra),
        ours,
        grads,
    )
    run_steps(torch.optim.Muon(theirs, **hp, ns_coefficients=SIMPLE, ns_steps=5, adjust_lr_fn=adjust), theirs, grads)
    for p, q, w in zip(ours, theirs, w0):
        moved = (q.detach() - w * (1 - 0.05 * 0.1) ** 3).norm()
        err = (p.detach() - q.detach()).norm() / moved
        # float32 on both sides: rounding only. torch's own bf16 iteration: ~2^-8 relative per product,
        # amplified over 5 steps (measured 9e-3 .. 1.4e-2 of the displacement; float32: 1.6e-6).
        assert err < (3e-2 if bf16_ns else 1e-5), err.item()


# ---------------------------------------------------------------------------------------------- layouts
def single_updates(
    opt_kwargs: dict[str, Any], mats: list[torch.Tensor], grads: list[torch.Tensor]
) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(m.clone()) for m in mats]
    opt = Muon(params, **opt_kwargs)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return [p.detach() for p in params]


HP: dict[str, Any] = {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}


def test_conv_kernel_is_out_by_in_kh_kw() -> None:
    gen = torch.Generator().manual_seed(2)
    w, g = torch.randn(4, 3, 3, 3, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    (conv,) = single_updates(HP, [w], [g])
    (flat,) = single_updates(HP, [w.reshape(4, 27)], [g.reshape(4, 27)])
    torch.testing.assert_close(conv.reshape(4, 27), flat, rtol=0, atol=1e-6)


def test_stacked_experts_per_matrix() -> None:
    gen = torch.Generator().manual_seed(3)
    w, g = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 4, generator=gen)
    (stacked,) = single_updates({**HP, "stacked_dims": 1}, [w], [g])
    loose = single_updates(HP, list(w), list(g))
    torch.testing.assert_close(stacked, torch.stack(loose), rtol=0, atol=1e-6)
    w4, g4 = torch.randn(2, 2, 6, 3, generator=gen), torch.randn(2, 2, 6, 3, generator=gen)
    (s4,) = single_updates({**HP, "stacked_dims": 2}, [w4], [g4])
    torch.testing.assert_close(
        s4.reshape(4, 6, 3),
        torch.stack(single_updates(HP, list(w4.reshape(4, 6, 3)), list(g4.reshape(4, 6, 3)))),
        rtol=0,
        atol=1e-6,
    )


def test_fused_qkv_split_rows() -> None:
    gen = torch.Generator().manual_seed(4)
    sizes = (4, 2, 6)
    w, g = torch.randn(12, 6, generator=gen), torch.randn(12, 6, generator=gen)
    (fused,) = single_updates({**HP, "split_sizes": sizes}, [w], [g])
    parts = single_updates(HP, list(w.split(sizes)), list(g.split(sizes)))
    torch.testing.assert_close(fused, torch.cat(parts), rtol=0, atol=1e-6)


def test_mixed_groups_and_batching_equal_per_param_loop() -> None:
    """One step over many layouts (shape-bucketed, batched) equals a subclass's per-parameter path."""

    class PerParam(Muon):
        calls = 0

        def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            PerParam.calls += 1
            return super().orthogonalize(p, grad, **kwargs)

    gen = torch.Generator().manual_seed(5)
    shapes = [(6, 5)] * 5 + [(5, 6), (4, 2, 3, 3), (12, 5)]
    ws = [torch.randn(s, generator=gen) for s in shapes]
    gs = [torch.randn(s, generator=gen) for s in shapes]

    def run(cls: type[Muon]) -> list[torch.Tensor]:
        ps = [torch.nn.Parameter(w.clone()) for w in ws]
        opt = cls([{"params": ps[:7]}, {"params": ps[7:], "split_sizes": (6, 6)}], lr=0.1, nesterov=True)
        for _ in range(2):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in ps]

    for a, b in zip(run(Muon), run(PerParam)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert PerParam.calls == 2 * len(shapes)


def test_large_shapes_fast_path_equals_plain() -> None:
    """Through Muon, ns_method="auto" (Gram form here) equals the plain iteration up to float32 rounding."""
    gen = torch.Generator().manual_seed(6)
    w, g = torch.randn(400, 96, generator=gen), torch.randn(400, 96, generator=gen)
    (auto,) = single_updates(HP, [w], [g])
    (plain,) = single_updates({**HP, "ns_method": "plain"}, [w], [g])
    assert ((auto - plain).norm() / (plain - w).norm()).item() < 2e-5


def test_custom_coefficients_are_used() -> None:
    gen = torch.Generator().manual_seed(7)
    w, g = torch.randn(6, 9, generator=gen), torch.randn(6, 9, generator=gen)
    quintic = list(COEFFICIENT_SETS["quintic"][0])
    (custom,) = single_updates({**HP, "coefficient_type": "custom", "custom_coefficient_sets": quintic}, [w], [g])
    (named,) = single_updates(HP, [w], [g])
    assert torch.equal(custom, named)
    (other,) = single_updates({**HP, "coefficient_type": "custom", "custom_coefficient_sets": [SIMPLE]}, [w], [g])
    assert not torch.allclose(other, named)


# ---------------------------------------------------------------------------------------------- dtypes, state
def test_bf16_params_and_fp32_momentum() -> None:
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(8, 6, generator=gen).bfloat16()
    grads = [[torch.randn(8, 6, generator=gen).bfloat16()] for _ in range(3)]
    p16 = torch.nn.Parameter(w.clone())
    p16f = torch.nn.Parameter(w.clone())
    p32 = torch.nn.Parameter(w.float())
    run_steps(Muon([p16], lr=0.01), [p16], grads)
    opt = Muon([p16f], lr=0.01, momentum_dtype=torch.float32)
    run_steps(opt, [p16f], grads)
    run_steps(Muon([p32], lr=0.01), [p32], grads)
    assert p16.dtype == torch.bfloat16 and opt.state[p16f]["momentum_buffer"].dtype == torch.float32
    # one bf16 rounding of the weights per step (2^-8 relative, |w| <~ 3) plus bf16 momentum rounding
    torch.testing.assert_close(p16f.detach().float(), p32.detach(), rtol=0, atol=3 * 3 * 2**-8)
    torch.testing.assert_close(p16.detach().float(), p32.detach(), rtol=0, atol=3 * 3 * 2**-8)


def test_closure_and_state_dict_bit_identical_resume() -> None:
    gen = torch.Generator().manual_seed(9)
    shapes = [(6, 4), (3, 2, 2, 2), (6, 5)]
    w0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]

    def make(ps: Sequence[torch.Tensor]) -> Muon:
        return Muon(
            [{"params": list(ps[:2])}, {"params": list(ps[2:]), "split_sizes": (2, 4), "nesterov": True}],
            lr=0.05,
            momentum_dtype=torch.float64,
        )

    full = [torch.nn.Parameter(w.clone()) for w in w0]
    run_steps(make(full), full, grads)
    half = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = make(half)
    run_steps(opt, half, grads[:2])
    sd = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in half]
    opt2 = Muon(resumed, lr=1.0)  # wrong groups on purpose: load_state_dict must refuse
    with pytest.raises(ValueError, match="param groups"):
        opt2.load_state_dict(sd)
    opt2 = make(resumed)
    opt2.load_state_dict(sd)
    assert opt2.state[resumed[0]]["momentum_buffer"].dtype == torch.float64
    assert opt2.param_groups[1]["split_sizes"] == (2, 4) and opt2.state[resumed[0]]["step"] == 2
    run_steps(opt2, resumed, grads[2:])
    for a, b in zip(full, resumed):
        assert torch.equal(a.detach(), b.detach())

    x = torch.randn(3, 4, generator=gen)
    w = torch.nn.Parameter(torch.randn(5, 4, generator=gen))
    opt3 = Muon([w])

    def closure() -> torch.Tensor:
        opt3.zero_grad()
        loss = (x @ w.T).square().sum()
        loss.backward()
        return loss

    w_before = w.detach().clone()
    loss = opt3.step(closure)
    assert loss.grad_fn is not None and not torch.equal(w.detach(), w_before)


# ---------------------------------------------------------------------------------------------- API, errors
def test_scale_factor_and_registry() -> None:
    assert get_muon_scale_factor(4, 16) == 4.0
    assert get_muon_scale_factor(16, 4, "shape_scaling") == 2.0 and get_muon_scale_factor(4, 16, "shape_scaling") == 1.0
    assert math.isclose(get_muon_scale_factor(4, 16, "unit_rms_norm"), 0.5)
    with pytest.raises(ValueError, match="scale_mode"):
        get_muon_scale_factor(4, 4, "nuclear")  # type: ignore[arg-type]
    assert registry.get_optimizer_cls("muon") is Muon
    opt = Muon([torch.nn.Parameter(torch.randn(2, 2))], num_ns_steps=7, coefficient_type="simple")
    assert (opt.num_ns_steps, opt.coefficient_type, opt.scale_mode, opt.extra_scale_factor) == (
        7,
        "simple",
        "spectral",
        1.0,
    )
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["momentum"] == 0.95 and opt.defaults["weight_decay"] == 0.01
    assert opt.defaults["fp32_matmul_prec"] == "medium" and opt.defaults["weight_decay_method"] == "decoupled"
    with pytest.raises(AttributeError):
        opt.num_ns_steps = 3  # type: ignore[misc]


def test_one_dimensional_params_point_to_adamw() -> None:
    with pytest.raises(ValueError, match="AdamW"):
        Muon([torch.nn.Parameter(torch.randn(5))])
    with pytest.raises(ValueError, match="AdamW"):
        Muon([torch.nn.Parameter(torch.tensor(1.0))])


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"stacked_dims": 2}, "stacked_dims"),
        ({"split_sizes": (3, 3)}, "split_sizes"),
        ({"split_sizes": (4, 0)}, "split_sizes"),
        ({"num_ns_steps": 0}, "num_ns_steps"),
        ({"coefficient_type": "custom"}, "custom_coefficient_sets"),
        ({"coefficient_type": "cubic5", "num_ns_steps": 3}, "exactly 5"),
        ({"scale_mode": "nuclear"}, "scale_mode"),
        ({"extra_scale_factor": 0.0}, "extra_scale_factor"),
        ({"ns_method": "fastest"}, "ns_method"),
        ({"ns_compute_dtype": torch.int8}, "ns_compute_dtype"),
        ({"lr": -1.0}, "lr"),
        ({"use_syrk": "yes"}, "use_syrk"),
    ],
)
def test_bad_options(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(TypeError if "use_syrk" in kw else ValueError, match=match):
        Muon([torch.nn.Parameter(torch.randn(4, 3, 2))], **kw)


def test_updates_are_applied_bucket_by_bucket(monkeypatch):
    """Each bucket's updates are applied before the next bucket is orthogonalized (as torch.optim.Muon does),
    so the step holds one bucket's directions and updates at a time, not the whole group's."""
    import emerging_optimizers as eo
    from emerging_optimizers.orthogonalized_optimizers import muon as muon_module

    events: list[tuple[str, tuple[int, ...]]] = []
    real_ns = muon_module.scaled_newton_schulz
    monkeypatch.setattr(muon_module, "scaled_newton_schulz",
                        lambda x, **kw: events.append(("ns", tuple(x.shape[-2:]))) or real_ns(x, **kw))
    real_apply = eo.Muon._apply_update
    monkeypatch.setattr(eo.Muon, "_apply_update",
                        lambda self, p, u, lr: events.append(("apply", tuple(p.shape))) or real_apply(self, p, u, lr))
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((8, 16), (16, 16), (8, 16), (16, 16))]
    opt = eo.Muon(params, lr=0.02)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    assert events == [("ns", (8, 16)), ("apply", (8, 16)), ("apply", (8, 16)),
                      ("ns", (16, 16)), ("apply", (16, 16)), ("apply", (16, 16))]
