r"""MXNet's ``Signum`` optimizer (``mxnet.optimizer.Signum``), with MXNet's exact semantics, as a torch optimizer.

MXNet's hyperparameters keep their MXNet names (``learning_rate``, ``wd``, ``wd_lh``, ``rescale_grad``,
``clip_gradient``); param groups carry the learning rate as ``lr`` so torch LR schedulers drive it.

momentum > 0 (state ``mom``, zeros)::

    g'  = clip(rescale_grad * g, clip_gradient) + wd * w
    mom = momentum * mom - (1 - momentum) * g'
    w   = (1 - lr * wd_lh) * w + lr * sign(mom)

momentum == 0 (signSGD, no state)::

    w = (1 - lr * (wd + wd_lh)) * w - lr * sign(g)

``clip_gradient`` None or <= 0 means no clipping (MXNet's convention); ``sign(0) = 0``; no bias correction.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from emerging_optimizers.base import EmergingOptimizer, NonfiniteT, ParamsT, _grads_of
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.utils import check_beta, check_nonneg

__all__ = ["Signum", "mxnet_signum_update_"]


def mxnet_signum_update_(weight: torch.Tensor, grad: torch.Tensor, mom: torch.Tensor | None, *, lr: float,
                         momentum: float, wd: float, wd_lh: float, rescale_grad: float,
                         clip_gradient: float | None) -> None:
    """One MXNet Signum step on ``weight`` (and ``mom``) in place; ``grad`` is not modified."""
    if mom is None:
        weight.mul_(1.0 - lr * (wd + wd_lh)).add_(grad.sign(), alpha=-lr)
        return
    g = grad * rescale_grad
    if clip_gradient is not None and clip_gradient > 0:
        g.clamp_(-clip_gradient, clip_gradient)
    if wd != 0:
        g.add_(weight, alpha=wd)
    mom.mul_(momentum).add_(g, alpha=-(1.0 - momentum))
    weight.mul_(1.0 - lr * wd_lh).add_(mom.sign(), alpha=lr)


@register_optimizer("mxnet_signum")
class Signum(EmergingOptimizer):
    """MXNet's Signum: ``Signum(params, learning_rate=0.01, momentum=0.9, wd_lh=0.0, *, wd=0.0, rescale_grad=1.0,
    clip_gradient=None)``.

    Args:
        learning_rate: MXNet's learning rate, stored as the group's ``lr``.
        momentum: in [0, 1); 0 is signSGD and keeps no state.
        wd_lh: decoupled weight decay (Loshchilov & Hutter), applied to the weight.
        wd: L2 weight decay, added to the (rescaled, clipped) gradient.
        rescale_grad: gradient multiplier (e.g. 1/batch size).
        clip_gradient: clip the rescaled gradient to ``[-c, c]``; None or <= 0 turns clipping off.
    """

    def __init__(self, params: ParamsT, learning_rate: float = 0.01, momentum: float = 0.9, wd_lh: float = 0.0, *,
                 wd: float = 0.0, rescale_grad: float = 1.0, clip_gradient: float | None = None,
                 nonfinite: NonfiniteT = "skip") -> None:
        check_nonneg("learning_rate", learning_rate)
        defaults = dict(lr=learning_rate, momentum=momentum, wd_lh=wd_lh, wd=wd, rescale_grad=rescale_grad,
                        clip_gradient=clip_gradient)
        self._validate_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite)  # validates every group too

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])  # the constructor's learning_rate
        check_beta("momentum", group["momentum"])
        check_nonneg("wd_lh", group["wd_lh"])
        check_nonneg("wd", group["wd"])
        rescale_grad, clip_gradient = group["rescale_grad"], group["clip_gradient"]
        if not isinstance(rescale_grad, (int, float)) or isinstance(rescale_grad, bool) \
                or not math.isfinite(rescale_grad):
            raise ValueError(f"Invalid rescale_grad: {rescale_grad!r}; it must be a finite number.")
        bad = not isinstance(clip_gradient, (int, float)) or isinstance(clip_gradient, bool) \
            or math.isnan(clip_gradient)
        if clip_gradient is not None and bad:
            raise ValueError(f"Invalid clip_gradient: {clip_gradient!r}; use a number (<= 0 or None: no clipping).")

    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"mom": torch.zeros_like(p)} if group["momentum"] > 0 else {}

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for p, grad in zip(params, _grads_of(params)):  # fetched outside a user's torch.compile (see _grads_of)
            assert grad is not None
            mxnet_signum_update_(p, grad, self.state[p].get("mom"), lr=group["lr"], momentum=group["momentum"],
                                 wd=group["wd"], wd_lh=group["wd_lh"], rescale_grad=group["rescale_grad"],
                                 clip_gradient=group["clip_gradient"])
