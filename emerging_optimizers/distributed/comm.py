"""The few collectives the optimizers run, on torch.distributed, and the DTensor facts they need.

Everything here is a thin layer over ``torch.distributed`` (``all_gather_into_tensor``,
``all_to_all_single``) that packs many tensors into one flat buffer per dtype, so a step costs one
collective per dtype, not one per matrix. :data:`COMM_STATS` counts the bytes each rank sends (for the
benchmarks; counting is a few integer additions).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from emerging_optimizers.distributed.ownership import MAX_GATHER_PADDING

__all__ = ["COMM_STATS", "CommStats", "all_gather_owned", "exchange", "is_dtensor", "local", "reduce_scatter_owned"]


@dataclass
class CommStats:
    """Bytes this rank sent (ring model: a collective over W ranks sends (W-1)/W of its buffer)."""

    bytes_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes_sent[kind] += int(nbytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()

    def total(self) -> int:
        return sum(self.bytes_sent.values())


#: Bytes sent by this process's optimizer collectives since the last ``COMM_STATS.reset()``.
COMM_STATS = CommStats()


#: Tensor types that are never DTensors: answered without attribute lookups (called per tensor, per step).
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel parameter or state)."""
    if type(t) in _PLAIN_TENSOR_TYPES:
        return False
    return hasattr(t, "_local_tensor") and hasattr(t, "placements") and hasattr(t, "device_mesh")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor (same storage: in-place ops reach it), else ``t``."""
    if type(t) in _PLAIN_TENSOR_TYPES:
        return t
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined, no-any-return]


def all_gather_owned(
    items: Sequence[tuple[int, torch.Tensor | None, torch.Size, torch.dtype]],
    group: Any,
    kind: str = "all_gather",
) -> list[torch.Tensor]:
    """Every rank gets every item; item ``i`` is ``(owner, tensor or None, shape, dtype)``, given by its owner.

    The owner passes the tensor, the others ``None`` (all ranks list the same items in the same order).
    Per dtype, one ``all_gather_into_tensor`` of a buffer padded to the largest rank's payload, or, when
    that padding would add more than :data:`MAX_GATHER_PADDING` (payloads far from equal: about as many
    ranks as matrices), one ``broadcast`` per owning rank of its exact payload. Returns fresh tensors
    (views of the received buffers) on every rank, the owner included, so all ranks hold bit-identical values.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    out: list[torch.Tensor | None] = [None] * len(items)
    by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
    for i, (_, _, _, dtype) in enumerate(items):
        by_dtype[dtype].append(i)
    for dtype, idx in by_dtype.items():
        device = next((t.device for _, t, _, _ in (items[i] for i in idx) if t is not None), None)
        sizes = [0] * world
        for i in idx:
            sizes[items[i][0]] += math.prod(items[i][2])
        length = max(sizes)
        if length == 0:
            continue
        if device is None:  # this rank owns nothing of this dtype: any tensor of the group tells the device
            device = _default_device(group)
        padded, starts, total = _layout(sizes)
        buf = torch.zeros(total, dtype=dtype, device=device)
        offset = starts[rank]
        for i in idx:  # this rank's payload, in item order
            owner, tensor, shape, _ = items[i]
            if owner == rank:
                assert tensor is not None
                n = math.prod(shape)
                buf[offset : offset + n].copy_(tensor.reshape(-1))
                offset += n
        if padded:
            _all_gather_flat(buf, buf[starts[rank] : starts[rank] + length].clone(), group)
            COMM_STATS.add(kind, (world - 1) * length * buf.element_size())
        else:
            for r in range(world):
                if sizes[r]:
                    dist.broadcast(buf[starts[r] : starts[r] + sizes[r]], _global_rank(group, r), group=group)
                    COMM_STATS.add("broadcast", sizes[r] * buf.element_size())
        offsets = list(starts)
        for i in idx:
            owner, _, shape, _ = items[i]
            n = math.prod(shape)
            out[i] = buf[offsets[owner] : offsets[owner] + n].view(shape)
            offsets[owner] += n
    return out  # type: ignore[return-value]


def reduce_scatter_owned(
    items: Sequence[tuple[int, torch.Tensor]], group: Any, kind: str = "reduce_scatter"
) -> list[torch.Tensor | None]:
    """The mean over ranks of every item's tensor, delivered to the item's owner only (``None`` elsewhere).

    Items are ``(owner, tensor)``, listed in the same order on every rank (the tensors: each rank's own
    gradients). Per dtype, one ``reduce_scatter_tensor`` of a buffer laid out by owner and padded to the
    largest payload, or, when padding would exceed :data:`MAX_GATHER_PADDING`, one ``reduce`` per owner.
    With :func:`all_gather_owned` of the results this moves the bytes of one all-reduce.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    out: list[torch.Tensor | None] = [None] * len(items)
    by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
    for i, (_, t) in enumerate(items):
        by_dtype[t.dtype].append(i)
    for dtype, idx in by_dtype.items():
        sizes = [0] * world
        for i in idx:
            sizes[items[i][0]] += items[i][1].numel()
        length = max(sizes)
        if length == 0:
            continue
        device = items[idx[0]][1].device
        padded, starts, total = _layout(sizes)
        buf = torch.zeros(total, dtype=dtype, device=device)
        offsets = list(starts)
        for i in idx:
            owner, t = items[i]
            buf[offsets[owner] : offsets[owner] + t.numel()].copy_(t.reshape(-1))
            offsets[owner] += t.numel()
        if padded:
            mine = torch.empty(length, dtype=dtype, device=device)
            _reduce_scatter_flat(mine, buf, group)
            COMM_STATS.add(kind, (world - 1) * length * buf.element_size())
        else:
            for r in range(world):
                if sizes[r]:
                    dist.reduce(buf[starts[r] : starts[r] + sizes[r]], _global_rank(group, r), group=group)
                    COMM_STATS.add("reduce", sizes[r] * buf.element_size())
            mine = buf[starts[rank] : starts[rank] + sizes[rank]]
        mine.div_(world)
        offset = 0
        for i in idx:
            owner, t = items[i]
            if owner == rank:
                out[i] = mine[offset : offset + t.numel()].view(t.shape)
                offset += t.numel()
    return out


def exchange(
    send: Sequence[Sequence[torch.Tensor]],
    recv: Sequence[Sequence[tuple[torch.Size, torch.dtype]]],
    group: Any,
    kind: str = "all_to_all",
) -> list[list[torch.Tensor]]:
    """All-to-all of lists of tensors: ``send[r]`` goes to rank ``r``; ``recv[r]`` describes what rank ``r`` sends us.

    One ``all_to_all_single`` per dtype (uneven splits allowed). Returns, per source rank, the received
    tensors in order, with the shapes of ``recv``.
    """
    dtypes = sorted({t.dtype for ts in send for t in ts} | {d for rs in recv for _, d in rs}, key=str)
    received: list[list[torch.Tensor | None]] = [[None] * len(rs) for rs in recv]
    device = next((t.device for ts in send for t in ts), None) or _default_device(group)
    for dtype in dtypes:
        parts = [[t for t in ts if t.dtype == dtype] for ts in send]
        in_splits = [sum(t.numel() for t in ps) for ps in parts]
        out_splits = [sum(math.prod(s) for s, d in rs if d == dtype) for rs in recv]
        flat = [t.reshape(-1) for ps in parts for t in ps]
        inp = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
        out = torch.empty(sum(out_splits), dtype=dtype, device=device)
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
        me = dist.get_rank(group)
        COMM_STATS.add(kind, (sum(in_splits) - in_splits[me]) * inp.element_size())
        offset = 0
        for r, rs in enumerate(recv):
            for j, (shape, d) in enumerate(rs):
                if d != dtype:
                    continue
                n = math.prod(shape)
                received[r][j] = out[offset : offset + n].view(shape)
                offset += n
    return received  # type: ignore[return-value]


def _layout(sizes: list[int]) -> tuple[bool, list[int], int]:
    """Where each rank's payload (``sizes[r]`` elements) sits in the flat buffer of a collective.

    ``(True, starts, total)``: padded to the largest payload (one all-gather / reduce-scatter), when that adds
    at most :data:`MAX_GATHER_PADDING`; ``(False, ...)``: packed exactly (one broadcast / reduce per owner).
    """
    world, length = len(sizes), max(sizes)
    if world * length <= (1 + MAX_GATHER_PADDING) * sum(sizes):
        return True, [r * length for r in range(world)], world * length
    return False, [sum(sizes[:r]) for r in range(world)], sum(sizes)


def _global_rank(group: Any, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    """``all_gather_single`` (newer torch's name) or ``all_gather_into_tensor`` (older torch)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _reduce_scatter_flat(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    """``reduce_scatter_single`` or, on older torch, ``reduce_scatter_tensor`` (a sum)."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)


def _default_device(group: Any) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
