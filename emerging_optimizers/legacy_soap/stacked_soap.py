"""StackedSoap: SOAP for batched matrices ``(b, m, n)`` (e.g. stacked expert weights), through one 2-D stacking.

A 3-D parameter is optimized as a single matrix whose batch dimension is merged into the *smaller* matrix edge
(:func:`_stack_2d`): ``(m, b*n)`` when ``n <= m``, else ``(b*m, n)``. The larger edge keeps one factor shared by
all slices (its statistics pooled over the batch) and the merged edge gets a ``b*min(m, n)`` factor. The state
(moments, factors, bases) is sized for that stacked matrix, as in the reference library.

SOAP's settings are fixed as the reference fixes them: decoupled weight decay, no Nesterov, bias correction,
the QR refresh with one power step, KL-Shampoo factors. Other ranks: 2-D parameters are plain SOAP, 1-D
parameters get Adam, and rank >= 4 parameters SOAP's ``[d_0, rest]`` matrix (the reference fails on 1-D and
4-D parameters). Unlike the reference, the parameter's ``data``/``grad`` are never swapped: the stacking is
applied to the gradient and undone on the update inside the step.
"""

from __future__ import annotations

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.legacy_soap.soap import SOAP
from emerging_optimizers.registry import register_optimizer

__all__ = ["StackedSoap"]


def _stack_2d(x: torch.Tensor) -> torch.Tensor:
    """``(b, m, n)`` -> ``(m, b*n)`` if ``n <= m`` else ``(b*m, n)`` (contiguous); a 2-D tensor is returned as is."""
    if x.dim() == 2:
        return x
    b, m, n = x.shape
    if n <= m:
        return x.permute(1, 0, 2).reshape(m, b * n).contiguous()
    return x.reshape(b * m, n).contiguous()


def _unstack(u: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_stack_2d` for a tensor of the original ``shape``."""
    if len(shape) == 2:
        return u
    b, m, n = shape
    if n <= m:
        return u.reshape(m, b, n).permute(1, 0, 2).reshape(shape)
    return u.reshape(shape)


@register_optimizer("stacked_soap")
class StackedSoap(SOAP):
    """SOAP with 3-D parameters stacked to 2-D (module docstring); ``lr`` defaults to 3e-3 (required in the
    reference). Arguments as :class:`~emerging_optimizers.legacy_soap.soap.SOAP`'s."""

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        shampoo_beta: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        super().__init__(params, lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                         weight_decay_method="decoupled", nesterov=False, correct_bias=True, use_eigh=False,
                         power_iter_steps=1, use_kl_shampoo=True, nonfinite=nonfinite)

    def _matrix_shape(self, shape: torch.Size) -> tuple[int, int] | None:
        if len(shape) != 3:
            return super()._matrix_shape(shape)
        b, m, n = shape
        return (m, b * n) if n <= m else (b * m, n)

    def _to_matrix(self, x: torch.Tensor) -> torch.Tensor:
        return _stack_2d(x) if x.dim() == 3 else super()._to_matrix(x)

    def _from_matrix(self, u: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return _unstack(u, shape) if len(shape) == 3 else super()._from_matrix(u, shape)
