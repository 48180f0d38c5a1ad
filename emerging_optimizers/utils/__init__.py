"""Small helpers shared across optimizers: matmul precision and argument validation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, get_args

import torch

from emerging_optimizers.utils.validation import (
    check_beta,
    check_betas,
    check_choice,
    check_nonneg,
    check_positive,
    check_positive_int,
)

__all__ = [
    "FP32MatmulPrecT",
    "fp32_matmul_precision",
    "check_beta",
    "check_betas",
    "check_choice",
    "check_nonneg",
    "check_positive",
    "check_positive_int",
]

FP32MatmulPrecT = Literal["highest", "high", "medium"]
FP32_MATMUL_PRECISIONS: tuple[str, ...] = get_args(FP32MatmulPrecT)


@contextlib.contextmanager
def fp32_matmul_precision(prec: FP32MatmulPrecT) -> Iterator[None]:
    """Set ``torch.set_float32_matmul_precision(prec)`` inside the block and restore the old value after."""
    check_choice("fp32_matmul_prec", prec, FP32_MATMUL_PRECISIONS)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(prec)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
