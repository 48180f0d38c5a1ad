r"""NorMuon: Muon whose orthogonalized update has its rows (or columns) equalised by a running second moment.

The algorithm is :class:`~emerging_optimizers.orthogonalized_optimizers.AdaptiveMuon` with
``moment2_method="normuon"`` (arXiv:2510.05491; the maths is :func:`calculate_adaptive_muon_update`, written
once): with :math:`O = NS(D)`, :math:`V \leftarrow \beta_2 V + (1-\beta_2)\,\mathrm{mean}_d(O \odot O)` over the
long dimension, :math:`\bar U = O / \sqrt{\max(V, \epsilon)}` rescaled to :math:`\lVert O\rVert_F`, then Muon's
shape scale and :math:`W \leftarrow W - \eta\,U`.

What this class adds: its own defaults, and parameters of any rank >= 2 (a conv kernel ``[out, in, kh, kw]``
is updated as its ``[out, in*kh*kw]`` matrix, as :class:`Muon` does), so it can be the matrix side of
:class:`MuonAdamW` on any model. For a 2-D parameter it is ``AdaptiveMuon(moment2_method="normuon")`` with
the same options, bit for bit (tested).

Defaults, and the evidence for them (``docs/sweeps-muon-adamw.md``: three ``emopt`` tasks, 3 seeds each):
``lr=2e-3``, ``momentum=0.95``, ``weight_decay=1.0`` (decoupled, so 0.2% a step at that lr, the per-step decay of
torch's Muon recipe), ``nesterov=True``, ``beta2=0.95``. On the char-LM (inside MuonAdamW) NorMuon + Nesterov
reached 2.099 +- 0.015 at lr 2e-3 and 2.092 +- 0.011 with weight decay 1.0, where Muon + Nesterov reached
2.124 +- 0.006 and Muon 2.172 +- 0.011; on the ViT 0.258 +- 0.005 (lr 1e-3) vs 0.296 +- 0.010 and 0.330 +- 0.016.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.orthogonalized_optimizers.adaptive_muon import AdaptiveMuon, Moment2MethodT
from emerging_optimizers.orthogonalized_optimizers.muon import MuonScaleT
from emerging_optimizers.orthogonalized_optimizers.muon_utils import NSCoeffT, NSMethodT
from emerging_optimizers.orthogonalized_optimizers.orthogonalized_optimizer import WeightUpdateHook
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.utils import FP32MatmulPrecT

__all__ = ["NorMuon"]


@register_optimizer("normuon")
class NorMuon(AdaptiveMuon):
    """:class:`AdaptiveMuon` with ``moment2_method="normuon"``, Nesterov momentum, and N-D parameters (module doc).

    Args: as :class:`AdaptiveMuon`; the defaults differ: ``lr=2e-3``, ``weight_decay=1.0`` (decoupled: 0.2% a
    step at that lr), ``nesterov=True``, ``moment2_method="normuon"`` (``"adamuon"`` and ``"namo"`` stay
    available). Parameters: any rank >= 2.
    """

    param_ndim = (2, None)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 2e-3,
        momentum: float = 0.95,
        weight_decay: float = 1.0,
        *,
        nesterov: bool = True,
        weight_decay_method: WeightDecayT = "decoupled",
        fp32_matmul_prec: FP32MatmulPrecT = "medium",
        coefficient_type: NSCoeffT = "quintic",
        num_ns_steps: int = 5,
        scale_mode: MuonScaleT = "spectral",
        extra_scale_factor: float = 1.0,
        moment2_method: Moment2MethodT = "normuon",
        beta2: float = 0.95,
        eps: float = 1e-8,
        custom_coefficient_sets: Sequence[tuple[float, float, float]] | None = None,
        weight_update_hook: WeightUpdateHook[Any] | None = None,
        ns_method: NSMethodT = "auto",
        ns_compute_dtype: torch.dtype | None = None,
        momentum_dtype: torch.dtype | None = None,
        nonfinite: NonfiniteT = "skip",
        process_group: Any = None,
        gather_dtype: torch.dtype | None = None,
        reduce_gradients: bool = False,
    ) -> None:
        super().__init__(
            params, lr, momentum, weight_decay, nesterov=nesterov, weight_decay_method=weight_decay_method,
            fp32_matmul_prec=fp32_matmul_prec, coefficient_type=coefficient_type, num_ns_steps=num_ns_steps,
            scale_mode=scale_mode, extra_scale_factor=extra_scale_factor, moment2_method=moment2_method,
            beta2=beta2, eps=eps, custom_coefficient_sets=custom_coefficient_sets,
            weight_update_hook=weight_update_hook, ns_method=ns_method, ns_compute_dtype=ns_compute_dtype,
            momentum_dtype=momentum_dtype, nonfinite=nonfinite, process_group=process_group,
            gather_dtype=gather_dtype, reduce_gradients=reduce_gradients,
        )

    def _orthogonalize_params(
        self, params: list[torch.Tensor], directions: list[torch.Tensor], group: dict[str, Any]
    ) -> list[torch.Tensor]:
        # N-D parameters as their [out, -1] matrices (the second moment is kept for that view)
        views = [d if d.ndim == 2 else d.reshape(d.shape[0], -1) for d in directions]
        updates = super()._orthogonalize_params(params, views, group)
        return [u if u.shape == p.shape else u.reshape(p.shape) for p, u in zip(params, updates)]
