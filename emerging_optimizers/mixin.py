"""Weight-decay methods shared by every optimizer of the library.

``WeightDecayT`` names how ``weight_decay`` (lambda) acts, always *before* the update:

========== =======================================  ==================================
method      effect                                   note
========== =======================================  ==================================
decoupled   ``p <- p - lr*lambda*p``                 AdamW (arXiv:1711.05101)
independent ``p <- p - lambda*p``                    not tied to the learning rate
l2          ``g <- g + lambda*p``                    classic L2: the optimizer sees it
palm        ``p <- p - lr*lr*lambda*p``              PaLM's lr-squared decay
========== =======================================  ==================================
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

__all__ = ["WeightDecayT", "WeightDecayMixin", "WEIGHT_DECAY_METHODS", "check_weight_decay_method",
           "decay_factor", "apply_weight_decay"]

WeightDecayT = Literal["decoupled", "independent", "l2", "palm"]
WEIGHT_DECAY_METHODS: tuple[str, ...] = get_args(WeightDecayT)


def check_weight_decay_method(method: object) -> None:
    """Raise ``ValueError`` naming the valid choices if ``method`` is not a ``WeightDecayT``."""
    if method not in WEIGHT_DECAY_METHODS:
        raise ValueError(
            f"Invalid weight_decay_method: {method!r}; choose one of {', '.join(map(repr, WEIGHT_DECAY_METHODS))}."
        )


def decay_factor(method: str, lr: float, weight_decay: float) -> float:
    """The factor ``p`` is multiplied by for the multiplicative methods (1.0 for ``l2`` and ``weight_decay == 0``)."""
    if weight_decay == 0 or method == "l2":
        return 1.0
    if method == "decoupled":
        return 1.0 - lr * weight_decay
    if method == "independent":
        return 1.0 - weight_decay
    if method == "palm":
        return 1.0 - lr * lr * weight_decay
    check_weight_decay_method(method)
    raise AssertionError("unreachable")


def apply_weight_decay(
    p: torch.Tensor, grad: torch.Tensor, method: str, lr: float, weight_decay: float
) -> torch.Tensor:
    """Apply weight decay before the update and return the gradient the optimizer should see.

    Multiplicative methods scale ``p`` in place. ``l2`` returns ``grad + weight_decay * p`` as a new
    tensor: unlike the reference library, the caller's gradient (often ``p.grad``) is never modified.
    """
    if weight_decay == 0:
        return grad
    if method == "l2":
        return grad.add(p, alpha=weight_decay)
    p.mul_(decay_factor(method, lr, weight_decay))
    return grad


class WeightDecayMixin:
    """Adds ``_apply_weight_decay_inplace`` reading the method from ``self.weight_decay_method``."""

    weight_decay_method: WeightDecayT

    def _apply_weight_decay_inplace(self, p: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float) -> None:
        """Apply weight decay in place: to ``p`` for the multiplicative methods, to ``grad`` for ``l2``.

        ``l2`` adds ``weight_decay * p`` to ``grad`` in place, as documented; pass a copy if the
        caller's gradient must survive (our own optimizers use :func:`apply_weight_decay`).
        """
        if weight_decay == 0:
            return
        method = getattr(self, "weight_decay_method", "l2")
        check_weight_decay_method(method)
        if method == "l2":
            grad.add_(p, alpha=weight_decay)
        else:
            p.mul_(decay_factor(method, lr, weight_decay))
