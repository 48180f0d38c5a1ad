r"""Hyperball hook: keep every weight on the sphere of radius ``R``.

:math:`U \leftarrow R\,U/\lVert U\rVert` before the step, then :math:`W \leftarrow R\,W/\lVert W\rVert` after it
("hyperball" training: the step length is ``lr * R`` in the sphere's geometry, whatever the gradient scale).
Norms are Frobenius norms reduced in float32 (float64 for float64 tensors); a norm below ``eps`` counts as zero.
"""

from __future__ import annotations

import math

import torch

from emerging_optimizers.weight_update_hooks.base import _check_eps, _fro_norm, _scale_inplace

__all__ = ["HyperballHook"]


def scale_to_norm_(x: torch.Tensor, radius: float, eps: float = 1e-15) -> torch.Tensor:
    """Rescale ``x`` in place to Frobenius norm ``radius`` (to zero if its norm is below ``eps``); returns ``x``."""
    norm = _fro_norm(x)
    scale = torch.where(norm < eps, torch.zeros_like(norm), radius / norm)
    _scale_inplace(x, scale)
    return x


class HyperballHook:
    r"""Keep weights on the sphere of radius ``radius``: :math:`U \leftarrow R\hat U`, :math:`W \leftarrow R\hat W`.

    Args:
        radius: Frobenius radius ``R`` of every weight; finite and ``>= eps``.
        eps: norms below ``eps`` count as zero (the tensor is then set to zero, as its direction is undefined).
    """

    def __init__(self, radius: float, eps: float = 1e-15) -> None:
        self.eps = _check_eps(eps)
        if (
            isinstance(radius, bool)
            or not isinstance(radius, (int, float))
            or not math.isfinite(radius)
            or radius < self.eps
        ):
            raise ValueError(f"Invalid radius: {radius!r}; it must be a finite number >= eps ({self.eps}).")
        self.radius = float(radius)

    def pre_weight_update_inplace(self, p: torch.Tensor, update: torch.Tensor) -> None:
        """Rescale ``update`` to norm ``radius`` (zero if its norm is below ``eps``)."""
        scale_to_norm_(update, self.radius, self.eps)

    def post_weight_update_inplace(self, p: torch.Tensor, pre_update_state: None) -> None:
        """Project ``p`` back onto the sphere of radius ``radius``."""
        scale_to_norm_(p, self.radius, self.eps)

    def __repr__(self) -> str:
        return f"HyperballHook(radius={self.radius}, eps={self.eps})"
