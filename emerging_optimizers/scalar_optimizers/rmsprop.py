r"""RMSProp (Tieleman & Hinton, 2012) without momentum or centering, as ``torch.optim.RMSprop(momentum=0)``.

.. math:: v_t = \alpha v + (1-\alpha) g^2,\qquad u_t = g / (\sqrt{v_t} + \epsilon)

No bias correction (``step`` is accepted for a uniform signature and unused).
"""

from __future__ import annotations

from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers.base import ScalarOptimizer
from emerging_optimizers.utils import check_beta, check_nonneg

__all__ = ["calculate_rmsprop_update", "rmsprop_kernel", "RMSProp"]


def rmsprop_kernel(grad: torch.Tensor, exp_avg_sq: torch.Tensor, *, alpha: float, eps: float) -> torch.Tensor:
    exp_avg_sq.lerp_(grad * grad, 1.0 - alpha)
    return grad / (exp_avg_sq.sqrt() + eps)


def calculate_rmsprop_update(grad: torch.Tensor, exp_avg_sq: torch.Tensor, alpha: float, eps: float,
                             step: int | None = None) -> torch.Tensor:
    """RMSProp's update for one tensor; ``exp_avg_sq`` updated in place, ``grad`` untouched."""
    return rmsprop_kernel(grad, exp_avg_sq, alpha=alpha, eps=eps)


@register_optimizer("rmsprop")
class RMSProp(ScalarOptimizer):
    """RMSProp with torch.optim.RMSprop's defaults: ``lr=1e-2``, ``alpha=0.99``, ``eps=1e-8``, no weight decay.

    ``weight_decay_method`` defaults to ``"decoupled"`` like every optimizer here; torch's RMSprop decay is
    ``"l2"``.
    """

    scalars_use_param = False

    state_keys = ("exp_avg_sq",)
    kernel = staticmethod(rmsprop_kernel)

    def __init__(self, params: ParamsT, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, *, weight_decay_method: WeightDecayT = "decoupled",
                 fused: bool | None = None, fp32_state: bool = False, state_dtype: torch.dtype | None = None,
                 nonfinite: NonfiniteT = "skip") -> None:
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, weight_decay_method=weight_decay_method)
        super().__init__(params, defaults, fused=fused, fp32_state=fp32_state, nonfinite=nonfinite,
                         state_dtype=state_dtype)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_beta("alpha", group["alpha"])
        check_nonneg("eps", group["eps"])

    def scalars(self, group: dict[str, Any], step: int, p: torch.Tensor) -> dict[str, Any]:
        return dict(alpha=group["alpha"], eps=group["eps"])
