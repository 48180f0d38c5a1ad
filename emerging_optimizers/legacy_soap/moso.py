r"""MOSO, Momentum One-Sided SOAP: RMSProp on Muon-style momentum, in the eigenbasis of its smaller-side covariance.

For a matrix parameter :math:`W \in \mathbb R^{m \times n}` (N-D parameters are viewed as ``[out, -1]``) with
gradient :math:`G_t` at step :math:`t = 1, 2, \ldots`, after weight decay (``weight_decay_method``)::

    M_t = mu M_{t-1} + (1 - mu) G_t                               momentum            (state "momentum_buffer")
    b_t = 1 - (1 - beta_s) / (1 - beta_s^t)                        bias-corrected shampoo_beta
    left side (m <= n):   C_t = b_t C_{t-1} + (1 - b_t) M_t M_t^T   (m x m)            (state "M")
    right side (m > n):   C_t = b_t C_{t-1} + (1 - b_t) M_t^T M_t   (n x n)
    Q_t = eigenvectors of C_t (eigh) at t = 1 (every step with use_eigh), else
          power_iter_steps of Q <- qr(C_t Q).Q from Q_{t-1}, columns sorted by Rayleigh quotient  (state "Q_M")
    P = Q_t^T M_t  (left)  or  M_t Q_t  (right)                   momentum in the eigenbasis
    V <- rms_beta V + (1 - rms_beta) P^2,   R = P / (sqrt(V) + eps)                (state "exp_avg_sq")
    U = Q_t R  (left)  or  R Q_t^T  (right),  scaled down to RMS max_update_rms if larger (0: no clipping)
    W <- W - lr U

The preconditioner is one-sided (only the smaller dimension gets a factor, of size k = min(m, n)), so it costs
:math:`O(k^3 + mnk)` per step; the RMSProp normaliser adapts per eigen-direction and per entry of the other side.

Defaults (the reference library's): ``lr=3e-4``, ``momentum=0.95`` (Muon's), ``rms_beta=0.95``,
``shampoo_beta=0.95`` (the basis follows the momentum's recent covariance), ``eps=1e-8``, ``weight_decay=0.01``
decoupled, one power-iteration step per step, no RMS clipping.

Where ours differs from the reference library:

* **The second moment follows its eigen-directions.** The QR path sorts the refreshed basis by Rayleigh quotient,
  which reorders the directions whenever two eigenvalues cross; the reference keeps ``exp_avg_sq`` in the old
  order (its helper only transposes back and forth), so second moments attach to the wrong directions. Here the
  rows (left side) or columns (right side) of ``exp_avg_sq`` are permuted with the basis
  (:func:`~emerging_optimizers.utils.eig.orthogonal_iteration` ``return_indices=True``). A full ``eigh``
  (step 1, ``use_eigh``) gives no correspondence to the previous basis and leaves ``exp_avg_sq`` as it is.
* Every hyperparameter lives in the param group, including ``max_update_rms`` and ``weight_decay_method``
  (the reference keeps them on ``self``; reading ``opt.max_update_rms`` gives the default, assigning sets every
  group); ``power_iter_steps`` and ``use_eigh`` are options the reference fixes (1 and False).
* Parameters must be floating-point matrices (N-D viewed as ``[out, -1]``), checked at construction
  (``MatrixShapeError``, a ``ValueError`` and ``TypeError``); the reference raises ``TypeError`` at the first step
  and rejects N-D parameters.
* ``step(closure)`` works; ``l2`` weight decay never modifies ``p.grad``; bf16/fp16 parameters keep float32 state
  (float64 parameters keep float64 state) and the update is rounded into the parameter once.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from emerging_optimizers.base import EmergingOptimizer, NonfiniteT, ParamsT, group_default
from emerging_optimizers.legacy_soap.soap import _clip_update_rms_in_place
from emerging_optimizers.mixin import WeightDecayMixin, WeightDecayT, apply_weight_decay, check_weight_decay_method
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers.rmsprop import rmsprop_kernel
from emerging_optimizers.utils import check_beta, check_matrix, check_nonneg, fp32_matmul_precision
from emerging_optimizers.utils.eig import eigh_with_fallback, orthogonal_iteration

__all__ = ["MOSO", "calculate_moso_update", "update_one_sided_eigenbasis"]


def _is_left(shape: torch.Size | tuple[int, ...]) -> bool:
    """The factor sits on the rows when ``rows <= cols`` (the smaller side)."""
    return shape[0] <= shape[1]


def update_one_sided_eigenbasis(
    factor: torch.Tensor,
    eigenbasis: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    left: bool,
    use_eigh: bool,
    power_iter_steps: int,
) -> None:
    """Refresh ``eigenbasis`` (k x k) from ``factor`` in place, and keep ``exp_avg_sq`` aligned with it.

    ``use_eigh``: a full decomposition (descending eigenvalues); ``exp_avg_sq`` is left alone. Otherwise
    ``power_iter_steps`` of orthogonal iteration from the current basis, columns sorted by Rayleigh quotient, and
    ``exp_avg_sq`` permuted along the eigenbasis axis (0 on the left side, 1 on the right) by the same sort.
    """
    if use_eigh:
        _, new_basis = eigh_with_fallback(factor)
    else:
        _, new_basis, perm = orthogonal_iteration(factor, eigenbasis, power_iter_steps, return_indices=True)
        exp_avg_sq.copy_(exp_avg_sq.index_select(0 if left else 1, perm))
    eigenbasis.copy_(new_basis)


def calculate_moso_update(
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    factor: torch.Tensor,
    eigenbasis: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    momentum: float,
    rms_beta: float,
    shampoo_beta: float,
    eps: float,
    use_eigh: bool,
    power_iter_steps: int = 1,
    max_update_rms: float = 0.0,
) -> torch.Tensor:
    """MOSO's update ``U`` for one 2-D matrix (module docstring); every state tensor is updated in place.

    ``shampoo_beta`` is this step's (bias-corrected) factor coefficient; ``use_eigh`` selects the full
    decomposition (MOSO uses it on the first step). ``grad`` (already weight-decayed) and the state share a dtype.
    """
    left = _is_left(grad.shape)
    momentum_buffer.lerp_(grad, 1.0 - momentum)
    m = momentum_buffer
    with fp32_matmul_precision("highest"):
        cov = m @ m.mT if left else m.mT @ m
        factor.lerp_(cov, 1.0 - shampoo_beta)
        update_one_sided_eigenbasis(factor, eigenbasis, exp_avg_sq, left=left, use_eigh=use_eigh,
                                    power_iter_steps=power_iter_steps)
        projected = eigenbasis.mT @ m if left else m @ eigenbasis
        normalized = rmsprop_kernel(projected, exp_avg_sq, alpha=rms_beta, eps=eps)
        update = eigenbasis @ normalized if left else normalized @ eigenbasis.mT
    _clip_update_rms_in_place(update, max_update_rms)
    return update


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _as_matrix(t: torch.Tensor, *, view: bool = False) -> torch.Tensor:
    """An N-D tensor as ``[out, -1]``; ``view=True`` (state updated in place) refuses to copy."""
    if t.dim() == 2:
        return t
    cols = math.prod(t.shape[1:])  # not -1: ambiguous for a tensor with no elements
    return t.view(t.shape[0], cols) if view else t.reshape(t.shape[0], cols)


@register_optimizer("moso")
class MOSO(WeightDecayMixin, EmergingOptimizer):
    r"""Momentum One-Sided SOAP (module docstring for the update rule and the differences from the reference).

    Args:
        params: matrix parameters (N-D viewed as ``[out, -1]``) or param groups.
        lr: learning rate (>= 0, 3e-4).
        momentum: EMA coefficient of the momentum in [0, 1) (0.95).
        rms_beta: EMA coefficient of the second moment in the eigenbasis, in [0, 1) (0.95).
        shampoo_beta: EMA coefficient of the one-sided momentum covariance, in [0, 1), bias-corrected (0.95).
        eps: added to the RMS denominator (>= 0, 1e-8).
        weight_decay: weight-decay coefficient (>= 0, 0.01).
        max_update_rms: clip the update's RMS to this (>= 0; 0 = no clipping, the default).
        weight_decay_method: ``"decoupled"`` (default, the reference's fixed choice), ``"independent"``, ``"l2"``
            or ``"palm"``.
        power_iter_steps: orthogonal-iteration steps per basis refresh (int >= 0, 1; 0 only re-sorts).
        use_eigh: refresh the basis by a full eigendecomposition every step (False: only on the first step).
    """

    matrix_only = True
    matrix_optimizer_ok = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-4,
        momentum: float = 0.95,
        rms_beta: float = 0.95,
        shampoo_beta: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        max_update_rms: float = 0.0,
        weight_decay_method: WeightDecayT = "decoupled",
        power_iter_steps: int = 1,
        use_eigh: bool = False,
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, rms_beta=rms_beta, shampoo_beta=shampoo_beta, eps=eps,
                        weight_decay=weight_decay, max_update_rms=max_update_rms,
                        weight_decay_method=weight_decay_method, power_iter_steps=power_iter_steps, use_eigh=use_eigh)
        self._validate_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite)

    # The reference keeps these on ``self``; here reading gives the default, assigning sets every group.
    max_update_rms = group_default("max_update_rms")
    weight_decay_method = group_default("weight_decay_method")

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_beta("momentum", group["momentum"])
        check_beta("rms_beta", group["rms_beta"])
        check_beta("shampoo_beta", group["shampoo_beta"])
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_nonneg("max_update_rms", group["max_update_rms"])
        check_weight_decay_method(group["weight_decay_method"])
        steps = group["power_iter_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"Invalid power_iter_steps: {steps!r}; it must be an integer >= 0.")
        if not isinstance(group["use_eigh"], bool):
            raise ValueError(f"Invalid use_eigh: {group['use_eigh']!r}; it must be True or False.")

    def _validate_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        check_matrix(p, "MOSO", max_ndim=None, hint="Optimize biases, norm weights and scalars with an "
                     "AdamW-type optimizer, or the whole model with MuonAdamW(matrix_optimizer='moso').")

    # ------------------------------------------------------------------ state
    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype = _state_dtype(p)
        rows, cols = _as_matrix(p).shape
        k = min(rows, cols)
        return {
            "step": 0,
            "momentum_buffer": torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format),
            "M": torch.zeros(k, k, dtype=dtype, device=p.device),
            "Q_M": torch.eye(k, dtype=dtype, device=p.device),
        }

    # ------------------------------------------------------------------ step
    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta = group["shampoo_beta"]
        for p in params:
            assert p.grad is not None
            state = self.state[p]
            buf = state["momentum_buffer"]
            # ``.to`` copies low-precision grads; for l2, apply_weight_decay returns a new tensor: p.grad stays.
            grad = apply_weight_decay(p, p.grad.to(buf.dtype), group["weight_decay_method"], group["lr"],
                                      group["weight_decay"])
            t = state["step"] + 1
            update = calculate_moso_update(
                _as_matrix(grad),
                _as_matrix(buf, view=True),
                state["M"],
                state["Q_M"],
                _as_matrix(state["exp_avg_sq"], view=True),
                momentum=group["momentum"],
                rms_beta=group["rms_beta"],
                shampoo_beta=1.0 - (1.0 - beta) / (1.0 - beta**t),
                eps=group["eps"],
                use_eigh=t == 1 or group["use_eigh"],
                power_iter_steps=group["power_iter_steps"],
                max_update_rms=group["max_update_rms"],
            )
            p.add_(update.view(p.shape), alpha=-group["lr"])  # float32 update rounded into a bf16 p once
            state["step"] = t
