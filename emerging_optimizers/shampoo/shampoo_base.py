"""The interfaces of the Kronecker-factored preconditioners: what a SOAP or Shampoo optimizer asks of one.

A preconditioner belongs to **one** 2-D parameter (or one block of it). The optimizer builds it inside
``step()`` from that parameter's state dict, feeds it the gradient, uses it, and writes its tensors back with
:meth:`rebind_state` (a preconditioner may replace a tensor rather than update it in place, e.g. a new
eigenbasis). The state layout is whatever :meth:`init_state` returns, so an optimizer allocates the state of
whichever preconditioner class it is configured with.

* :class:`SoapPreconditionerProtocol`: rotates into and out of the factors' eigenbasis (SOAP, KL-SOAP),
  where the optimizer runs an element-wise method on ``exp_avg``/``exp_avg_sq``.
* :class:`ShampooPreconditionerProtocol`: applies the two-sided preconditioner itself (Shampoo,
  :class:`emerging_optimizers.shampoo.shampoo.ShampooPreconditioner`).

``shampoo_beta`` is the factors' EMA coefficient *for this step*; the optimizer decides whether it is
bias-corrected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol

import torch

__all__ = [
    "ShampooPreconditionerProtocol",
    "SoapPreconditionerProtocol",
    "TensorPair",
]


@dataclasses.dataclass
class TensorPair:
    """Two tensors for the two sides of a matrix: ``L`` (rows) and ``R`` (columns); unpacks as ``L, R``."""

    L: torch.Tensor
    R: torch.Tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.L, self.R))

    def __len__(self) -> int:  # unpacking under torch.compile asks for it
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.L, self.R)[index]


class _PreconditionerProtocol(Protocol):
    """What every preconditioner of the family provides, for one parameter (or block)."""

    def __init__(self, state: dict, /, *args: Any, **kwargs: Any) -> None:
        """Bind to one parameter's state dict (the tensors are used, not copied)."""

    @staticmethod
    def init_state(shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
        """Fresh state tensors for a parameter of ``shape`` (2-D) on ``device``, keyed as the instance reads them."""

    def init_step(self, grad: torch.Tensor, shampoo_beta: float, /) -> None:
        """The first step's update, when no history exists yet."""

    def update_kronecker_factors(self, grad: torch.Tensor, shampoo_beta: float, /) -> None:
        """Accumulate ``grad`` into the Kronecker factors (with any correction the method applies, e.g. KL)."""

    def step(self, grad: torch.Tensor, shampoo_beta: float, /) -> None:
        """Update the preconditioner with the latest gradient (every step after the first)."""

    def rebind_state(self, state: dict, /) -> None:
        """Write the current tensors back into the parameter's state dict."""


class SoapPreconditionerProtocol(_PreconditionerProtocol, Protocol):
    """A preconditioner that works in the eigenbasis of its factors (SOAP family)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor

    def project_in(self, x: torch.Tensor, /) -> torch.Tensor:
        """``x`` from the parameter basis into the eigenbasis (``Q_L^T x Q_R``)."""

    def project_out(self, x: torch.Tensor, /) -> torch.Tensor:
        """``x`` from the eigenbasis back into the parameter basis (``Q_L x Q_R^T``)."""


class ShampooPreconditionerProtocol(_PreconditionerProtocol, Protocol):
    """A preconditioner applied directly in the parameter basis (Shampoo)."""

    def precondition(self, x: torch.Tensor, /) -> torch.Tensor:
        """The preconditioned matrix, e.g. ``L^{-1/4} x R^{-1/4}``, in the parameter basis."""
