r"""Row-wise normalisation of a matrix update: a cheap stand-in for orthogonalization.

.. math::
    u_i = s \, G_i / \max(\lVert G_i \rVert_2, \epsilon)

for every row :math:`G_i` of the (momentum) matrix :math:`G`, with :math:`s` = ``extra_scale_factor``. Rows
then all have norm :math:`s` (zero rows stay zero). With ``center_rows`` the column means are subtracted
before and after, so every column of the update has mean zero (the row norms are then no longer exactly
:math:`s`). Usable as the ``scaled_orthogonalize_fn`` of
:class:`~emerging_optimizers.orthogonalized_optimizers.OrthogonalizedOptimizer`, e.g.
``functools.partial(row_norm_fn, center_rows=True)``; :class:`~emerging_optimizers.contrib.Muown` uses
:func:`row_norms` for its row lengths.
"""

from __future__ import annotations

import math

import torch

__all__ = ["row_norm_fn", "row_norms"]


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of every row, as an ``(m, 1)`` tensor."""
    return torch.linalg.vector_norm(x, dim=1, keepdim=True)


def row_norm_fn(
    grad: torch.Tensor, *, center_rows: bool = False, eps: float = 1e-8, extra_scale_factor: float = 1.0
) -> torch.Tensor:
    """Normalise every row of a matrix: ``u_i = G_i / max(|G_i|, eps) * extra_scale_factor``.

    Args:
        grad: the 2-D floating-point matrix (gradient or momentum) to normalise.
        center_rows: subtract the column means (``G - G.mean(0)``) before and after normalising (False).
        eps: floor on the row norms, finite and > 0 (1e-8); a row with a smaller norm is divided by ``eps``.
        extra_scale_factor: multiplier of the result (1.0).

    Returns:
        The update, same shape and dtype as ``grad``; computed in float32 (float64 for float64 input).

    Raises:
        ValueError: ``grad`` is not a 2-D floating-point tensor, or ``eps`` is not a finite number > 0.
    """
    if not isinstance(grad, torch.Tensor) or grad.ndim != 2 or not grad.is_floating_point():
        got = (
            f"a {grad.ndim}-D {grad.dtype} tensor of shape {tuple(grad.shape)}"
            if isinstance(grad, torch.Tensor)
            else type(grad).__name__
        )
        raise ValueError(f"Only 2D tensors are supported: row_norm_fn expects a 2-D floating-point matrix, got {got}.")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"Invalid eps: {eps!r}; it must be a finite number > 0.")
    g = grad if grad.dtype == torch.float64 else grad.float()
    if center_rows:
        g = g - g.mean(dim=0, keepdim=True)
    u = g / row_norms(g).clamp_min(eps)
    if center_rows:
        u = u - u.mean(dim=0, keepdim=True)
    return (u * extra_scale_factor).to(grad.dtype)
