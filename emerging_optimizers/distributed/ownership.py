"""Who orthogonalizes which matrix: a Newton-Schulz cost model and a FLOP-balanced owner assignment.

Pure Python (no torch.distributed): every rank runs the same deterministic assignment on the same list of
shapes, so ranks agree on owners without communicating.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

__all__ = ["MAX_GATHER_PADDING", "assign_owners", "matrix_ns_flops", "rank_loads", "shard_sizes"]


#: Largest share of padding an all-gather of unequal payloads accepts before the payloads are broadcast
#: exactly, one owner at a time (``comm.all_gather_owned``; the communication model uses the same rule).
MAX_GATHER_PADDING = 0.25


def matrix_ns_flops(m: int, n: int, steps: int = 5, batch: int = 1) -> float:
    """Floating-point operations of ``steps`` quintic Newton-Schulz iterations on ``batch`` ``m x n`` matrices.

    With ``s = min(m, n)``, ``l = max(m, n)`` one iteration is ``A = X X^T`` (``2 s^2 l``), ``B = bA + cA^2``
    (``2 s^3``) and ``X <- aX + BX`` (``2 s^2 l``): ``4 s^2 l + 2 s^3`` (element-wise terms ignored).
    """
    short, long = min(m, n), max(m, n)
    return float(batch * steps * (4 * short * short * long + 2 * short**3))


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each job: longest job first to the least-loaded rank (ties: the lower rank).

    Greedy LPT scheduling: the busiest rank ends within the largest job of the mean load (and within 4/3 of
    the optimum), and the result depends only on ``costs`` and ``world`` (every rank computes the same).
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}.")
    owners = [0] * len(costs)
    heap = [(0.0, r) for r in range(world)]
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + float(costs[i]), rank))
    return owners


def rank_loads(costs: Sequence[float], owners: Sequence[int], world: int) -> list[float]:
    """Total cost per rank for an assignment."""
    loads = [0.0] * world
    for c, r in zip(costs, owners):
        loads[r] += c
    return loads


def shard_sizes(size: int, parts: int) -> list[int]:
    """Lengths of ``torch.chunk(size, parts)`` padded with zeros to ``parts`` (DTensor's ``Shard`` layout)."""
    chunk = math.ceil(size / parts) if parts else 0
    return [max(0, min(chunk, size - r * chunk)) for r in range(parts)]
