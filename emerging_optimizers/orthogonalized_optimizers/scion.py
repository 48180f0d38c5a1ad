r"""Scion: a conditional-gradient (Frank-Wolfe) step on a spectral-norm ball (arXiv:2502.07529).

With momentum :math:`M \leftarrow \mu M + (1-\mu) g` (``momentum`` is :math:`\mu`; the paper's
:math:`\alpha = 1 - \mu`), the linear minimization oracle of the spectral-norm ball of radius
:math:`\rho\sqrt{m/n}` (the RMS-to-RMS operator norm ball) is :math:`-\rho\sqrt{m/n}\,\operatorname{msign}(M)`::

    U = NS_K(M) * sqrt(m / n) * spectral_radius
    W <- (1 - lr * weight_decay) * W - lr * U

* ``weight_decay=1.0`` (default, decoupled): the constrained Scion step
  :math:`W \leftarrow (1-\gamma) W + \gamma\,\mathrm{lmo}(M)` with ``lr`` as the Frank-Wolfe step size
  :math:`\gamma \in [0, 1]`: a convex combination, so weights that start inside the ball of radius
  :math:`\rho\sqrt{m/n}` stay inside it (up to Newton-Schulz's approximation of msign: quintic's singular
  values reach about 1.2). Keep ``lr <= 1``.
* ``weight_decay=0.0``: unconstrained Scion (uSCG), :math:`W \leftarrow W + \gamma\,\mathrm{lmo}(M)`, i.e. Muon
  with the ``"unit_rms_norm"`` scale.
* other values interpolate (decoupled weight decay ``lr * weight_decay``); other weight-decay methods work as
  in every optimizer here.

The reference library fixes ``weight_decay = 1`` and raises ``TypeError`` if a ``weight_decay`` argument is
passed, which breaks configurations shared across optimizers; here ``weight_decay``,
``weight_decay_method`` and ``nesterov`` are accepted (keyword-only, defaults 1.0 / ``"decoupled"`` / False
give the reference's step) and can differ per param group like every other option.

Scion is :class:`~emerging_optimizers.orthogonalized_optimizers.Muon` with ``scale_mode="unit_rms_norm"`` and
``extra_scale_factor=spectral_radius``, so it inherits Muon's batching, conv/stacked/split layouts and
bf16 handling. ``spectral_radius`` is the per-group knob (the group's ``scale_mode`` / ``extra_scale_factor``
stay at ``"unit_rms_norm"`` / 1.0 and multiply with it).

Defaults: ``lr=3e-4``, ``momentum=0.95``, ``fp32_matmul_prec="medium"``, ``quintic`` x 5,
``spectral_radius=1.0``. For layers that are not matrices-to-matrices (embeddings, LM head) the paper
uses other norms (ColNorm, Sign); use another optimizer for those parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.orthogonalized_optimizers.muon import Muon
from emerging_optimizers.orthogonalized_optimizers.muon_utils import NSCoeffT, NSMethodT
from emerging_optimizers.orthogonalized_optimizers.orthogonalized_optimizer import WeightUpdateHook
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.utils import FP32MatmulPrecT, check_positive

__all__ = ["Scion"]


@register_optimizer("scion")
class Scion(Muon):
    """Scion (module docstring): Frank-Wolfe step with the spectral LMO ``-rho * sqrt(m/n) * msign(M)``.

    Args:
        params: parameters or param groups (as for :class:`Muon`).
        lr: Frank-Wolfe step size (3e-4; keep it <= 1 with ``weight_decay=1``).
        momentum: EMA coefficient in [0, 1) (0.95).
        fp32_matmul_prec: matmul precision of the Newton-Schulz iteration (``"medium"``).
        coefficient_type: Newton-Schulz coefficient set (``"quintic"``). num_ns_steps: steps (5).
        spectral_radius: radius ``rho`` of the norm ball (> 0, 1.0).
        weight_decay: 1.0 (constrained Scion); 0.0 gives unconstrained Scion.
        weight_decay_method: ``"decoupled"`` (the Frank-Wolfe form needs it).
        nesterov: Nesterov direction (False, as in the paper).
        weight_update_hook: a :class:`WeightUpdateHook`.
        custom_coefficient_sets, ns_method, ns_compute_dtype, stacked_dims, split_sizes, momentum_dtype: as for
            :class:`Muon`.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-4,
        momentum: float = 0.95,
        *,
        fp32_matmul_prec: FP32MatmulPrecT = "medium",
        coefficient_type: NSCoeffT = "quintic",
        num_ns_steps: int = 5,
        spectral_radius: float = 1.0,
        weight_decay: float = 1.0,
        weight_decay_method: WeightDecayT = "decoupled",
        nesterov: bool = False,
        weight_update_hook: WeightUpdateHook[Any] | None = None,
        custom_coefficient_sets: Sequence[tuple[float, float, float]] | None = None,
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
        self._spectral_radius_default = spectral_radius  # read by _validate_group during Muon.__init__
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
            scale_mode="unit_rms_norm",
            extra_scale_factor=1.0,
            custom_coefficient_sets=custom_coefficient_sets,
            weight_update_hook=weight_update_hook,
            ns_method=ns_method,
            ns_compute_dtype=ns_compute_dtype,
            stacked_dims=stacked_dims,
            split_sizes=split_sizes,
            momentum_dtype=momentum_dtype, nonfinite=nonfinite, process_group=process_group,
            gather_dtype=gather_dtype, reduce_gradients=reduce_gradients,
        )

    @property
    def spectral_radius(self) -> float:
        return float(self.defaults["spectral_radius"])

    def _validate_group(self, group: dict[str, Any]) -> None:
        # Muon.__init__ does not know spectral_radius: the defaults get it here, groups inherit it from them.
        group.setdefault("spectral_radius", self._spectral_radius_default)
        super()._validate_group(group)
        check_positive("spectral_radius", group["spectral_radius"])

    @staticmethod
    def _ns_kwargs(group: dict[str, Any]) -> dict[str, Any]:
        kwargs = Muon._ns_kwargs(group)
        kwargs["extra_scale_factor"] = group["extra_scale_factor"] * group["spectral_radius"]
        return kwargs
