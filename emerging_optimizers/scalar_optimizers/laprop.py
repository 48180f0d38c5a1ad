r"""LaProp (arXiv:2002.04839): Adam with the momentum taken *after* normalization.

.. math::
    v_t = \beta_2 v + (1-\beta_2) g^2,\quad
    m_t = \beta_1 m + (1-\beta_1)\, \frac{g}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon},\quad
    u_t = m_t / (1-\beta_1^t)

``frob_normalize=True`` keeps every parameter's Frobenius norm fixed across the step.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers.base import ScalarOptimizer
from emerging_optimizers.utils import check_betas, check_nonneg

__all__ = ["calculate_laprop_update", "laprop_scalars", "laprop_kernel", "LaProp"]


def laprop_scalars(correct_bias: bool, betas: tuple[float, float], step: int, eps: float) -> dict[str, float]:
    b1, b2 = betas
    return dict(beta1=b1, beta2=b2, eps=eps, bc1=1.0 - b1**step if correct_bias else 1.0,
                bc2_sqrt=math.sqrt(1.0 - b2**step) if correct_bias else 1.0)


def laprop_kernel(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, beta1: float,
                  beta2: float, eps: float, bc1: float, bc2_sqrt: float) -> torch.Tensor:
    exp_avg_sq.lerp_(grad * grad, 1.0 - beta2)
    exp_avg.lerp_(grad / (exp_avg_sq.sqrt() / bc2_sqrt + eps), 1.0 - beta1)
    return exp_avg / bc1


def calculate_laprop_update(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                            correct_bias: bool, betas: tuple[float, float], step: int, eps: float) -> torch.Tensor:
    """LaProp's update for one tensor; state updated in place, ``grad`` untouched."""
    return laprop_kernel(grad, exp_avg, exp_avg_sq, **laprop_scalars(correct_bias, betas, step, eps))


def _norm(p: torch.Tensor) -> torch.Tensor:
    """Frobenius norm in float32, or float64 for float64 weights (a float32 reduction of them would narrow)."""
    return torch.linalg.vector_norm(p, dtype=torch.promote_types(p.dtype, torch.float32))


@register_optimizer("laprop")
class LaProp(ScalarOptimizer):
    """LaProp with the reference defaults: ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``, no weight decay.

    ``frob_normalize``: after the update, rescale ``p`` to its Frobenius norm before the step (a norm
    constraint; combining it with weight decay is pointless, the decay is undone, so it warns).
    """

    scalars_use_param = False

    state_keys = ("exp_avg", "exp_avg_sq")
    kernel = staticmethod(laprop_kernel)

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, correct_bias: bool = True,
                 frob_normalize: bool = False, weight_decay_method: WeightDecayT = "decoupled",
                 fused: bool | None = None, fp32_state: bool = False, state_dtype: torch.dtype | None = None,
                 nonfinite: NonfiniteT = "skip") -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        frob_normalize=frob_normalize, weight_decay_method=weight_decay_method)
        super().__init__(params, defaults, fused=fused, fp32_state=fp32_state, nonfinite=nonfinite,
                         state_dtype=state_dtype)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_betas("betas", group["betas"], 2)
        check_nonneg("eps", group["eps"])
        if group["frob_normalize"] and group["weight_decay"] != 0:
            warnings.warn("LaProp(frob_normalize=True) keeps each parameter's norm fixed, so weight_decay="
                          f"{group['weight_decay']} has no effect.", UserWarning, stacklevel=4)

    def scalars(self, group: dict[str, Any], step: int, p: torch.Tensor) -> dict[str, Any]:
        return laprop_scalars(group["correct_bias"], group["betas"], step, group["eps"])

    def pre_step(self, p: torch.Tensor, group: dict[str, Any]) -> Any:
        return _norm(p) if group["frob_normalize"] else None

    def post_step(self, p: torch.Tensor, group: dict[str, Any], ctx: Any) -> None:
        if ctx is not None:
            norm = _norm(p)
            p.mul_((ctx / norm.clamp_min(group["eps"])).to(p.dtype))
