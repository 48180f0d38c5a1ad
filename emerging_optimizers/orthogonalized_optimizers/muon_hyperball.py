r"""MuonHyperball: Muon on the sphere ``||W||_F = R`` ("hyperball" training). Experimental.

With Muon's update :math:`U` (see :class:`~emerging_optimizers.orthogonalized_optimizers.Muon`) and
:math:`\operatorname{normalize}(X) = X / \lVert X\rVert_F`::

    W <- R * normalize( W' - lr * R * normalize(U) ),      W' = W after weight decay

Every step therefore has length ``lr * R`` before the projection back onto the sphere, whatever the scale of
the gradient, so ``lr`` is (about) the angle the weight turns per step. ``scale_mode`` and
``extra_scale_factor`` have no effect (the update is normalised); they are accepted so a Muon configuration
carries over. Weight decay (Muon's default 0.01 decoupled) still acts before the update: it shrinks the old
weight relative to the step, i.e. slightly lengthens the effective step.

Every parameter must already lie on its sphere when the optimizer is built (``|W|_F = R`` up to the
parameter dtype's rounding, ``rtol = max(1e-5, finfo(dtype).eps)``): project it once with
``with torch.no_grad(): W.mul_(R / W.norm())``. ``hyperball_radius`` and ``hyperball_eps`` are param-group
options (one radius per group, e.g. per layer type). Unlike the reference library the constructor has an
explicit signature (so the registry can check configurations) and validates everything up front; the
projection is built in rather than passed as a ``weight_update_hook``, so no other hook is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.mixin import WeightDecayT, decay_factor
from emerging_optimizers.orthogonalized_optimizers.muon import Muon, MuonScaleT
from emerging_optimizers.orthogonalized_optimizers.muon_utils import NSCoeffT, NSMethodT
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.utils import FP32MatmulPrecT
from emerging_optimizers.weight_update_hooks import scale_to_norm_

__all__ = ["MuonHyperball"]


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@register_optimizer("muon_hyperball")
class MuonHyperball(Muon):
    """Muon whose weights stay on the sphere of radius ``hyperball_radius`` (module docstring).

    Args:
        params: parameters or param groups (as for :class:`Muon`), each with ``|p|_F == hyperball_radius``.
        lr, momentum, weight_decay: as for :class:`Muon` (3e-4, 0.95, 0.01).
        hyperball_radius: Frobenius radius ``R`` of every weight of the group (required, finite, >= eps).
        hyperball_eps: norms below it count as zero (1e-15, finite > 0).
        nesterov, weight_decay_method, fp32_matmul_prec, coefficient_type, num_ns_steps, scale_mode,
        extra_scale_factor, custom_coefficient_sets, use_syrk, ns_method, ns_compute_dtype, stacked_dims,
        split_sizes, momentum_dtype: as for :class:`Muon`.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-4,
        momentum: float = 0.95,
        weight_decay: float = 0.01,
        *,
        hyperball_radius: float,
        hyperball_eps: float = 1e-15,
        nesterov: bool = False,
        weight_decay_method: WeightDecayT = "decoupled",
        fp32_matmul_prec: FP32MatmulPrecT = "medium",
        coefficient_type: NSCoeffT = "quintic",
        num_ns_steps: int = 5,
        scale_mode: MuonScaleT = "spectral",
        extra_scale_factor: float = 1.0,
        custom_coefficient_sets: Sequence[tuple[float, float, float]] | None = None,
        use_syrk: bool = False,
        ns_method: NSMethodT = "auto",
        ns_compute_dtype: torch.dtype | None = None,
        stacked_dims: int = 0,
        split_sizes: Sequence[int] | None = None,
        momentum_dtype: torch.dtype | None = None,
        nonfinite: NonfiniteT = "skip",
        process_group: Any = None,
        gather_dtype: torch.dtype | None = None,
        reduce_gradients: bool = False,
    ) -> None:
        # Read by _validate_group while Muon.__init__ builds the defaults and groups.
        self._hyperball_defaults = {"hyperball_radius": hyperball_radius, "hyperball_eps": hyperball_eps}
        self._active_group: dict[str, Any] | None = None
        super().__init__(
            params,
            lr,
            momentum,
            weight_decay,
            nesterov=nesterov,
            weight_decay_method=weight_decay_method,
            fp32_matmul_prec=fp32_matmul_prec,
            coefficient_type=coefficient_type,
            num_ns_steps=num_ns_steps,
            scale_mode=scale_mode,
            extra_scale_factor=extra_scale_factor,
            custom_coefficient_sets=custom_coefficient_sets,
            use_syrk=use_syrk,
            weight_update_hook=None,
            ns_method=ns_method,
            ns_compute_dtype=ns_compute_dtype,
            stacked_dims=stacked_dims,
            split_sizes=split_sizes,
            momentum_dtype=momentum_dtype, nonfinite=nonfinite, process_group=process_group,
            gather_dtype=gather_dtype, reduce_gradients=reduce_gradients,
        )

    @property
    def hyperball_radius(self) -> float:
        return float(self.defaults["hyperball_radius"])

    @property
    def hyperball_eps(self) -> float:
        return float(self.defaults["hyperball_eps"])

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        for key, value in self._hyperball_defaults.items():
            group.setdefault(key, value)
        super()._validate_group(group)
        eps, radius = group["hyperball_eps"], group["hyperball_radius"]
        if not _is_finite_number(eps) or eps <= 0:
            raise ValueError(f"Invalid hyperball_eps: {eps!r}; it must be a finite number > 0 (e.g. 1e-15).")
        if not _is_finite_number(radius) or radius < eps:
            raise ValueError(
                f"Invalid hyperball_radius: {radius!r}; it must be a finite number >= hyperball_eps ({eps})."
            )
        factor = decay_factor(group["weight_decay_method"], group["lr"], group["weight_decay"])
        if factor <= 0:  # W -> 0 (or -W): the projection back onto the sphere is then undefined
            raise ValueError(
                f"Invalid weight_decay: {group['weight_decay']!r} with lr {group['lr']!r} and weight_decay_method "
                f"{group['weight_decay_method']!r} multiplies the weights by {factor:.4g} <= 0 every step; "
                "MuonHyperball needs a factor > 0 (e.g. lr * weight_decay < 1)."
            )

    def _validate_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        super()._validate_param(p, group)
        radius = float(group["hyperball_radius"])
        norm = float(torch.linalg.vector_norm(p.detach().double()))
        rtol = max(1e-5, torch.finfo(p.dtype).eps)
        if norm < group["hyperball_eps"] or not math.isclose(norm, radius, rel_tol=rtol):
            raise ValueError(
                f"MuonHyperball: a parameter of shape {tuple(p.shape)} has Frobenius norm {norm:.6g}, but its group's "
                f"hyperball_radius is {radius:.6g} (rtol {rtol:.1g}); project it first, e.g. "
                "`with torch.no_grad(): p.mul_(hyperball_radius / p.norm())`, or set hyperball_radius to its norm."
            )

    # ------------------------------------------------------------------ the projection
    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        # The pre/post functions take no group (SPEC signature); they read the group being stepped.
        self._active_group = group
        try:
            super()._step_group(group, params)
        finally:
            self._active_group = None

    def _group_for(self, p: torch.Tensor) -> dict[str, Any]:
        return self._active_group if self._active_group is not None else self._group_of(p)

    def pre_weight_update_fn_inplace(self, p: torch.Tensor, update: torch.Tensor) -> None:
        """``U <- R * U / |U|_F`` (zero if ``|U|`` is below ``hyperball_eps``)."""
        group = self._group_for(p)
        scale_to_norm_(update, group["hyperball_radius"], group["hyperball_eps"])

    def post_weight_update_fn_inplace(self, p: torch.Tensor) -> None:
        """``W <- R * W / |W|_F``."""
        group = self._group_for(p)
        scale_to_norm_(p, group["hyperball_radius"], group["hyperball_eps"])
