r"""AdEMAMix and simplified AdEMAMix with keyword-only hyperparameters; see
:mod:`emerging_optimizers.scalar_optimizers.ademamix`.
"""

from __future__ import annotations

import torch

from emerging_optimizers.scalar_optimizers.ademamix import (
    ademamix_kernel,
    ademamix_scalars,
    sim_ademamix_kernel,
    sim_ademamix_scalars,
)

__all__ = ["calculate_ademamix_update", "calculate_sim_ademamix_update"]


@torch.no_grad()
def calculate_ademamix_update(grad: torch.Tensor, exp_avg_fast: torch.Tensor, exp_avg_slow: torch.Tensor,
                              exp_avg_sq: torch.Tensor, *, betas: tuple[float, float, float], eps: float,
                              correct_bias: bool, step: int, num_beta_slow_warmup_steps: int | None,
                              num_alpha_warmup_steps: int | None, alpha: float = 2) -> torch.Tensor:
    r"""AdEMAMix's update (arXiv:2409.03137) for one tensor; the three state tensors are updated in place.

    .. math::
        m^f \leftarrow \mathrm{EMA}(g; \beta_f),\quad m^s \leftarrow \mathrm{EMA}(g; \beta_s(t)),\quad
        v \leftarrow \mathrm{EMA}(g^2; \beta_2),\quad
        u = \frac{m^f/(1-\beta_f^t) + \alpha_t m^s}{\sqrt{v/(1-\beta_2^t)} + \epsilon}

    ``betas = (beta_fast, beta2, beta_slow_final)``. ``alpha_t`` warms up linearly from 0 over
    ``num_alpha_warmup_steps``, ``beta_s(t)`` linearly in half-life from ``beta_fast`` over
    ``num_beta_slow_warmup_steps`` (``None``: no warm-up). The slow EMA is never bias-corrected. Same numbers
    as :func:`emerging_optimizers.scalar_optimizers.ademamix.calculate_ademamix_update`.
    """
    scalars = ademamix_scalars(num_beta_slow_warmup_steps, num_alpha_warmup_steps, betas, step, eps, correct_bias,
                               alpha)
    return ademamix_kernel(grad, exp_avg_fast, exp_avg_slow, exp_avg_sq, **scalars)


@torch.no_grad()
def calculate_sim_ademamix_update(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                                  betas: tuple[float, float], eps: float, correct_bias: bool, step: int,
                                  num_beta_fast_warmup_steps: int | None, min_beta_fast: float,
                                  alpha: float = 2) -> torch.Tensor:
    r"""Simplified AdEMAMix's update (arXiv:2502.02431) for one tensor; both state tensors updated in place.

    .. math::
        m \leftarrow \beta_f(t)\, m + g,\quad v \leftarrow \mathrm{EMA}(g^2; \beta_2),\quad
        u = \frac{\alpha g + m (1-\beta_f) / (1-\beta_f^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon}

    ``betas = (beta_fast_final, beta2)``; ``beta_f(t)`` warms up in half-life from ``min_beta_fast`` over
    ``num_beta_fast_warmup_steps`` (``None``: no warm-up). Same numbers as
    :func:`emerging_optimizers.scalar_optimizers.ademamix.calculate_sim_ademamix_update`.
    """
    scalars = sim_ademamix_scalars(num_beta_fast_warmup_steps, min_beta_fast, betas, step, eps, correct_bias, alpha)
    return sim_ademamix_kernel(grad, exp_avg, exp_avg_sq, **scalars)
