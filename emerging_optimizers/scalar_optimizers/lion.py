r"""Lion (arXiv:2302.06675): the sign of an interpolation between momentum and gradient.

.. math::
    u_t = \operatorname{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t),\qquad m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t
"""

from __future__ import annotations

from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers.base import ScalarOptimizer
from emerging_optimizers.utils import check_betas

__all__ = ["calculate_lion_update", "lion_kernel", "Lion"]


def lion_kernel(grad: torch.Tensor, exp_avg: torch.Tensor, *, beta1: float, beta2: float) -> torch.Tensor:
    update = exp_avg.lerp(grad, 1.0 - beta1).sign_()
    exp_avg.lerp_(grad, 1.0 - beta2)
    return update


def calculate_lion_update(grad: torch.Tensor, exp_avg: torch.Tensor, momentum_beta: float,
                          momentum_beta2: float | None = None) -> torch.Tensor:
    """Lion's update from the *old* ``exp_avg``, which is then updated in place (``beta2`` defaults to ``beta1``)."""
    beta2 = momentum_beta if momentum_beta2 is None else momentum_beta2
    return lion_kernel(grad, exp_avg, beta1=momentum_beta, beta2=beta2)


@register_optimizer("lion")
class Lion(ScalarOptimizer):
    """Lion with the paper's and reference's defaults: ``lr=1e-4``, ``betas=(0.9, 0.99)``, ``weight_decay=0.01``
    decoupled (Lion's sign update has unit RMS, so it wants an lr 3-10x below AdamW's and a larger decay).
    """

    scalars_use_param = False

    state_keys = ("exp_avg",)
    kernel = staticmethod(lion_kernel)

    def __init__(self, params: ParamsT, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.01, *, weight_decay_method: WeightDecayT = "decoupled",
                 fused: bool | None = None, fp32_state: bool = False, state_dtype: torch.dtype | None = None,
                 nonfinite: NonfiniteT = "skip") -> None:
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, weight_decay_method=weight_decay_method)
        super().__init__(params, defaults, fused=fused, fp32_state=fp32_state, nonfinite=nonfinite,
                         state_dtype=state_dtype)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_betas("betas", group["betas"], 2)

    def scalars(self, group: dict[str, Any], step: int, p: torch.Tensor) -> dict[str, Any]:
        b1, b2 = group["betas"]
        return dict(beta1=b1, beta2=b2)
