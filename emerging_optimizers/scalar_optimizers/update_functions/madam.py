r"""MAdam's update with keyword-only hyperparameters; see :mod:`emerging_optimizers.scalar_optimizers.madam`."""

from __future__ import annotations

import numbers

import torch

from emerging_optimizers.scalar_optimizers.madam import madam_kernel, madam_scalars

__all__ = ["calculate_madam_update"]


def _even_int(scale_log2: float) -> int:
    """``scale_log2`` as an ``int``; it may be a float with an even integer value (16 and 16.0 both work)."""
    if (isinstance(scale_log2, bool) or not isinstance(scale_log2, numbers.Real)
            or not float(scale_log2).is_integer() or int(scale_log2) % 2):
        raise ValueError(f"Invalid scale_log2: {scale_log2!r}; it must be an even integer, e.g. 16 or 16.0 "
                         "(so that sqrt(2**scale_log2) is an exact power of two).")
    return int(scale_log2)


@torch.no_grad()
def calculate_madam_update(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq_scaled: torch.Tensor, *,
                           betas: tuple[float, float], correct_bias: bool, step: int,
                           scale_log2: float) -> torch.Tensor:
    r"""MAdam's update for one tensor: Adam without epsilon, the second moment stored scaled by ``s = 2**k``.

    .. math::
        v' \leftarrow \mathrm{EMA}((\sqrt s\, g)^2; \beta_2),\quad m \leftarrow \mathrm{EMA}(g; \beta_1),\quad
        u = \sqrt s\, \frac{m/(1-\beta_1^t)}{\sqrt{v'/(1-\beta_2^t)}},\ \ u = 0 \text{ where } m = 0

    ``scale_log2`` (``k``) must be an even integer (``ValueError`` otherwise). Same numbers as
    :func:`emerging_optimizers.scalar_optimizers.madam.calculate_madam_update`.
    """
    scalars = madam_scalars(betas, correct_bias, step, _even_int(scale_log2))
    return madam_kernel(grad, exp_avg, exp_avg_sq_scaled, **scalars)
