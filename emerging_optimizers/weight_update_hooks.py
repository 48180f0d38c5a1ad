r"""Weight update hooks: small objects that reshape one optimizer step of a matrix parameter.

An orthogonalized optimizer calls, for every parameter ``p`` with its update ``U``::

    state = hook.pre_weight_update_inplace(p, U)   # may rescale U in place
    p <- p - lr * U
    hook.post_weight_update_inplace(p, state)      # may project p in place

``state`` is transient (a 0-dim tensor or ``None``): it never enters ``optimizer.state`` and is not
checkpointed. The optimizer always hands the hook a *fresh* update tensor, so a hook that rescales
``U`` can never touch the stored momentum (the reference library rescaled the momentum buffer itself
when the orthogonalization was the identity).

Hooks (norms are Frobenius norms reduced in float32, float64 for float64 tensors; a scale is applied in float32 and written back in
the tensor's dtype, so bf16 parameters get one rounding per step):

* :class:`HyperballHook` ``(radius, eps=1e-15)`` keeps every weight on the sphere of radius ``R``:
  :math:`U \leftarrow R\,U/\lVert U\rVert`, then :math:`W \leftarrow R\,W/\lVert W\rVert` ("hyperball" training:
  the step length is ``lr * R`` in the sphere's geometry, whatever the gradient scale).
* :class:`RadialBrakeHook` ``(outward_scale=0.5, inward_scale=1.0, eps=1e-15)`` damps the radial part of a
  step: with :math:`r_0 = \lVert W\rVert` before and :math:`r_1` after the update,
  :math:`\Delta = r_1 - r_0`, :math:`s` = ``outward_scale`` if :math:`\Delta \ge \epsilon`, ``inward_scale`` if
  :math:`\Delta \le -\epsilon`, else 0, and :math:`W \leftarrow W\,(r_0 + s\Delta)/r_1`. The defaults let a weight
  shrink freely but grow at half speed (nilin.github.io/radial-brake).
* :class:`RelativeUpdateHook` ``(eps=1e-15)`` makes the update as large as the weight:
  :math:`U \leftarrow U\,\lVert W\rVert/\lVert U\rVert`, so ``lr`` is the relative change per step.

A norm below ``eps`` counts as zero: a zero update stays zero, a zero weight is left alone.
``WeightUpdateHook`` (the protocol) and ``NoOpWeightUpdateHook`` are re-exported from the base module.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "HyperballHook",
    "NoOpWeightUpdateHook",
    "RadialBrakeHook",
    "RelativeUpdateHook",
    "WeightUpdateHook",
    "scale_to_norm_",
]


# ---------------------------------------------------------------------------------------------- helpers
def _fro_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm reduced in float32 (float64 for float64 input): a 0-dim tensor, no host sync."""
    return torch.linalg.vector_norm(x, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _scale_inplace(x: torch.Tensor, scale: torch.Tensor) -> None:
    """``x *= scale`` with the product formed in float32 and rounded once to ``x.dtype``."""
    if x.dtype in (torch.float32, torch.float64):
        x.mul_(scale.to(x.dtype))
    else:
        x.copy_(x.float().mul_(scale))


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"Invalid eps: {eps!r}; it must be a finite number > 0 (e.g. 1e-15).")
    return float(eps)


def _check_unit_interval(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name}: {value!r}; it must be a number in [0, 1].")
    return float(value)


# ---------------------------------------------------------------------------------------------- hooks
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


# Re-exported protocol and no-op hook. Imported last on purpose: the optimizer package imports this module
# (MuonHyperball uses ``scale_to_norm_``), so everything above must exist before the package is loaded.
from emerging_optimizers.orthogonalized_optimizers.orthogonalized_optimizer import (
    NoOpWeightUpdateHook,
    WeightUpdateHook,
)
