"""Warm-up schedules of the AdEMAMix family (arXiv:2409.03137, section 3), in plain Python floats."""

from __future__ import annotations

import math

__all__ = ["half_life_steps", "inverse_half_life_beta", "half_life_warmup", "linear_warmup"]


def half_life_steps(beta: float, eps: float = 1e-8) -> float:
    """``h(b) = ln(0.5)/ln(b + eps) - 1``: steps after which an EMA with rate ``b`` has halved a sample."""
    return math.log(0.5) / math.log(beta + eps) - 1.0


def inverse_half_life_beta(steps: float) -> float:
    """``h_inv(s) = 0.5**(1/(s+1))``, the EMA rate whose half-life is ``s`` steps."""
    return 0.5 ** (1.0 / (steps + 1.0))


def half_life_warmup(step: int, beta_start: float, beta_end: float, num_warmup_steps: int | None) -> float:
    """``beta_end`` reached by interpolating linearly *in half-life* from ``beta_start`` over the warm-up.

    ``None`` warm-up (or ``step >= num_warmup_steps``) gives ``beta_end``.
    """
    if num_warmup_steps is None or step >= num_warmup_steps:
        return beta_end
    a = step / num_warmup_steps
    return inverse_half_life_beta((1.0 - a) * half_life_steps(beta_start) + a * half_life_steps(beta_end))


def linear_warmup(step: int, value: float, num_warmup_steps: int | None, start: float = 0.0) -> float:
    """``(1 - a)*start + a*value`` with ``a = step/N`` while ``step < N``, ``value`` after (or always, when ``N``
    is None). The default ``start=0`` gives ``(step/N) * value``.
    """
    if num_warmup_steps is None or step >= num_warmup_steps:
        return value
    a = step / num_warmup_steps
    return (1.0 - a) * start + a * value
