r"""Signum's update with keyword-only hyperparameters; see :mod:`emerging_optimizers.scalar_optimizers.signum`."""

from __future__ import annotations

import torch

from emerging_optimizers.scalar_optimizers.signum import signum_kernel, signum_scalars

__all__ = ["calculate_signum_update"]


@torch.no_grad()
def calculate_signum_update(grad: torch.Tensor, exp_avg: torch.Tensor, *, momentum: float, correct_bias: bool,
                            nesterov: bool, step: int, use_shape_scaling: bool = False) -> torch.Tensor:
    r"""Signum's update (arXiv:1802.04434) for one tensor; ``exp_avg`` updated in place.

    .. math:: m \leftarrow \mathrm{EMA}(g; \beta),\qquad u = \operatorname{sign}(\hat m) \cdot s

    ``m_hat`` follows Adam's first moment (``correct_bias``, ``nesterov``); ``s = 2/(rows + cols)`` with
    ``use_shape_scaling`` (2-D tensors only, ``ValueError`` otherwise), else 1. Same numbers as
    :func:`emerging_optimizers.scalar_optimizers.signum.calculate_signum_update` with ``momentum_beta=momentum``
    and ``use_nesterov=nesterov``.
    """
    scalars = signum_scalars(momentum, correct_bias, nesterov, step, grad.shape, use_shape_scaling)
    return signum_kernel(grad, exp_avg, **scalars)
