"""The reference library's names for the AdEMAMix warm-up schedules.

Thin wrappers over :mod:`emerging_optimizers.scalar_optimizers._schedulers` (plain Python floats), with the
reference's argument names and defaults.
"""

from __future__ import annotations

from emerging_optimizers.scalar_optimizers import _schedulers as _impl


def _half_life_steps(beta: float, eps: float = 1e-8) -> float:
    """``ln(0.5)/ln(beta + eps) - 1``: the steps after which an EMA with rate ``beta`` has halved a sample."""
    return _impl.half_life_steps(beta, eps)


def _inverse_half_life_beta(t: float) -> float:
    """``0.5**(1/(t + 1))``: the EMA rate whose half-life is ``t`` steps."""
    return _impl.inverse_half_life_beta(t)


def _linear_half_life_warmup_scheduler(step: int, beta_end: float, beta_start: float = 0,
                                       num_warmup_steps: int = 1) -> float:
    """``beta`` moving linearly *in half-life* from ``beta_start`` (step 0) to ``beta_end`` (step
    ``num_warmup_steps`` and after).
    """
    return _impl.half_life_warmup(step, beta_start, beta_end, num_warmup_steps)


def _linear_warmup_scheduler(step: int, alpha_end: float, alpha_start: float = 0, num_warmup_steps: int = 1) -> float:
    """``alpha`` moving linearly from ``alpha_start`` (step 0) to ``alpha_end`` (step ``num_warmup_steps`` and
    after).
    """
    return _impl.linear_warmup(step, alpha_end, num_warmup_steps, start=alpha_start)
