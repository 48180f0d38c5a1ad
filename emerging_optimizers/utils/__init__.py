"""Small helpers shared across optimizers: matmul precision, argument validation, process-group size and rank."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, get_args

import torch

from emerging_optimizers.utils.eig import conjugate, eigh_with_fallback, orthogonal_iteration
from emerging_optimizers.utils.validation import (
    MatrixShapeError,
    check_beta,
    check_betas,
    check_choice,
    check_matrix,
    check_nonneg,
    check_positive,
    check_positive_int,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "clip_update_rms_",
    "FP32MatmulPrecT",
    "fp32_matmul_precision",
    "MatrixShapeError",
    "check_beta",
    "check_betas",
    "check_choice",
    "check_matrix",
    "check_nonneg",
    "check_positive",
    "check_positive_int",
    "conjugate",
    "eigh_with_fallback",
    "orthogonal_iteration",
    "get_pg_rank",
    "get_pg_size",
]

FP32MatmulPrecT = Literal["highest", "high", "medium"]
FP32_MATMUL_PRECISIONS: tuple[str, ...] = get_args(FP32MatmulPrecT)


@contextlib.contextmanager
def fp32_matmul_precision(
    prec: FP32MatmulPrecT = "highest", *, precision: FP32MatmulPrecT | None = None
) -> Iterator[None]:
    """Set ``torch.set_float32_matmul_precision(prec)`` inside the block and restore the old value after.

    ``precision=`` is the reference library's name of the argument (either may be given, not both).
    """
    if precision is not None:
        if prec != "highest":
            raise TypeError("fp32_matmul_precision got both prec and precision; pass one of them.")
        prec = precision
    check_choice("fp32_matmul_prec", prec, FP32_MATMUL_PRECISIONS)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(prec)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_pg_size(group: ProcessGroup | None = None) -> int:
    """Number of processes in ``group``; 1 when ``group`` is None or torch.distributed is not initialized."""
    if group is None or not _distributed_ready():
        return 1
    return group.size()


def get_pg_rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group``; 0 when ``group`` is None or torch.distributed is not initialized."""
    if group is None or not _distributed_ready():
        return 0
    return group.rank()


def clip_update_rms_(u: torch.Tensor, max_rms: float, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``u`` in place by ``min(1, max_rms / (rms(u) + eps))`` and return it; nothing when ``max_rms == 0``.

    The RMS clip of the Kronecker-factored optimizers (SOAP family, MOSO, PSGD); computed on device.
    """
    if max_rms == 0:
        return u
    rms = u.square().mean().sqrt()
    return u.mul_((max_rms / (rms + eps)).clamp(max=1.0))
