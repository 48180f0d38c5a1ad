"""Early, explicit hyperparameter checks: each raises ``ValueError`` naming the parameter and the value."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["check_beta", "check_betas", "check_choice", "check_nonneg", "check_positive", "check_positive_int"]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_nonneg(name: str, value: Any) -> None:
    """``value`` must be a finite real number >= 0 (lr, eps, weight_decay)."""
    if not _is_real(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number >= 0.")


def check_positive(name: str, value: Any) -> None:
    """``value`` must be a finite real number > 0."""
    if not _is_real(value) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number > 0.")


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
        raise ValueError(f"Invalid {name}: {value!r}; it must be in [0, 1).")


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
