r"""Radial brake hook: damp the change of a weight's norm in one step (nilin.github.io/radial-brake).

With :math:`r_0 = \lVert W\rVert` before and :math:`r_1` after the update, :math:`\Delta = r_1 - r_0`,
:math:`s` = ``outward_scale`` if :math:`\Delta \ge \epsilon`, ``inward_scale`` if :math:`\Delta \le -\epsilon`,
else 0, and :math:`W \leftarrow W\,(r_0 + s\Delta)/r_1`. The defaults let a weight shrink freely but grow at
half speed. Norms are Frobenius norms reduced in float32 (float64 for float64 tensors).
"""

from __future__ import annotations

import torch

from emerging_optimizers.weight_update_hooks.base import _check_eps, _fro_norm, _scale_inplace

__all__ = ["RadialBrakeHook"]


def _check_unit_interval(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name}: {value!r}; it must be a number in [0, 1].")
    return float(value)


class RadialBrakeHook:
    r"""Damp the change of ``\|W\|`` in one step: outward by ``outward_scale``, inward by ``inward_scale``.

    Args:
        outward_scale: fraction of a norm increase that is kept, in ``[0, 1]`` (0 forbids growth).
        inward_scale: fraction of a norm decrease that is kept, in ``[0, 1]`` (1 keeps shrinking unchanged).
        eps: a norm (or norm change) below ``eps`` counts as zero.
    """

    def __init__(self, outward_scale: float = 0.5, inward_scale: float = 1.0, eps: float = 1e-15) -> None:
        self.outward_scale = _check_unit_interval("outward_scale", outward_scale)
        self.inward_scale = _check_unit_interval("inward_scale", inward_scale)
        self.eps = _check_eps(eps)

    def pre_weight_update_inplace(self, p: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """Return the norm ``r0`` of ``p`` before the update (0 below ``eps``); ``update`` is left alone."""
        r0 = _fro_norm(p)
        return torch.where(r0 < self.eps, torch.zeros_like(r0), r0)

    def post_weight_update_inplace(self, p: torch.Tensor, pre_update_state: torch.Tensor) -> None:
        """Rescale ``p`` so that its norm is ``r0 + s * (|p| - r0)``."""
        r0 = pre_update_state
        r1 = _fro_norm(p)
        delta = r1 - r0
        zero = torch.zeros_like(delta)
        s = torch.where(
            delta >= self.eps,
            zero + self.outward_scale,
            torch.where(delta <= -self.eps, zero + self.inward_scale, zero),
        )
        target = r0 + s * delta
        scale = torch.where(r1 < self.eps, torch.ones_like(r1), target / r1)
        _scale_inplace(p, scale)

    def __repr__(self) -> str:
        return f"RadialBrakeHook(outward_scale={self.outward_scale}, inward_scale={self.inward_scale}, eps={self.eps})"
