r"""Adam's update with keyword-only hyperparameters; see :mod:`emerging_optimizers.scalar_optimizers.adam`."""

from __future__ import annotations

import torch

from emerging_optimizers.scalar_optimizers.adam import adam_kernel, adam_scalars

__all__ = ["calculate_adam_update"]


@torch.no_grad()
def calculate_adam_update(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                          betas: tuple[float, float], eps: float, correct_bias: bool, nesterov: bool,
                          step: int) -> torch.Tensor:
    r"""Adam's update ``u`` for one tensor; ``exp_avg``/``exp_avg_sq`` are updated in place, ``grad`` is not.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        u = \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}

    With ``nesterov`` the numerator is ``b1*m/(1-b1**(t+1)) + (1-b1)*g/(1-b1**t)``; without ``correct_bias``
    every bias correction is 1. ``step`` is the 1-based step ``t``. The documented
    :func:`~emerging_optimizers.scalar_optimizers.adam.calculate_adam_update` names ``nesterov``
    ``use_nesterov``; both compute the same numbers.
    """
    return adam_kernel(grad, exp_avg, exp_avg_sq, **adam_scalars(betas, correct_bias, nesterov, step, eps))
