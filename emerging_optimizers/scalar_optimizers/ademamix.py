r"""AdEMAMix (arXiv:2409.03137) and its simplified, "theory-style" variant (arXiv:2502.02431).

AdEMAMix mixes a fast and a slow EMA of the gradient:

.. math::
    m^f_t = \beta_f m^f + (1-\beta_f) g,\quad m^s_t = \beta_s(t) m^s + (1-\beta_s(t)) g,\quad
    v_t = \beta_2 v + (1-\beta_2) g^2 \\
    u_t = \frac{m^f_t/(1-\beta_f^t) + \alpha_t m^s_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

with optional warm-ups: ``alpha_t`` linear from 0 and ``beta_s(t)`` linear *in half-life* from ``beta_f``.
The slow EMA is never bias-corrected.

Simplified AdEMAMix accumulates instead of averaging, ``m_t = beta_f(t) m + g``, and uses
``u = (alpha g + m/bc1) / (sqrt(v/bc2) + eps)`` with ``bc1 = (1 - beta_f^t)/(1 - beta_f)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers._schedulers import half_life_warmup, linear_warmup
from emerging_optimizers.scalar_optimizers.base import ScalarOptimizer
from emerging_optimizers.utils import check_beta, check_betas, check_nonneg, check_positive_int

__all__ = ["calculate_ademamix_update", "calculate_sim_ademamix_update", "ademamix_scalars", "ademamix_kernel",
           "sim_ademamix_scalars", "sim_ademamix_kernel", "AdEMAMix", "SimplifiedAdEMAMix"]


def ademamix_scalars(num_beta_slow_warmup_steps: int | None, num_alpha_warmup_steps: int | None,
                     betas: tuple[float, float, float], step: int, eps: float, correct_bias: bool,
                     alpha: float) -> dict[str, float]:
    b_fast, b2, b_slow_final = betas
    return dict(
        beta_fast=b_fast,
        beta2=b2,
        beta_slow=half_life_warmup(step, b_fast, b_slow_final, num_beta_slow_warmup_steps),
        alpha=linear_warmup(step, alpha, num_alpha_warmup_steps),
        bc1=1.0 - b_fast**step if correct_bias else 1.0,
        bc2_sqrt=math.sqrt(1.0 - b2**step) if correct_bias else 1.0,
        eps=eps,
    )


def ademamix_kernel(grad: torch.Tensor, exp_avg_fast: torch.Tensor, exp_avg_slow: torch.Tensor,
                    exp_avg_sq: torch.Tensor, *, beta_fast: float, beta2: float, beta_slow: float, alpha: float,
                    bc1: float, bc2_sqrt: float, eps: float) -> torch.Tensor:
    exp_avg_fast.lerp_(grad, 1.0 - beta_fast)
    exp_avg_slow.lerp_(grad, 1.0 - beta_slow)
    exp_avg_sq.lerp_(grad * grad, 1.0 - beta2)
    return (exp_avg_fast / bc1 + alpha * exp_avg_slow) / (exp_avg_sq.sqrt() / bc2_sqrt + eps)


def calculate_ademamix_update(grad: torch.Tensor, exp_avg_fast: torch.Tensor, exp_avg_slow: torch.Tensor,
                              exp_avg_sq: torch.Tensor, num_beta_slow_warmup_steps: int | None,
                              num_alpha_warmup_steps: int | None, betas: tuple[float, float, float], step: int,
                              eps: float, correct_bias: bool, alpha: float = 2) -> torch.Tensor:
    """AdEMAMix's update for one tensor; the three state tensors are updated in place, ``grad`` is not."""
    scalars = ademamix_scalars(num_beta_slow_warmup_steps, num_alpha_warmup_steps, betas, step, eps, correct_bias,
                               alpha)
    return ademamix_kernel(grad, exp_avg_fast, exp_avg_slow, exp_avg_sq, **scalars)


def sim_ademamix_scalars(num_beta_fast_warmup_steps: int | None, min_beta_fast: float, betas: tuple[float, float],
                         step: int, eps: float, correct_bias: bool, alpha: float) -> dict[str, float]:
    b_fast_final, b2 = betas
    b_fast = half_life_warmup(step, min_beta_fast, b_fast_final, num_beta_fast_warmup_steps)
    return dict(
        beta_fast=b_fast,
        beta2=b2,
        alpha=alpha,
        bc1=(1.0 - b_fast**step) / (1.0 - b_fast) if correct_bias else 1.0,
        bc2_sqrt=math.sqrt(1.0 - b2**step) if correct_bias else 1.0,
        eps=eps,
    )


def sim_ademamix_kernel(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, beta_fast: float,
                        beta2: float, alpha: float, bc1: float, bc2_sqrt: float, eps: float) -> torch.Tensor:
    exp_avg.mul_(beta_fast).add_(grad)
    exp_avg_sq.lerp_(grad * grad, 1.0 - beta2)
    return (alpha * grad + exp_avg / bc1) / (exp_avg_sq.sqrt() / bc2_sqrt + eps)


def calculate_sim_ademamix_update(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                                  num_beta_fast_warmup_steps: int | None, min_beta_fast: float,
                                  betas: tuple[float, float], step: int, eps: float, correct_bias: bool,
                                  alpha: float = 2) -> torch.Tensor:
    """Simplified AdEMAMix's update for one tensor; state updated in place, ``grad`` untouched."""
    scalars = sim_ademamix_scalars(num_beta_fast_warmup_steps, min_beta_fast, betas, step, eps, correct_bias, alpha)
    return sim_ademamix_kernel(grad, exp_avg, exp_avg_sq, **scalars)


@register_optimizer("ademamix")
class AdEMAMix(ScalarOptimizer):
    """AdEMAMix.

    Defaults: ``betas=(0.9, 0.999, 0.9999)`` (fast, second moment, slow: the paper's), ``alpha=2.0`` (the
    documented function default; the paper uses 5-8 for LLM pre-training together with warm-ups of
    ``alpha`` and ``beta_slow`` over the whole run, which we leave off by default because they need the run
    length), ``eps=1e-8``, no weight decay. State: ``exp_avg_fast``, ``exp_avg_slow``, ``exp_avg_sq``.
    """

    scalars_use_param = False

    state_keys = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
    kernel = staticmethod(ademamix_kernel)

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, alpha: float = 2.0,
                 num_alpha_warmup_steps: int | None = None, num_beta_slow_warmup_steps: int | None = None,
                 correct_bias: bool = True, weight_decay_method: WeightDecayT = "decoupled",
                 fused: bool | None = None, fp32_state: bool = False, state_dtype: torch.dtype | None = None,
                 nonfinite: NonfiniteT = "skip") -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, alpha=alpha,
                        num_alpha_warmup_steps=num_alpha_warmup_steps,
                        num_beta_slow_warmup_steps=num_beta_slow_warmup_steps, correct_bias=correct_bias,
                        weight_decay_method=weight_decay_method)
        super().__init__(params, defaults, fused=fused, fp32_state=fp32_state, nonfinite=nonfinite,
                         state_dtype=state_dtype)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_betas("betas", group["betas"], 3)
        check_nonneg("eps", group["eps"])
        check_nonneg("alpha", group["alpha"])
        check_positive_int("num_alpha_warmup_steps", group["num_alpha_warmup_steps"], allow_none=True)
        check_positive_int("num_beta_slow_warmup_steps", group["num_beta_slow_warmup_steps"], allow_none=True)

    def scalars(self, group: dict[str, Any], step: int, p: torch.Tensor) -> dict[str, Any]:
        return ademamix_scalars(group["num_beta_slow_warmup_steps"], group["num_alpha_warmup_steps"],
                                group["betas"], step, group["eps"], group["correct_bias"], group["alpha"])


@register_optimizer("sim_ademamix")
class SimplifiedAdEMAMix(ScalarOptimizer):
    """Simplified AdEMAMix, with the reference's defaults: ``betas=(0.9999, 0.999)``, ``alpha=2.0``,
    ``min_beta_fast=0.9``, no warm-up, ``eps=1e-8``. State: ``exp_avg`` (an accumulation), ``exp_avg_sq``.
    """

    scalars_use_param = False

    state_keys = ("exp_avg", "exp_avg_sq")
    kernel = staticmethod(sim_ademamix_kernel)

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9999, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, correct_bias: bool = True,
                 num_beta_fast_warmup_steps: int | None = None, min_beta_fast: float = 0.9, alpha: float = 2.0,
                 weight_decay_method: WeightDecayT = "decoupled", fused: bool | None = None,
                 fp32_state: bool = False, state_dtype: torch.dtype | None = None,
                 nonfinite: NonfiniteT = "skip") -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        num_beta_fast_warmup_steps=num_beta_fast_warmup_steps, min_beta_fast=min_beta_fast,
                        alpha=alpha, weight_decay_method=weight_decay_method)
        super().__init__(params, defaults, fused=fused, fp32_state=fp32_state, nonfinite=nonfinite,
                         state_dtype=state_dtype)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_betas("betas", group["betas"], 2)
        check_nonneg("eps", group["eps"])
        check_nonneg("alpha", group["alpha"])
        check_beta("min_beta_fast", group["min_beta_fast"])
        check_positive_int("num_beta_fast_warmup_steps", group["num_beta_fast_warmup_steps"], allow_none=True)

    def scalars(self, group: dict[str, Any], step: int, p: torch.Tensor) -> dict[str, Any]:
        return sim_ademamix_scalars(group["num_beta_fast_warmup_steps"], group["min_beta_fast"], group["betas"],
                                    step, group["eps"], group["correct_bias"], group["alpha"])
