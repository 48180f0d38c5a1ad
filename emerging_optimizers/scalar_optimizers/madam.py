r"""MAdam, "magnitude-aware Adam": Adam without epsilon whose second moment is kept scaled by ``s = 2**k``.

.. math::
    v'_t = \beta_2 v' + (1-\beta_2)(\sqrt s\, g)^2,\quad m_t = \beta_1 m + (1-\beta_1) g,\quad
    u_t = \sqrt s\, \frac{m_t/(1-\beta_1^t)}{\sqrt{v'_t/(1-\beta_2^t)}}, \;\; u_t = 0 \text{ where } m_t = 0

Scaling the squares by a power of two keeps tiny gradients' squares out of the subnormal range (useful
for low-precision state) and, with an even ``k``, is exact: without underflow MAdam equals Adam with eps=0.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers.base import ScalarOptimizer
from emerging_optimizers.utils import check_betas

__all__ = ["calculate_madam_update", "madam_scalars", "madam_kernel", "MAdam"]


def _check_scale_log2(scale_log2: Any) -> None:
    if isinstance(scale_log2, bool) or not isinstance(scale_log2, int) or scale_log2 % 2:
        raise ValueError(f"Invalid scale_log2: {scale_log2!r}; it must be an even integer (sqrt(2**k) must be exact).")


def madam_scalars(betas: tuple[float, float], correct_bias: bool, step: int, scale_log2: int) -> dict[str, float]:
    _check_scale_log2(scale_log2)
    b1, b2 = betas
    return dict(beta1=b1, beta2=b2, sqrt_scale=2.0 ** (scale_log2 // 2),
                bc1=1.0 - b1**step if correct_bias else 1.0,
                bc2_sqrt=math.sqrt(1.0 - b2**step) if correct_bias else 1.0)


def madam_kernel(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq_scaled: torch.Tensor, *, beta1: float,
                 beta2: float, sqrt_scale: float, bc1: float, bc2_sqrt: float) -> torch.Tensor:
    exp_avg.lerp_(grad, 1.0 - beta1)
    scaled = grad * sqrt_scale
    exp_avg_sq_scaled.lerp_(scaled * scaled, 1.0 - beta2)
    # (m / bc1) * sqrt(s) / (sqrt(s * v) / bc2_sqrt): with sqrt(s) a power of two, bit-identical to Adam (eps=0)
    # No eps: where m or v is exactly 0 (v underflowed, or betas[1] == 0 after a zero gradient) the step is 0,
    # not m/0 = inf (or 0/0 = NaN).
    update = (exp_avg / bc1 * sqrt_scale) / (exp_avg_sq_scaled.sqrt() / bc2_sqrt)
    return torch.where((exp_avg == 0) | (exp_avg_sq_scaled == 0), torch.zeros_like(update), update)


def calculate_madam_update(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq_scaled: torch.Tensor,
                           betas: tuple[float, float], correct_bias: bool, step: int,
                           scale_log2: int = 16) -> torch.Tensor:
    """MAdam's update for one tensor; both moments updated in place, ``grad`` untouched."""
    return madam_kernel(grad, exp_avg, exp_avg_sq_scaled, **madam_scalars(betas, correct_bias, step, scale_log2))


@register_optimizer("madam")
class MAdam(ScalarOptimizer):
    """MAdam: ``lr=1e-3``, ``betas=(0.9, 0.999)`` (Adam's), ``scale_log2=16`` (the reference's KL-M-SOAP choice).

    State: ``exp_avg``, ``exp_avg_sq`` (holding ``2**scale_log2`` times the EMA of ``g**2``).
    """

    scalars_use_param = False

    state_keys = ("exp_avg", "exp_avg_sq")
    kernel = staticmethod(madam_kernel)

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, *, correct_bias: bool = True, scale_log2: int = 16,
                 weight_decay_method: WeightDecayT = "decoupled", fused: bool | None = None,
                 fp32_state: bool = False, state_dtype: torch.dtype | None = None,
                 nonfinite: NonfiniteT = "skip") -> None:
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, correct_bias=correct_bias,
                        scale_log2=scale_log2, weight_decay_method=weight_decay_method)
        super().__init__(params, defaults, fused=fused, fp32_state=fp32_state, nonfinite=nonfinite,
                         state_dtype=state_dtype)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_betas("betas", group["betas"], 2)
        _check_scale_log2(group["scale_log2"])

    def scalars(self, group: dict[str, Any], step: int, p: torch.Tensor) -> dict[str, Any]:
        return madam_scalars(group["betas"], group["correct_bias"], step, group["scale_log2"])
