"""Muon's fast paths equal the plain per-matrix path (float64, several steps and hyperparameters).

The fast paths: shape-batched Newton-Schulz (same-shape matrices stacked), multi-tensor (``torch._foreach_*``)
momentum and parameter updates, remembered coefficient and method choices. The plain path: one matrix at a
time through :meth:`OrthogonalizedOptimizer._momentum_direction`, :meth:`Muon.orthogonalize` and
:meth:`OrthogonalizedOptimizer._apply_update` (forced by a subclass that overrides them with themselves).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from emerging_optimizers.orthogonalized_optimizers import Muon, muon_utils
from emerging_optimizers.orthogonalized_optimizers.orthogonalized_optimizer import OrthogonalizedOptimizer

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-13), torch.float32: dict(rtol=1e-5, atol=1e-6)}


class PerMatrixMuon(Muon):
    """Muon forced onto the plain path: one parameter at a time, no multi-tensor ops, no batching."""

    def _momentum_direction(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        return OrthogonalizedOptimizer._momentum_direction(self, p, group)

    def _apply_update(self, p: torch.Tensor, update: torch.Tensor, lr: float) -> None:
        OrthogonalizedOptimizer._apply_update(self, p, update, lr)

    def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return Muon.orthogonalize(self, p, grad, **kwargs)


SHAPES = {
    "mlp": [(128, 64), (128, 128), (128, 64)],
    "mixed": [(16, 48), (48, 16), (16, 48), (24, 24), (24, 24), (32, 8)],
    "conv": [(8, 4, 3, 3), (8, 4, 3, 3), (16, 8)],
}


def _run(cls: type, shapes: list[tuple[int, ...]], dtype: torch.dtype, steps: int, **kw: Any) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]
    opt = cls(params, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]


@pytest.mark.parametrize("shapes", list(SHAPES))
@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=False),
        dict(lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=True),
        dict(lr=0.01, momentum=0.8, weight_decay=0.05, weight_decay_method="l2", nesterov=True),
        dict(lr=0.01, momentum=0.9, weight_decay=0.05, weight_decay_method="independent"),
        dict(lr=0.01, momentum=0.9, weight_decay=0.0, coefficient_type="polar_express", scale_mode="shape_scaling"),
        dict(lr=0.01, momentum=0.9, weight_decay=0.01, ns_method="plain", extra_scale_factor=0.2),
    ],
)
def test_fast_path_equals_per_matrix_path(shapes: str, kw: dict[str, Any]) -> None:
    fast = _run(Muon, SHAPES[shapes], torch.float64, 4, **kw)
    plain = _run(PerMatrixMuon, SHAPES[shapes], torch.float64, 4, **kw)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("kw", [dict(split_sizes=(4, 8)), dict(stacked_dims=1)])
def test_split_and_stacked_layouts(kw: dict[str, Any]) -> None:
    shapes = [(12, 8), (12, 8), (12, 20)] if "split_sizes" in kw else [(3, 8, 5), (3, 8, 5), (2, 5, 8)]
    common = dict(lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=True, **kw)
    fast, plain = (_run(cls, shapes, torch.float64, 3, **common) for cls in (Muon, PerMatrixMuon))
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_fast_path_equals_per_matrix_path_float32() -> None:
    kw = dict(lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=True)
    fast = _run(Muon, SHAPES["mixed"], torch.float32, 3, **kw)
    plain = _run(PerMatrixMuon, SHAPES["mixed"], torch.float32, 3, **kw)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_mixed_dtypes_take_the_loop_and_agree() -> None:
    """bf16 params with float32 momentum (``momentum_dtype``): per-parameter momentum, same result."""
    shapes = SHAPES["mixed"]
    kw = dict(lr=0.02, momentum=0.9, weight_decay=0.1, nesterov=True, momentum_dtype=torch.float32)

    def run(cls: type) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in shapes]
        opt = cls(params, **kw)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).bfloat16()
            opt.step()
        return [p.detach().float() for p in params]

    for a, b in zip(run(Muon), run(PerMatrixMuon)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_wrong_update_shape_still_raises_before_any_change() -> None:
    class Bad(Muon):
        def _orthogonalize_params(self, params: Any, directions: Any, group: Any) -> list[torch.Tensor]:
            return [d.reshape(-1) for d in directions]

    p = torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt = Bad([p], lr=0.1, weight_decay=0.0)
    with pytest.raises(ValueError, match="must return the parameter's shape"):
        opt.step()
    torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [{}, {"coefficient_type": "polar_express"}, {"method": "gram"},
                                {"coefficient_type": "custom", "custom_coefficient_sets": ((3.0, -3.2, 1.2),)},
                                {"coefficient_type": "custom", "custom_coefficient_sets": [[3.0, -3.2, 1.2]]}])
def test_remembered_choices_equal_fresh_ones(kw: dict[str, Any]) -> None:
    """newton_schulz's remembered coefficients and method give the same result as computing them afresh."""
    x = torch.randn(3, 24, 56, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first = muon_utils.newton_schulz(x, 5, **kw)
    muon_utils._cached_coefficients.cache_clear()
    muon_utils._choose_method_cached.cache_clear()
    muon_utils._gram_segments_cached.cache_clear()
    torch.testing.assert_close(muon_utils.newton_schulz(x, 5, **kw), first, rtol=0, atol=0)


def test_remembered_coefficients_still_validate() -> None:
    with pytest.raises(ValueError, match="steps"):
        muon_utils.newton_schulz(torch.randn(4, 4), True)  # a bool is no step count, even after 1 was seen
    muon_utils.newton_schulz(torch.randn(4, 4), 1)
    with pytest.raises(ValueError, match="steps"):
        muon_utils.newton_schulz(torch.randn(4, 4), True)
    with pytest.raises(ValueError, match="custom_coefficient_sets"):
        muon_utils.newton_schulz(torch.randn(4, 4), 2, "custom", ((1.0, float("nan"), 0.0),))
