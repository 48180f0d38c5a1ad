r"""Relative update hook: make the update as large as the weight, :math:`U \leftarrow U\,\lVert W\rVert/\lVert U\rVert`.

``lr`` then is the relative change of the weight per step. Norms are Frobenius norms reduced in float32
(float64 for float64 tensors); if either norm is below ``eps`` the update becomes zero.
"""

from __future__ import annotations

import torch

from emerging_optimizers.weight_update_hooks.base import _check_eps, _fro_norm, _scale_inplace

__all__ = ["RelativeUpdateHook"]


class RelativeUpdateHook:
    r"""Scale the update to the weight's norm: :math:`U \leftarrow U\,\lVert W\rVert/\lVert U\rVert`.

    Args:
        eps: if either norm is below ``eps`` the update becomes zero (nothing to be relative to).
    """

    def __init__(self, eps: float = 1e-15) -> None:
        self.eps = _check_eps(eps)

    def pre_weight_update_inplace(self, p: torch.Tensor, update: torch.Tensor) -> None:
        """Rescale ``update`` to the norm of ``p``."""
        p_norm = _fro_norm(p)
        u_norm = _fro_norm(update)
        small = (p_norm < self.eps) | (u_norm < self.eps)
        scale = torch.where(small, torch.zeros_like(p_norm), p_norm / u_norm)
        _scale_inplace(update, scale)

    def post_weight_update_inplace(self, p: torch.Tensor, pre_update_state: None) -> None:
        """Nothing: the weight is not projected."""

    def __repr__(self) -> str:
        return f"RelativeUpdateHook(eps={self.eps})"
