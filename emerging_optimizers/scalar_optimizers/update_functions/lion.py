r"""Lion's update with keyword-only hyperparameters; see :mod:`emerging_optimizers.scalar_optimizers.lion`."""

from __future__ import annotations

import torch

from emerging_optimizers.scalar_optimizers.lion import lion_kernel

__all__ = ["calculate_lion_update"]


@torch.no_grad()
def calculate_lion_update(grad: torch.Tensor, exp_avg: torch.Tensor, *, betas: tuple[float, float],
                          step: int) -> torch.Tensor:
    r"""Lion's update (arXiv:2302.06675) for one tensor, from the *old* ``exp_avg``, then updated in place.

    .. math:: u = \operatorname{sign}(\beta_1 m + (1-\beta_1) g),\qquad m \leftarrow \mathrm{EMA}(g; \beta_2)

    ``step`` is accepted for a uniform signature and unused. Same numbers as
    :func:`emerging_optimizers.scalar_optimizers.lion.calculate_lion_update` with ``(momentum_beta,
    momentum_beta2) = betas``.
    """
    beta1, beta2 = betas
    return lion_kernel(grad, exp_avg, beta1=beta1, beta2=beta2)
