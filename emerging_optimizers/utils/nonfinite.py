"""Detecting non-finite gradients cheaply: one fused reduction per device and dtype, one host sync per step.

:func:`nonfinite_flag` is the check :class:`~emerging_optimizers.base.EmergingOptimizer` runs before every
step (its ``nonfinite`` policy); :func:`nonfinite_counts` is the slow, per-tensor report made only once a
step is known to be bad (to name the parameters).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["NONFINITE_POLICIES", "NonfiniteT", "NonFiniteGradientError", "nonfinite_counts", "nonfinite_flag",
           "all_ranks_agree", "several_ranks"]

NonfiniteT = Literal["skip", "raise", "off"]
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "raise", "off")


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf and the optimizer's ``nonfinite`` policy is ``"raise"`` (nothing changed)."""


def nonfinite_flag(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-d float32 tensor: 1 if some element of ``tensors`` *may* be NaN or +-Inf, else 0 (no host sync).

    A reduction per tensor into which NaN and Inf propagate, so 0 is exact ("all finite"): on CPU each tensor's
    sum (in float32, float64 for float64 tensors), elsewhere one fused ``torch._foreach_norm`` (the 2-norm) per
    (device, dtype), a single multi-tensor kernel on CUDA. A 1 can also come from finite values whose sum or
    squares overflow (a float32 norm above ~1e19, a sum above ~3e38); callers confirm a 1 with
    :func:`nonfinite_counts` (rare, so its syncs do not matter). On CPU the sums are measured 9-21% faster than
    ``_foreach_norm`` (which runs one norm per tensor there): 147 vs 174 us for 1M elements in 52 tensors,
    3.2 vs 4.1 ms for 24.7M in 76 (one thread, AMD EPYC); the 2-norm was measured 14x faster than the
    infinity norm. Empty tensors are skipped. The result lives on the first tensor's device (CPU when there
    is none).
    """
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        if t.numel():
            by_kind[(t.device, t.dtype)].append(t)
    if not by_kind:
        device = tensors[0].device if tensors else torch.device("cpu")
        return torch.zeros((), dtype=torch.float32, device=device)
    flags = []
    for (device, dtype), ts in by_kind.items():
        if device.type == "cpu":
            acc = torch.promote_types(dtype, torch.float32)  # float64 stays float64; half types sum in float32
            reduced = [t.sum(dtype=acc) for t in ts]
        else:
            reduced = list(torch._foreach_norm(ts))
        flags.append(torch.stack(reduced).isfinite().logical_not().any())
    first = flags[0].device
    flag = flags[0] if len(flags) == 1 else torch.stack([f.to(first) for f in flags]).any()
    return flag.to(torch.float32)


def several_ranks(group: object | None = None) -> bool:
    """Whether torch.distributed is running with more than one rank in ``group`` (the default group when None)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1  # type: ignore[arg-type]


def all_ranks_agree(flag: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """``flag`` max-reduced over ``group`` (the default group when None) when torch.distributed is running.

    Every rank then takes the same decision (under FSDP each rank sees only its shards of the gradients).
    Outside a multi-process run the flag is returned as is.
    """
    import torch.distributed as dist

    if not several_ranks(group):
        return flag
    if dist.get_backend(group) == "nccl" and flag.device.type != "cuda":  # type: ignore[arg-type]
        flag = flag.to(torch.device("cuda", torch.cuda.current_device()))
    flag = flag.clone()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)  # type: ignore[arg-type]
    return flag


def nonfinite_counts(t: torch.Tensor) -> tuple[int, int, int]:
    """``(nan, +inf, -inf)`` element counts of ``t`` (host syncs: for error messages only)."""
    return (int(torch.isnan(t).sum()), int(torch.isposinf(t).sum()), int(torch.isneginf(t).sum()))
