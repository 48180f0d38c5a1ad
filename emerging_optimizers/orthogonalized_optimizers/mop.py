r"""MOP: momentum orthogonalized by an exact polar decomposition (SVD), nuclear-norm scaled. Experimental.

With momentum direction :math:`D = U_s \operatorname{diag}(S) V_h` (thin SVD; weight decay, momentum and
Nesterov as in :class:`~emerging_optimizers.orthogonalized_optimizers.OrthogonalizedOptimizer`)::

    U_t = U_s V_h * scale * extra_scale_factor,        W <- W - lr * U_t

``scale_mode="nuclear_norm"`` (default): :math:`\text{scale} = \sum S = \lVert D\rVert_*`, PolarGrad's
steepest-descent scale (arXiv:2505.21799) with the exact polar factor instead of a Newton-Schulz
approximation; any Muon scale mode (``"spectral"``, ``"shape_scaling"``, ``"unit_rms_norm"``, see
:func:`~emerging_optimizers.orthogonalized_optimizers.get_muon_scale_factor`) gives Muon with an exact
orthogonalization instead.

Costs one full SVD per matrix per step (far more than Newton-Schulz): meant as a reference point and for
small models. Defaults: ``lr=3e-4``, ``momentum=0.95``, ``weight_decay=0.01`` decoupled,
``fp32_matmul_prec="highest"``. Rank > 2 parameters are treated as ``[out, prod(rest)]``; bf16/fp16
parameters are handled in float32.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.orthogonalized_optimizers.muon import get_muon_scale_factor
from emerging_optimizers.orthogonalized_optimizers.orthogonalized_optimizer import (
    OrthogonalizedOptimizer,
    WeightUpdateHook,
)
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.utils import FP32MatmulPrecT, check_choice, check_matrix, check_positive

__all__ = ["MOP", "MOPScaleT", "calculate_mop_update", "polar_via_svd"]

MOPScaleT = Literal["nuclear_norm", "spectral", "shape_scaling", "unit_rms_norm"]
_SCALE_MODES: tuple[str, ...] = get_args(MOPScaleT)


def polar_via_svd(A: torch.Tensor, return_p: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    r"""Polar decomposition :math:`A = U_p P` of a matrix (or a batch ``[..., m, n]``) by thin SVD.

    Returns ``(U_p, P, S)``: :math:`U_p = U_s V_h` (orthonormal rows or columns), :math:`P = V_h^H
    \operatorname{diag}(S) V_h` (``None`` unless ``return_p``; ``n x n`` for ``m >= n``, otherwise the rank-m
    positive part) and the singular values ``S`` (descending). Computes in float32 (float64 for float64
    input) and returns those dtypes.
    """
    check_matrix(A, "polar_via_svd", max_ndim=None)
    work = A if A.dtype == torch.float64 else A.float()
    u_s, s, v_h = torch.linalg.svd(work, full_matrices=False)
    polar = u_s @ v_h
    p = (v_h.mH * s.unsqueeze(-2)) @ v_h if return_p else None
    return polar, p, s


def calculate_mop_update(
    direction: torch.Tensor, scale_mode: MOPScaleT = "nuclear_norm", extra_scale_factor: float = 1.0
) -> torch.Tensor:
    """MOP's update of a matrix: exact polar factor times the scale of ``scale_mode`` times ``extra_scale_factor``."""
    polar, _, s = polar_via_svd(direction)
    if scale_mode == "nuclear_norm":
        return polar.mul_(s.sum(dim=-1)[..., None, None] * extra_scale_factor)
    rows, cols = direction.shape[-2:]
    return polar.mul_(get_muon_scale_factor(rows, cols, scale_mode) * extra_scale_factor)  # type: ignore[arg-type]


@register_optimizer("mop")
class MOP(OrthogonalizedOptimizer):
    """MOP (module docstring): exact SVD polar factor of the momentum, nuclear-norm scaled.

    Args:
        params: parameters or param groups (``ndim >= 2``; rank > 2 is flattened to ``[out, -1]``).
        lr: learning rate (3e-4). momentum: EMA coefficient in [0, 1) (0.95). weight_decay: (0.01).
        nesterov, weight_decay_method, fp32_matmul_prec: see :class:`OrthogonalizedOptimizer`
            (precision default ``"highest"``).
        scale_mode: ``"nuclear_norm"`` (default) or a Muon scale mode.
        extra_scale_factor: multiplies the update (> 0, 1.0).
        weight_update_hook: a :class:`WeightUpdateHook`.
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
        scale_mode: MOPScaleT = "nuclear_norm",
        extra_scale_factor: float = 1.0,
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
            scale_mode=scale_mode,
            extra_scale_factor=extra_scale_factor,
            momentum_dtype=momentum_dtype, nonfinite=nonfinite, process_group=process_group,
            gather_dtype=gather_dtype, reduce_gradients=reduce_gradients,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_choice("scale_mode", group["scale_mode"], _SCALE_MODES)
        check_positive("extra_scale_factor", group["extra_scale_factor"])

    def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Exact polar factor of the direction viewed as ``[out, -1]``, scaled by ``scale_mode``."""
        update = calculate_mop_update(
            grad.reshape(grad.shape[0], -1), kwargs["scale_mode"], kwargs["extra_scale_factor"]
        )
        return update.reshape(grad.shape)
