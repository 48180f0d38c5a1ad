r"""Spel: Muon's step followed by re-orthogonalizing the weights (arXiv:2601.21487).

With momentum direction :math:`D` (EMA momentum and Nesterov as in
:class:`~emerging_optimizers.orthogonalized_optimizers.OrthogonalizedOptimizer`), decoupled weight decay
:math:`\lambda` and :math:`\operatorname{msign}(X) \approx U V^\top` computed by Newton-Schulz::

    W_{t+1} = msign( W_t (1 - lr * lambda) - lr * msign(D) )

i.e. the update is the unscaled ``NS(D)`` and, after ``W <- W - lr * U``, the weight itself is replaced by
``NS(W)`` (same coefficients and steps, under the same matmul precision). The weights therefore stay
(approximately) semi-orthogonal: every singular value is kept near 1 and ``lr`` sets how far the singular
vectors rotate per step. Weight decay only changes the mix of the old weight and the new direction before
the projection.

Defaults: ``lr=3e-4``, ``momentum=0.95``, ``weight_decay=0.1`` decoupled, ``fp32_matmul_prec="medium"``
(bf16 Newton-Schulz only where bf16 matmuls are fast, see :mod:`.muon_utils`), ``quintic`` x 5. Rank > 2
parameters are treated as ``[out, prod(rest)]``. bf16/fp16 parameters are accepted (the reference library
rejects them): the update and the projection are computed in float32 and rounded once into the parameter.
The projection runs before the ``weight_update_hook``'s post function, so a hook sees the projected weight.
Newton-Schulz only approximates msign and is not idempotent, so the projection is skipped when ``lr == 0``
(e.g. a scheduler freezing a group): as for every optimizer, ``lr = 0`` leaves the weights unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.orthogonalized_optimizers.muon_utils import NSCoeffT, check_ns_options, newton_schulz
from emerging_optimizers.orthogonalized_optimizers.orthogonalized_optimizer import (
    OrthogonalizedOptimizer,
    WeightUpdateHook,
)
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.utils import FP32MatmulPrecT, fp32_matmul_precision

__all__ = ["Spel", "msign"]


def msign(
    x: torch.Tensor,
    num_ns_steps: int = 5,
    coefficient_type: NSCoeffT = "quintic",
    custom_coefficient_sets: Sequence[tuple[float, float, float]] | None = None,
) -> torch.Tensor:
    """``NS(x) ~ U V^T`` of a tensor viewed as ``[out, -1]``, in float32 (float64 for float64 input), x's shape."""
    work = x if x.dtype == torch.float64 else x.float()
    out = newton_schulz(work.reshape(work.shape[0], -1), num_ns_steps, coefficient_type, custom_coefficient_sets)
    return out.reshape(x.shape)


@register_optimizer("spel")
class Spel(OrthogonalizedOptimizer):
    """Spel (module docstring): Muon's unscaled step, then the weights are projected back by ``msign``.

    Args:
        params: parameters or param groups (``ndim >= 2``; rank > 2 is flattened to ``[out, -1]``).
        lr: learning rate (3e-4). momentum: EMA coefficient in [0, 1) (0.95). weight_decay: (0.1).
        nesterov, weight_decay_method, fp32_matmul_prec: see :class:`OrthogonalizedOptimizer`.
        coefficient_type: Newton-Schulz coefficient set (``"quintic"``). num_ns_steps: steps (>= 1, 5).
        custom_coefficient_sets: (a, b, c) tuples for ``coefficient_type="custom"``.
        weight_update_hook: a :class:`WeightUpdateHook` (its post function sees the projected weight).
        momentum_dtype: dtype of the momentum buffer (``None``: the parameter's).
    """

    param_ndim = (2, None)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-4,
        momentum: float = 0.95,
        weight_decay: float = 0.1,
        *,
        nesterov: bool = False,
        weight_decay_method: WeightDecayT = "decoupled",
        fp32_matmul_prec: FP32MatmulPrecT = "medium",
        coefficient_type: NSCoeffT = "quintic",
        num_ns_steps: int = 5,
        custom_coefficient_sets: Sequence[tuple[float, float, float]] | None = None,
        weight_update_hook: WeightUpdateHook[Any] | None = None,
        momentum_dtype: torch.dtype | None = None,
        nonfinite: NonfiniteT = "skip",
        process_group: Any = None,
        gather_dtype: torch.dtype | None = None,
        reduce_gradients: bool = False,
    ) -> None:
        self._active_group: dict[str, Any] | None = None
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
            custom_coefficient_sets=custom_coefficient_sets,
            momentum_dtype=momentum_dtype, nonfinite=nonfinite, process_group=process_group,
            gather_dtype=gather_dtype, reduce_gradients=reduce_gradients,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_ns_options(group["num_ns_steps"], group["coefficient_type"], group["custom_coefficient_sets"])

    @staticmethod
    def _msign_kwargs(group: dict[str, Any]) -> dict[str, Any]:
        return {
            "num_ns_steps": group["num_ns_steps"],
            "coefficient_type": group["coefficient_type"],
            "custom_coefficient_sets": group["custom_coefficient_sets"],
        }

    def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The unscaled ``msign`` of the direction."""
        return msign(grad, **self._msign_kwargs(kwargs))

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        # post_weight_update_fn_inplace(p) has no group argument (SPEC); it reads the group being stepped.
        self._active_group = group
        try:
            super()._step_group(group, params)
        finally:
            self._active_group = None

    def post_weight_update_fn_inplace(self, p: torch.Tensor) -> None:
        """Replace the weight by its ``msign`` (under the group's matmul precision); nothing when ``lr == 0``."""
        group = self._active_group if self._active_group is not None else self._group_of(p)
        if group["lr"] == 0:  # Newton-Schulz is not idempotent: a frozen (lr 0) weight must not drift
            return
        with fp32_matmul_precision(group["fp32_matmul_prec"]):
            p.copy_(msign(p, **self._msign_kwargs(group)))
