r"""LaProp's update with keyword-only hyperparameters; see :mod:`emerging_optimizers.scalar_optimizers.laprop`."""

from __future__ import annotations

import torch

from emerging_optimizers.scalar_optimizers.laprop import laprop_kernel, laprop_scalars

__all__ = ["calculate_laprop_update"]


@torch.no_grad()
def calculate_laprop_update(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                            betas: tuple[float, float], eps: float, correct_bias: bool, step: int) -> torch.Tensor:
    r"""LaProp's update (arXiv:2002.04839) for one tensor; both state tensors updated in place.

    .. math::
        v \leftarrow \mathrm{EMA}(g^2; \beta_2),\quad
        m \leftarrow \mathrm{EMA}\Big(\frac{g}{\sqrt{v/(1-\beta_2^t)} + \epsilon}; \beta_1\Big),\quad
        u = m / (1-\beta_1^t)

    Same numbers as :func:`emerging_optimizers.scalar_optimizers.laprop.calculate_laprop_update`.
    """
    return laprop_kernel(grad, exp_avg, exp_avg_sq, **laprop_scalars(correct_bias, betas, step, eps))
