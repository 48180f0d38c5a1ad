r"""RMSProp's update with keyword-only hyperparameters; see :mod:`emerging_optimizers.scalar_optimizers.rmsprop`."""

from __future__ import annotations

import torch

from emerging_optimizers.scalar_optimizers.rmsprop import rmsprop_kernel

__all__ = ["calculate_rmsprop_update"]


@torch.no_grad()
def calculate_rmsprop_update(grad: torch.Tensor, exp_avg_sq: torch.Tensor, *, alpha: float, eps: float,
                             step: int | None = None) -> torch.Tensor:
    r"""RMSProp's update for one tensor (``torch.optim.RMSprop`` without momentum or centering).

    .. math:: v \leftarrow \alpha v + (1-\alpha) g^2,\qquad u = g / (\sqrt v + \epsilon)

    ``step`` is accepted for a uniform signature and unused. Same numbers as
    :func:`emerging_optimizers.scalar_optimizers.rmsprop.calculate_rmsprop_update`.
    """
    return rmsprop_kernel(grad, exp_avg_sq, alpha=alpha, eps=eps)
