"""Plumbing shared by the manifold optimizers: validation of groups and params, and the state dtype."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from emerging_optimizers.base import EmergingOptimizer, NonfiniteT, ParamsT
from emerging_optimizers.utils import check_matrix

__all__ = ["ManifoldOptimizer", "state_dtype"]


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype the manifold optimizers keep state and compute in: float64 for float64 params, else float32.

    A retraction in bf16/fp16 would leave the manifold by the format's rounding (~4e-3 for bf16) every step,
    so low-precision params are updated in float32 and rounded into the parameter once per step.
    """
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class ManifoldOptimizer(EmergingOptimizer):
    """Validates every group's hyperparameters and params when the group is added (constructor included).

    Subclasses implement ``_validate_group(group)``; ``_validate_param(p, group)`` accepts floating-point 2-D
    params unless overridden (the error ends with :attr:`param_hint`).
    """

    matrix_only = True
    #: Usable as MuonAdamW's matrix side (which passes ``momentum``/``weight_decay`` only to those that take them).
    matrix_optimizer_ok = True
    #: Appended to the error for a parameter of the wrong shape.
    param_hint: ClassVar[str] = ""

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, nonfinite: NonfiniteT = "skip") -> None:
        self._validate_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _validate_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        check_matrix(p, type(self).__name__, hint=self.param_hint)
