r"""One step of an online solver of the orthogonal Procrustes problem (Xi-Lin Li, arXiv:2402.11858).

Find the rotation :math:`U` minimising :math:`\|UQ - I\|_F`: rotate :math:`Q \leftarrow e^{aR} Q` with the
generator :math:`R = Q^\top - Q` (normalised to :math:`\|R\|_2 \approx 1`) and a step :math:`a` from a line search
on a Taylor expansion of :math:`e^{aR}`. The fixed point is the symmetric positive definite :math:`Q`; since
:math:`U` is (approximately) orthogonal, :math:`Q^\top Q` (PSGD's preconditioner) is (approximately) unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch

from emerging_optimizers.psgd.psgd_utils import norm_lower_bound_skew
from emerging_optimizers.utils import fp32_matmul_precision

__all__ = ["procrustes_step"]


def procrustes_step(
    Q: torch.Tensor,
    max_step_size: float = 0.125,
    eps: float = 1e-8,
    order: Literal[2, 3] = 2,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Rotate a square ``Q`` one step towards its symmetric positive definite polar factor; returns a new tensor.

    With :math:`R = (Q^\top - Q)/\max(\|Q^\top - Q\|_2, \epsilon)` (norm: :func:`norm_lower_bound_skew`, whose
    random probes come from ``generator``) and :math:`t_j = \operatorname{tr}(R^j Q)`:

    * ``order=2``: :math:`e^{aR} \approx I + aR + a^2R^2/2`; the quadratic in :math:`a` is maximised at
      :math:`a = \operatorname{clamp}(-t_1/t_2, 0, a_{\max})` when concave (:math:`t_2 < 0`), else
      :math:`a = a_{\max}`; :math:`Q \leftarrow Q + a(RQ + \tfrac a2 R^2Q)`. Keep ``max_step_size`` < 1/4.
    * ``order=3``: one more term; :math:`a = \min\big((-t_2 - \sqrt{t_2^2 - \tfrac32 t_1t_3})/(\tfrac34 t_3),
      a_{\max}\big)`; :math:`Q \leftarrow Q + a(RQ + \tfrac a2(R^2Q + \tfrac a4 R^3Q))`. Keep ``max_step_size``
      < 5/8.

    The step size is a 0-dim tensor computed on ``Q``'s device (``torch.where``/``clamp``, no ``.item()``, no host
    synchronization). Unlike the reference library, a degenerate third-order step (``0/0`` when ``Q`` is already
    symmetric) rotates by 0 instead of filling ``Q`` with NaN. Matrix products run under ``"highest"`` float32
    matmul precision (TF32 would spoil the expansion). ``order`` other than 2 or 3 raises ``ValueError``.
    """
    if order not in (2, 3):
        raise ValueError(f"Invalid order: order must be 2 or 3, got {order!r}.")
    with fp32_matmul_precision("highest"):
        R = Q.T - Q
        R = R / norm_lower_bound_skew(R, generator=generator).clamp(min=eps)
        RQ = R @ Q
        RRQ = R @ RQ
        t1 = torch.trace(RQ)  # = ||Q||_F^2 - tr(Q Q) >= 0 before the normalisation of R
        t2 = torch.trace(RRQ)
        if order == 2:
            concave = (-t1 / t2).clamp(min=0.0, max=max_step_size)
            a = torch.where(t2 < 0, concave, torch.full_like(t2, max_step_size))
            return Q + a * (RQ + (0.5 * a) * RRQ)
        RRRQ = R @ RRQ
        t3 = torch.trace(RRRQ)
        a = ((-t2 - torch.sqrt(t2 * t2 - 1.5 * t1 * t3)) / (0.75 * t3)).clamp(max=max_step_size)
        a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
        return Q + a * (RQ + (0.5 * a) * (RRQ + (0.25 * a) * RRRQ))
