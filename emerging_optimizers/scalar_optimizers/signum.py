r"""Signum and signSGD (arXiv:1802.04434): the sign of the (optionally Nesterov) momentum.

.. math::
    m_t = \beta m_{t-1} + (1-\beta) g_t,\qquad u_t = \operatorname{sign}(\hat m_t)\cdot s

where ``m_hat`` follows Adam's first moment (bias correction, Nesterov) and ``s = 2/(rows + cols)`` with
``use_shape_scaling`` (2-D parameters only), else 1. Without Nesterov the bias correction is a positive
factor inside the sign and has no effect. ``momentum=0`` is signSGD: no momentum buffer is kept.
"""

from __future__ import annotations

from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers.base import ScalarOptimizer
from emerging_optimizers.utils import check_beta

__all__ = ["calculate_signum_update", "signum_scalars", "signum_kernel", "Signum"]


def _shape_scale(shape: torch.Size) -> float:
    if len(shape) != 2:
        raise ValueError(f"use_shape_scaling needs a 2-D parameter, got shape {tuple(shape)}; "
                         "put other parameters in a param group with use_shape_scaling=False.")
    return 2.0 / (shape[0] + shape[1])


def signum_scalars(momentum_beta: float, correct_bias: bool, use_nesterov: bool, step: int,
                   shape: torch.Size, use_shape_scaling: bool) -> dict[str, Any]:
    b = momentum_beta
    return dict(
        beta=b,
        nesterov=bool(use_nesterov),
        bc1=1.0 - b**step if correct_bias else 1.0,
        bcn=1.0 - b ** (step + 1) if correct_bias else 1.0,
        scale=_shape_scale(shape) if use_shape_scaling else 1.0,
    )


def signum_kernel(grad: torch.Tensor, exp_avg: torch.Tensor | None = None, *, beta: float, nesterov: bool,
                  bc1: float, bcn: float, scale: float) -> torch.Tensor:
    """``exp_avg=None`` is signSGD (no state)."""
    if exp_avg is None:
        direction = grad
    else:
        exp_avg.lerp_(grad, 1.0 - beta)
        direction = exp_avg * (beta / bcn) + grad * ((1.0 - beta) / bc1) if nesterov else exp_avg
    return direction.sign() * scale


def calculate_signum_update(grad: torch.Tensor, exp_avg: torch.Tensor, momentum_beta: float, correct_bias: bool,
                            use_nesterov: bool, step: int, use_shape_scaling: bool = False) -> torch.Tensor:
    """Signum's update for one tensor; ``exp_avg`` updated in place, ``grad`` untouched."""
    scalars = signum_scalars(momentum_beta, correct_bias, use_nesterov, step, grad.shape, use_shape_scaling)
    return signum_kernel(grad, exp_avg, **scalars)


@register_optimizer("signum")
class Signum(ScalarOptimizer):
    """Signum with the reference defaults: ``lr=1e-3``, ``momentum=0.9``, no weight decay, bias correction on,
    no Nesterov, no shape scaling. ``momentum=0`` is signSGD and keeps no state but ``step``.
    """

    scalars_use_param = True  # the shape scaling

    kernel = staticmethod(signum_kernel)

    def __init__(self, params: ParamsT, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0, *,
                 correct_bias: bool = True, nesterov: bool = False, use_shape_scaling: bool = False,
                 weight_decay_method: WeightDecayT = "decoupled", fused: bool | None = None,
                 fp32_state: bool = False, state_dtype: torch.dtype | None = None,
                 nonfinite: NonfiniteT = "skip") -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, correct_bias=correct_bias,
                        nesterov=nesterov, use_shape_scaling=use_shape_scaling,
                        weight_decay_method=weight_decay_method)
        super().__init__(params, defaults, fused=fused, fp32_state=fp32_state, nonfinite=nonfinite,
                         state_dtype=state_dtype)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_beta("momentum", group["momentum"])
        if group["use_shape_scaling"]:
            for p in group["params"]:
                _shape_scale(p.shape)

    def state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg",) if group["momentum"] > 0 else ()

    def scalars(self, group: dict[str, Any], step: int, p: torch.Tensor) -> dict[str, Any]:
        return signum_scalars(group["momentum"], group["correct_bias"], group["nesterov"], step, p.shape,
                              group["use_shape_scaling"])
