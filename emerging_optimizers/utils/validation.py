"""Early, explicit hyperparameter checks: each raises ``ValueError`` naming the parameter and the value."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = ["MatrixShapeError", "check_beta", "check_betas", "check_choice", "check_matrix", "check_nonneg",
           "check_positive", "check_positive_int"]


_LABELS = {"lr": "learning rate (lr)", "eps": "epsilon (eps)"}


def _label(name: str) -> str:
    """How a message names a hyperparameter: its torch name, spelled out for the common ones."""
    m = re.fullmatch(r"betas\[(\d+)\]", name)
    if m:
        return f"beta at index {m.group(1)} ({name})"
    return _LABELS.get(name, name)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_nonneg(name: str, value: Any) -> None:
    """``value`` must be a finite real number >= 0 (lr, eps, weight_decay)."""
    if not _is_real(value) or value < 0:
        raise ValueError(f"Invalid {_label(name)}: {value!r}; it must be a finite number >= 0.")


def check_positive(name: str, value: Any) -> None:
    """``value`` must be a finite real number > 0."""
    if not _is_real(value) or value <= 0:
        raise ValueError(f"Invalid {_label(name)}: {value!r}; it must be a finite number > 0.")


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """``value`` must be an ``int`` >= 1 (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"Invalid {name}: {value!r}; it must be an integer >= 1{extra}.")


def check_beta(name: str, value: Any) -> None:
    """A decay rate in ``[0, 1)``."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {_label(name)}: {value!r}; it must be in [0, 1).")


def check_betas(name: str, value: Any, n: int) -> None:
    """A tuple of ``n`` decay rates, each in ``[0, 1)``."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != n:
        raise ValueError(f"Invalid {name}: {value!r}; it must be a tuple of {n} numbers in [0, 1).")
    for i, b in enumerate(value):
        check_beta(f"{name}[{i}]", b)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` must be one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; choose one of {', '.join(map(repr, choices))}.")


class MatrixShapeError(ValueError, TypeError):
    """A tensor that must be a floating-point matrix is not one.

    A ``ValueError`` (torch's convention for a bad shape) that is also a ``TypeError`` (what the reference
    library raises for the same condition), so code written against either catches it.
    """


def check_matrix(x: Any, name: str, *, max_ndim: int | None = 2, hint: str = "") -> torch.Tensor:
    """``x`` must be a floating-point tensor with ``2 <= x.ndim <= max_ndim`` (``None``: no upper bound).

    The one check of the matrix optimizers' precondition; raises :class:`MatrixShapeError` naming ``name``,
    the shape and dtype, followed by ``hint``. Returns ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}.")
    if x.ndim >= 2 and (max_ndim is None or x.ndim <= max_ndim) and x.is_floating_point():
        return x
    got = f"shape {tuple(x.shape)}, dtype {x.dtype}"
    hint = f" {hint}" if hint else ""
    if max_ndim == 2:
        raise MatrixShapeError(f"Only 2D parameters are supported: {name} expects a 2-D floating-point matrix, "
                               f"got {got}.{hint}")
    dims = "2d or 3d (or N-d: ndim >= 2, the leading dims a batch)" if max_ndim is None else f"2d to {max_ndim}d"
    raise MatrixShapeError(f"{name} expects a floating-point matrix or batch of matrices: it must be {dims}, "
                           f"got {got}.{hint}")
