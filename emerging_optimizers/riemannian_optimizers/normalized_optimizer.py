r"""SGD and Adam on the oblique manifold: matrices with unit-norm columns (``dim=0``) or rows (``dim=1``).

The oblique manifold :math:`\mathcal{OB} = \{W : \lVert W_{:,j}\rVert_2 = 1\ \forall j\}` (for ``dim=0``; rows
for ``dim=1``) is a product of unit spheres. With :math:`\odot` the element-wise product and :math:`\sum_d`
the sum over ``dim`` (kept as a broadcast dimension), one step from a Euclidean direction :math:`X` is::

    R = P_W(X) = X - W (.) sum_d(W (.) X)          tangent projection (removes each column's radial part)
    weight decay on (W, R)                          decoupled: W <- (1 - lr*wd) W, l2: R <- R + wd*W, ...
    W <- Retr(W - lr * R),  Retr(Y) = Y / max(||Y||_d, eps)     retraction by renormalisation

:class:`ObliqueSGD` uses heavy-ball momentum (no dampening) of the Euclidean gradient :math:`G`::

    B_t = G_t + mu * B_{t-1};   X = B_t

:class:`ObliqueAdam` uses Adam's direction with the *standard* bias correction::

    m_t = b1 m_{t-1} + (1-b1) G_t,   v_t = b2 v_{t-1} + (1-b2) G_t^2
    X = (m_t / (1-b1^t)) / (sqrt(v_t / (1-b2^t)) + eps)

References: N. Boumal, *An Introduction to Optimization on Smooth Manifolds* (tangent projection and
retraction of the sphere); EDM2 (arXiv:2312.02696, magnitude-preserving normalised weights); Raman et al.
(arXiv:1909.06463).

Defaults (the reference's): ``lr=1e-3``, ``momentum=0.9``, ``betas=(0.9, 0.99)``, ``weight_decay=0.0``
(``"decoupled"``), ``dim=0``, ``eps=1e-8`` (both Adam's denominator term and the floor of the norm in the
retraction, as in the reference). For an ``nn.Linear`` weight ``[out, in]``, ``dim=1`` gives every output unit
a unit-norm weight vector (EDM2), and for an ``nn.Embedding`` ``[num, d]`` unit-norm embeddings.

Weight decay follows the library's methods (:mod:`emerging_optimizers.mixin`), applied as the reference does:
after the projection, to ``W`` (multiplicative methods) or to ``R`` (``l2``). All four act along ``W``, the
radial direction, which the retraction removes again: their only effect is to lengthen the tangent step by
``1/(1 - c)`` (``c = lr*wd`` for decoupled and l2, ``wd`` for independent, ``lr**2*wd`` for palm).

Shapes: any parameter of rank >= 2 is viewed as the matrix ``[shape[0], prod(shape[1:])]``, so with
``dim=1`` each slice ``p[i]`` (a conv filter of one output channel) has unit norm, and with ``dim=0`` each
column of that view does. 1-D parameters are refused (use AdamW for biases and norms).

State (float32 for bf16/fp16 params, float64 for float64, else the param's dtype; shape ``p.shape``):
``momentum_buffer`` (ObliqueSGD); ``step`` (int), ``exp_avg``, ``exp_avg_sq`` (ObliqueAdam). Low-precision
params are updated in float32 and rounded into the parameter once per step.

Differences from the reference library:

* **Adam's bias correction.** The reference computes ``(m/bc1) / (sqrt(v)/bc2 + eps)`` with
  ``bc2 = 1 - b2**t`` outside the square root, so (eps aside) its direction is ``sqrt(1 - b2**t)`` times the
  standard one: at ``t = 1`` **0.0316x** for ``b2 = 0.999`` (0.1x at the default ``b2 = 0.99``), approaching 1x
  only after a few ``1/(1 - b2)`` steps. An open reference PR (#299) targets the same fix. Here
  ``sqrt(v / bc2)`` is used, as in torch.optim.Adam, so the reference's hyperparameters give larger early steps.
* Every hyperparameter (``weight_decay_method``, ``dim``, ``eps`` included) lives in the param group, so it
  can vary per group and is saved by ``state_dict()``; assigning ``opt.weight_decay_method`` sets every group.
* ``params`` may be any iterable of tensors or param groups; ``step(closure)`` works; parameters of rank > 2
  and bf16/fp16 parameters (float32 state) are supported.
* Bad hyperparameters, a ``dim`` other than 0 or 1 and 1-D parameters raise ``ValueError`` at construction
  (the reference accepts any ``dim`` and checks shapes at the first ``step()``); negative ``lr`` and
  ``eps <= 0`` (a zero column would divide by zero in the retraction) are refused.
* ``lr = 0`` leaves the parameter bit-for-bit untouched (the retraction of a point of the manifold is the
  point; skipping it avoids rounding drift); momentum and Adam moments still advance.
"""

from __future__ import annotations

from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT, _grads_of, group_default
from emerging_optimizers.mixin import WeightDecayT, apply_weight_decay, check_weight_decay_method
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.riemannian_optimizers._base import ManifoldOptimizer, state_dtype
from emerging_optimizers.scalar_optimizers.adam import calculate_adam_update
from emerging_optimizers.utils import MatrixShapeError, check_beta, check_betas, check_nonneg, check_positive

__all__ = [
    "ObliqueAdam",
    "ObliqueSGD",
    "calculate_oblique_adam_direction",
    "calculate_oblique_sgd_direction",
    "oblique_retraction",
    "oblique_step_",
    "oblique_tangent_projection",
]


# ---------------------------------------------------------------------------------------------- pure math
def oblique_tangent_projection(w: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """``P_W(X) = X - W * sum_dim(W * X)``: the part of ``x`` tangent to the oblique manifold at ``w``.

    Exact orthogonal projection when the slices of ``w`` along ``dim`` have unit norm. Returns a new tensor.
    """
    return x - w * (w * x).sum(dim=dim, keepdim=True)


def oblique_retraction(y: torch.Tensor, dim: int, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Y / max(||Y||_dim, eps)``: back onto the manifold by renormalising each slice along ``dim``.

    Returns a new tensor, or writes into ``out`` (which may be ``y`` itself) and returns it.
    """
    return torch.nn.functional.normalize(y, p=2.0, dim=dim, eps=eps, out=out)


def calculate_oblique_sgd_direction(grad: torch.Tensor, momentum_buffer: torch.Tensor, momentum: float) -> torch.Tensor:
    """Heavy-ball momentum ``B <- mu*B + G`` (no dampening), updated in place; returns ``B`` (do not modify it)."""
    return momentum_buffer.mul_(momentum).add_(grad)


def calculate_oblique_adam_direction(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    betas: tuple[float, float],
    step: int,
    eps: float,
    correct_bias: bool = True,
) -> torch.Tensor:
    """Adam's direction ``(m/bc1) / (sqrt(v/bc2) + eps)`` (standard bias correction; ``step`` is 1-based).

    The moments are updated in place; ``grad`` is not. The same function as
    :func:`emerging_optimizers.scalar_optimizers.adam.calculate_adam_update` (without Nesterov).
    """
    return calculate_adam_update(grad, exp_avg, exp_avg_sq, betas, correct_bias, False, step, eps)


def oblique_step_(
    w: torch.Tensor,
    direction: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    weight_decay_method: str,
    dim: int,
    eps: float,
) -> torch.Tensor:
    """One Riemannian step of the matrix ``w`` along the Euclidean ``direction``, in place; returns ``w``.

    ``R = P_W(direction)``; weight decay on ``(W, R)``; ``W <- Retr(W - lr*R)``. ``direction`` is not modified.
    """
    r = oblique_tangent_projection(w, direction, dim)
    r = apply_weight_decay(w, r, weight_decay_method, lr, weight_decay)
    w.add_(r, alpha=-lr)
    return oblique_retraction(w, dim, eps, out=w)


# ---------------------------------------------------------------------------------------------- optimizers
def _check_dim(dim: Any) -> None:
    if isinstance(dim, bool) or dim not in (0, 1):
        raise ValueError(
            f"Invalid dim: {dim!r}; use 0 (unit-norm columns) or 1 (unit-norm rows; for a parameter of rank > 2, "
            "unit-norm slices p[i])."
        )


class _ObliqueOptimizer(ManifoldOptimizer):
    """Shared plumbing of :class:`ObliqueSGD` and :class:`ObliqueAdam`: the step and the param checks."""

    param_hint = "Optimize biases, norm weights and scalars with an AdamW-type optimizer (emerging_optimizers.AdamW)."
    # the reference keeps it on ``self``; here each group has its own (assigning sets every group)
    weight_decay_method = group_default("weight_decay_method")

    def _validate_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if not isinstance(p, torch.Tensor) or p.ndim < 2 or not p.is_floating_point():
            got = f"shape {tuple(p.shape)}, dtype {p.dtype}" if isinstance(p, torch.Tensor) else type(p).__name__
            raise MatrixShapeError(
                f"{type(self).__name__} only supports parameters of rank >= 2 (a rank > 2 parameter is viewed as "
                f"[shape[0], -1]); params holds a floating-point tensor of {got}. {self.param_hint}"
            )

    def _validate_common(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_weight_decay_method(group["weight_decay_method"])
        _check_dim(group["dim"])
        check_positive("eps", group["eps"])

    def _direction(self, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """The Euclidean direction (shape ``p.shape``, state dtype); updates the state in place."""
        raise NotImplementedError

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr = group["lr"]
        for p, grad in zip(params, _grads_of(params)):  # fetched outside a user's torch.compile (see _grads_of)
            assert grad is not None
            dtype = state_dtype(p)
            direction = self._direction(grad.to(dtype), self.state[p], group)
            if lr == 0:  # a zero step: the point itself (see the module docstring)
                continue
            in_place = p.dtype == dtype and p.is_contiguous()
            w = p.view(p.shape[0], -1) if in_place else p.detach().reshape(p.shape[0], -1).to(dtype, copy=True)
            oblique_step_(
                w,
                direction.reshape(w.shape),
                lr=lr,
                weight_decay=group["weight_decay"],
                weight_decay_method=group["weight_decay_method"],
                dim=group["dim"],
                eps=group["eps"],
            )
            if not in_place:
                p.copy_(w.view(p.shape))


@register_optimizer("oblique_sgd")
class ObliqueSGD(_ObliqueOptimizer):
    """Riemannian SGD with heavy-ball momentum on the oblique manifold (module docstring).

    Args:
        params: parameters (rank >= 2) or param groups.
        lr: learning rate (1e-3).
        momentum: heavy-ball coefficient ``mu`` in [0, 1) (0.9): ``B <- mu*B + G``, no dampening.
        weight_decay: weight-decay coefficient (0.0).
        weight_decay_method: ``"decoupled"`` (default), ``"independent"``, ``"l2"`` or ``"palm"``.
        dim: 0 for unit-norm columns (default), 1 for unit-norm rows.
        eps: floor of the norm in the retraction (1e-8).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        weight_decay_method: WeightDecayT = "decoupled",
        dim: int = 0,
        eps: float = 1e-8,
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        weight_decay_method=weight_decay_method, dim=dim, eps=eps)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._validate_common(group)
        check_beta("momentum", group["momentum"])

    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return {"momentum_buffer": torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)}

    def _direction(self, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        return calculate_oblique_sgd_direction(grad, state["momentum_buffer"], group["momentum"])


@register_optimizer("oblique_adam")
class ObliqueAdam(_ObliqueOptimizer):
    """Riemannian Adam on the oblique manifold, with the standard bias correction (module docstring).

    Args:
        params: parameters (rank >= 2) or param groups.
        lr: learning rate (1e-3).
        betas: EMA rates ``(b1, b2)`` of the first and second moments ((0.9, 0.99)).
        weight_decay: weight-decay coefficient (0.0).
        weight_decay_method: ``"decoupled"`` (default), ``"independent"``, ``"l2"`` or ``"palm"``.
        dim: 0 for unit-norm columns (default), 1 for unit-norm rows.
        eps: added to Adam's denominator and floor of the norm in the retraction (1e-8).
        correct_bias: divide the moments by ``1 - b**t`` (True), ``sqrt(v/(1-b2**t))`` for the second.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        weight_decay_method: WeightDecayT = "decoupled",
        dim: int = 0,
        eps: float = 1e-8,
        correct_bias: bool = True,
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        if isinstance(betas, list):
            betas = tuple(betas)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, weight_decay_method=weight_decay_method,
                        dim=dim, eps=eps, correct_bias=correct_bias)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._validate_common(group)
        betas = group["betas"]
        if isinstance(betas, tuple) and len(betas) == 2:  # name each beta as the reference's messages do
            check_beta("beta1 (betas[0])", betas[0])
            check_beta("beta2 (betas[1])", betas[1])
        check_betas("betas", betas, 2)
        if not isinstance(group["correct_bias"], bool):
            raise ValueError(f"Invalid correct_bias: {group['correct_bias']!r}; use True or False.")

    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype = state_dtype(p)
        return {
            "step": 0,
            "exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
        }

    def _direction(self, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        state["step"] += 1
        return calculate_oblique_adam_direction(grad, state["exp_avg"], state["exp_avg_sq"], group["betas"],
                                                state["step"], group["eps"], group["correct_bias"])
