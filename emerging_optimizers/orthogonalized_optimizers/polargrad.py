r"""PolarGrad: the polar factor of the momentum, scaled by its nuclear norm (arXiv:2505.21799).

With momentum direction :math:`D` (weight decay, EMA momentum and Nesterov as in
:class:`~emerging_optimizers.orthogonalized_optimizers.OrthogonalizedOptimizer`)::

    O = NS_K(D)  ~  polar(D) = U V^T             (D = U S V^T)
    U_t = O * <O, D>_F * extra_scale_factor       (<O, D>_F ~ sum(S) = ||D||_*, the nuclear norm)
    W <- W - lr * U_t

Scaling the polar factor by :math:`\lVert D\rVert_*` makes the step the steepest descent for the nuclear
norm geometry (PolarGrad), so its size follows the gradient's scale instead of being fixed as in Muon.
``num_ns_steps=0`` is allowed: then :math:`O = D/\lVert D\rVert_F` and the update is
:math:`\lVert D\rVert_F\,D` times ``extra_scale_factor``.

Defaults: ``lr=3e-4``, ``momentum=0.95``, ``weight_decay=0.01`` decoupled, ``fp32_matmul_prec="highest"``
(the scale uses the iterate's inner product, so low-precision matmuls would show in the step size),
``quintic`` x 5. Parameters of rank > 2 are treated as ``[out, prod(rest)]`` (conv kernels); bf16/fp16
parameters are handled in float32 (the update is rounded once into the parameter).

One-sided variants (usable as ``scaled_orthogonalize_fn`` of the base class via ``functools.partial``):
:func:`one_sided_polargrad_orth_fn` computes the polar factor exactly from an eigendecomposition of the
smaller Gram matrix (``left``: :math:`G G^\top` for wide matrices such as an MoE router, ``right``:
:math:`G^\top G` for tall ones such as an embedding or LM head); :func:`left_polargrad_orth_fn` and
:func:`right_polargrad_orth_fn` fix the side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.orthogonalized_optimizers.muon_utils import NSCoeffT, check_ns_options, newton_schulz
from emerging_optimizers.orthogonalized_optimizers.orthogonalized_optimizer import (
    OrthogonalizedOptimizer,
    WeightUpdateHook,
)
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.utils import FP32MatmulPrecT, check_matrix, check_positive

__all__ = [
    "OneSidedT",
    "PolarGrad",
    "calculate_polargrad_update",
    "left_polargrad_orth_fn",
    "one_sided_polargrad_orth_fn",
    "right_polargrad_orth_fn",
]

OneSidedT = Literal["left", "right"]


# ---------------------------------------------------------------------------------------------- pure math
def calculate_polargrad_update(
    direction: torch.Tensor,
    num_ns_steps: int = 5,
    coefficient_type: NSCoeffT = "quintic",
    custom_coefficient_sets: Sequence[tuple[float, float, float]] | None = None,
    extra_scale_factor: float = 1.0,
) -> torch.Tensor:
    """PolarGrad's update ``NS(D) * <NS(D), D>_F * extra`` of a matrix (or a batch ``[..., m, n]``).

    Computes in float32 (float64 for float64 input) and returns that dtype; ``direction`` is not modified.
    """
    d = direction if direction.dtype == torch.float64 else direction.float()
    o = newton_schulz(d, num_ns_steps, coefficient_type, custom_coefficient_sets)
    scale = (o * d).sum(dim=(-2, -1), keepdim=True)
    return o.mul_(scale * extra_scale_factor)


def _check_finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number.")


def _eigh_with_fallback(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh``; if it fails to converge in float32, retry in float64."""
    try:
        return torch.linalg.eigh(gram)
    except torch.linalg.LinAlgError:  # pragma: no cover - depends on LAPACK convergence
        evals, evecs = torch.linalg.eigh(gram.double())
        return evals.to(gram.dtype), evecs.to(gram.dtype)


def one_sided_polargrad_orth_fn(
    grad: torch.Tensor,
    *,
    side: OneSidedT,
    alpha: float = 1.0,
    center_rows: bool = False,
    eps: float = 1e-15,
    extra_scale_factor: float = 1.0,
) -> torch.Tensor:
    r"""Polar factor of a matrix ``G`` from the eigendecomposition of one Gram matrix, times its nuclear norm.

    ``side="left"``: :math:`C = G G^\top`, :math:`O = C^{-1/2} G`; ``side="right"``: :math:`C = G^\top G`,
    :math:`O = G C^{-1/2}`. Eigenvalues are floored at ``eps``; those at or below
    :math:`\lambda_{\max} \cdot \dim C \cdot \epsilon_{\mathrm{fp32}}` are rounding noise and dropped (their
    directions get 0 instead of :math:`1/\sqrt{\text{noise}}`). Returns
    :math:`O\,\nu^{\alpha}\cdot` ``extra_scale_factor``, where :math:`\nu = \sum_{\lambda > \mathrm{cutoff}}
    \sqrt\lambda = \langle O, G\rangle_F` is the nuclear norm of the kept part (PolarGrad's scale for
    ``alpha=1``; ``alpha=0`` gives the bare polar factor). With ``center_rows`` the columns of ``G`` are
    centred first (``G - G.mean(0)``) and the result again (only rounding drift is removed then).

    Computes in float32 (float64 for float64 input) under the current matmul precision and returns ``grad``'s
    dtype; ``grad`` is not modified.
    """
    check_matrix(grad, "one_sided_polargrad_orth_fn")
    if side not in ("left", "right"):
        raise ValueError(f"Invalid side: {side!r}; side must be 'left' or 'right' "
                         "('left': G G^T, wide matrices; 'right': G^T G, tall).")
    _check_finite("alpha", alpha)
    _check_finite("extra_scale_factor", extra_scale_factor)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"Invalid eps: {eps!r}; it must be a finite number > 0.")
    g = grad if grad.dtype == torch.float64 else grad.float()
    if center_rows:
        g = g - g.mean(dim=0, keepdim=True)
    gram = g @ g.T if side == "left" else g.T @ g
    gram = 0.5 * (gram + gram.T)
    evals, evecs = _eigh_with_fallback(gram)
    evals = evals.clamp_min(eps)
    cutoff = evals.max() * gram.shape[0] * torch.finfo(torch.float32).eps
    keep = evals > cutoff
    inv_sqrt = torch.where(keep, evals.rsqrt(), torch.zeros_like(evals))
    c_inv_sqrt = (evecs * inv_sqrt) @ evecs.T
    orth = c_inv_sqrt @ g if side == "left" else g @ c_inv_sqrt
    nuclear = torch.where(keep, evals.sqrt(), torch.zeros_like(evals)).sum()
    out = orth.mul_(nuclear.pow(alpha) * extra_scale_factor)
    if center_rows:
        out = out - out.mean(dim=0, keepdim=True)
    return out.to(grad.dtype)


def left_polargrad_orth_fn(
    grad: torch.Tensor,
    *,
    alpha: float = 1.0,
    center_rows: bool = False,
    eps: float = 1e-15,
    extra_scale_factor: float = 1.0,
) -> torch.Tensor:
    """:func:`one_sided_polargrad_orth_fn` with ``side="left"`` (Gram ``G G^T``: for wide matrices)."""
    return one_sided_polargrad_orth_fn(
        grad, side="left", alpha=alpha, center_rows=center_rows, eps=eps, extra_scale_factor=extra_scale_factor
    )


def right_polargrad_orth_fn(
    grad: torch.Tensor,
    *,
    alpha: float = 1.0,
    center_rows: bool = False,
    eps: float = 1e-15,
    extra_scale_factor: float = 1.0,
) -> torch.Tensor:
    """:func:`one_sided_polargrad_orth_fn` with ``side="right"`` (Gram ``G^T G``: for tall matrices)."""
    return one_sided_polargrad_orth_fn(
        grad, side="right", alpha=alpha, center_rows=center_rows, eps=eps, extra_scale_factor=extra_scale_factor
    )


# ---------------------------------------------------------------------------------------------- optimizer
@register_optimizer("polargrad")
class PolarGrad(OrthogonalizedOptimizer):
    """PolarGrad (module docstring): Newton-Schulz polar factor scaled by the nuclear norm.

    Args:
        params: parameters or param groups (``ndim >= 2``; rank > 2 is flattened to ``[out, -1]``).
        lr: learning rate (3e-4). momentum: EMA coefficient in [0, 1) (0.95). weight_decay: (0.01).
        nesterov, weight_decay_method, fp32_matmul_prec: see :class:`OrthogonalizedOptimizer`
            (precision default ``"highest"``).
        coefficient_type: Newton-Schulz coefficient set (``"quintic"``).
        num_ns_steps: Newton-Schulz steps (5; 0 = Frobenius-normalised direction).
        extra_scale_factor: multiplies the update (> 0, 1.0).
        custom_coefficient_sets: (a, b, c) tuples for ``coefficient_type="custom"``.
        weight_update_hook: a :class:`WeightUpdateHook` (e.g. from :mod:`emerging_optimizers.weight_update_hooks`).
        momentum_dtype: dtype of the momentum buffer (``None``: the parameter's).
    """

    param_ndim = (2, None)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-4,
        momentum: float = 0.95,
        weight_decay: float = 0.01,
        *,
        nesterov: bool = False,
        weight_decay_method: WeightDecayT = "decoupled",
        fp32_matmul_prec: FP32MatmulPrecT = "highest",
        coefficient_type: NSCoeffT = "quintic",
        num_ns_steps: int = 5,
        extra_scale_factor: float = 1.0,
        custom_coefficient_sets: Sequence[tuple[float, float, float]] | None = None,
        weight_update_hook: WeightUpdateHook[Any] | None = None,
        momentum_dtype: torch.dtype | None = None,
        nonfinite: NonfiniteT = "skip",
        process_group: Any = None,
        gather_dtype: torch.dtype | None = None,
        reduce_gradients: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            momentum,
            weight_decay,
            nesterov=nesterov,
            weight_decay_method=weight_decay_method,
            fp32_matmul_prec=fp32_matmul_prec,
            scaled_orthogonalize_fn=self._default_scaled_orthogonalize,
            weight_update_hook=weight_update_hook,
            coefficient_type=coefficient_type,
            num_ns_steps=num_ns_steps,
            extra_scale_factor=extra_scale_factor,
            custom_coefficient_sets=custom_coefficient_sets,
            momentum_dtype=momentum_dtype, nonfinite=nonfinite, process_group=process_group,
            gather_dtype=gather_dtype, reduce_gradients=reduce_gradients,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_ns_options(
            group["num_ns_steps"], group["coefficient_type"], group["custom_coefficient_sets"], min_steps=0
        )
        check_positive("extra_scale_factor", group["extra_scale_factor"])

    def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``NS(D) * <NS(D), D>_F * extra`` with ``D`` the direction viewed as ``[out, -1]``."""
        update = calculate_polargrad_update(
            grad.reshape(grad.shape[0], -1),
            kwargs["num_ns_steps"],
            kwargs["coefficient_type"],
            kwargs["custom_coefficient_sets"],
            kwargs["extra_scale_factor"],
        )
        return update.reshape(grad.shape)
