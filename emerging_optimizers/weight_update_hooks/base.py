"""The weight-update hook protocol, the no-op hook, and the norm helpers the hooks share.

An orthogonalized optimizer calls, for every parameter ``p`` with its update ``U``::

    state = hook.pre_weight_update_inplace(p, U)   # may rescale U in place
    p <- p - lr * U
    hook.post_weight_update_inplace(p, state)      # may project p in place

``state`` (``HookStateT``: a tensor or ``None``) is transient: it never enters ``optimizer.state``.
"""

from __future__ import annotations

import math
from typing import Protocol, TypeVar, runtime_checkable

import torch

__all__ = ["NoOpWeightUpdateHook", "WeightUpdateHook"]

HookStateT = TypeVar("HookStateT", bound=torch.Tensor | None)


@runtime_checkable
class WeightUpdateHook(Protocol[HookStateT]):
    """Called around ``p <- p - lr * update``; the state returned by ``pre`` is handed to ``post``.

    The state is transient (never stored in ``optimizer.state``). ``update`` is a fresh tensor the hook may
    modify in place; ``p`` may be projected in place after the update.
    """

    def pre_weight_update_inplace(self, p: torch.Tensor, update: torch.Tensor) -> HookStateT: ...

    def post_weight_update_inplace(self, p: torch.Tensor, pre_update_state: HookStateT) -> None: ...


class NoOpWeightUpdateHook:
    """A hook that does nothing (the default)."""

    def pre_weight_update_inplace(self, p: torch.Tensor, update: torch.Tensor) -> None:
        return None

    def post_weight_update_inplace(self, p: torch.Tensor, pre_update_state: None) -> None:
        return None


# ---------------------------------------------------------------------------------------------- shared helpers
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
