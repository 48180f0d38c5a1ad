"""REKLS, "realtime eigen KL SOAP": :class:`~emerging_optimizers.legacy_soap.soap.SOAP` with KL-Shampoo factors and
a full ``eigh`` of both factors every step.

"Realtime": the current gradient is already in the factors when they are decomposed, so the eigenbasis used for
the step is exact and up to date (no stale basis, no orthogonal-iteration lag), at the cost of two ``eigh`` per
matrix per step. Everything else (defaults, fixes over the reference library) is SOAP's.
"""

from __future__ import annotations

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.legacy_soap.soap import SOAP
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.registry import register_optimizer

__all__ = ["REKLS"]


@register_optimizer("rekls")
class REKLS(SOAP):
    """``SOAP(use_eigh=True, use_kl_shampoo=True)``; see :class:`~emerging_optimizers.legacy_soap.soap.SOAP` for the
    arguments (``lr`` defaults to 3e-3, the reference requires it). The two switches stay in the param groups."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        shampoo_beta: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        weight_decay_method: WeightDecayT = "decoupled",
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        super().__init__(params, lr, betas, shampoo_beta, eps, weight_decay, weight_decay_method=weight_decay_method,
                         use_eigh=True, use_kl_shampoo=True, nonfinite=nonfinite)
