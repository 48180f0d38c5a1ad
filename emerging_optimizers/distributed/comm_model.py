"""A per-step communication and Newton-Schulz (NS) compute model of distributed Muon designs.

Pure arithmetic on matrix shapes: nothing is run or measured. Conventions, shared by every design:

* ``W`` ranks in the data-parallel group, ``f = (W - 1) / W``. Bytes are *sent per rank per step*.
  Ring collectives on ``S`` bytes: all-reduce ``2 f S``, reduce-scatter / all-gather ``f S`` (``S`` = the
  full, gathered size). All-to-all: a rank sends exactly the bytes destined to other ranks.
* ``M`` = elements of the Muon matrices, ``O`` = other elements (embeddings, head, norms), ``P = M + O``.
  Gradients and parameters are fp32 (4 bytes) unless a design's own dtype is stated.
* ``bytes_grad_sync``: traffic outside the optimizer's matrix path: DDP's all-reduce of all grads
  (``2 f P 4``), FSDP2's own all-gather of params + reduce-scatter of grads (``f (Mpad + O) 4`` each, ``Mpad``
  = matrices with dim-0 shards padded to ``ceil(m / W)`` rows; ``O`` unpadded; ``reshard_after_forward=False``,
  the default ``True`` adds a second all-gather), or, where the optimizer owns the matrices' sync, the
  all-reduce (or ZeRO-1 RS + AG, the same bytes) of the ``O`` non-matrix elements (``2 f O 4``).
* ``bytes_per_rank``: collectives the design issues for the matrices (mean over ranks; ``bytes_max_rank`` the
  busiest sender). ``bytes_extra`` = total minus plain data parallelism (``2 f P 4``, which DDP and ZeRO/FSDP
  with one all-gather both pay).
* NS cost of an ``m x n`` matrix: ``ownership.matrix_ns_flops`` (5 steps). Per-rank loads count every NS a
  rank executes, zero-padding matrices and duplicates included. ``imbalance`` = max / mean of those loads,
  ``ns_redundancy`` = executed / one copy of all NS, ``ns_speedup`` = one copy / busiest rank (ideal ``W``),
  ``ns_seconds`` = busiest rank / ``flops_per_s``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from emerging_optimizers.distributed.ownership import (
    MAX_GATHER_PADDING,
    assign_owners,
    matrix_ns_flops,
    rank_loads,
    shard_sizes,
)

__all__ = ["DESIGNS", "design_costs", "gpt_shapes", "table"]

Shape = tuple[int, int]

DESIGNS: tuple[str, ...] = (
    "torch-muon",  # torch.optim.Muon under DDP: every rank runs every NS, nothing extra sent.
    "kj-muon",  # KellerJordan Muon: DDP AR; chunks of W over the list sorted by p.size() desc; AG fp32 params.
    "modded-nanogpt",  # RS bf16 grads + AG bf16 params per shape bank, N/W whole matrices per rank.
    "moonlight-zero1",  # ZeRO-1 flat partition: RS fp32, bf16 gather of overlapping matrices, AG fp32.
    "dion-ddp",  # DDP AR; per shape group N/W matrices per rank (N padded); AG bf16; N == 1 done redundantly.
    "dion-fsdp2",  # FSDP2 Shard(0); per shape group N padded to a multiple of W; 2x all_to_all bf16.
    "ours-ddp",  # DDP AR; LPT owners over NS FLOPs; one all_gather_into_tensor padded to the max payload.
    "ours-zero",  # no DDP AR for matrices: RS fp32 to owners + the same AG, both padded to the max payload.
    "ours-fsdp2",  # FSDP2 Shard(0); LPT owners; all_to_all shards -> owner (fp32), all_to_all updates back.
)


def gpt_shapes(d_model: int, n_layers: int, vocab: int, mlp_ratio: int = 4,
               tied: bool = False) -> tuple[list[Shape], int]:
    """``(matrix_shapes, other_numel)`` of a GPT: per layer q, k, v, o ``d x d``, fc ``r d x d``, proj ``d x r d``.

    Other: the ``vocab x d`` embedding, an untied ``vocab x d`` head unless ``tied``, and ``2 L + 1`` norm
    weights of ``d`` (no biases).
    """
    d, h = d_model, mlp_ratio * d_model
    shapes = [(d, d)] * 4 + [(h, d), (d, h)]
    other = vocab * d * (1 if tied else 2) + (2 * n_layers + 1) * d
    return shapes * n_layers, other


def _shape_groups(shapes: Sequence[Shape]) -> dict[Shape, int]:
    """Number of matrices per exact shape, in order of first appearance."""
    groups: dict[Shape, int] = {}
    for s in shapes:
        groups[s] = groups.get(s, 0) + 1
    return groups


def _owned(flops: list[float], shapes: Sequence[Shape], world: int) -> tuple[list[int], list[int]]:
    """LPT owners (``assign_owners`` over NS FLOPs) and elements owned per rank (the update payload)."""
    owners = assign_owners(flops, world)
    payload = [0] * world
    for (m, n), r in zip(shapes, owners):
        payload[r] += m * n
    return owners, payload


def design_costs(design: str, shapes: Sequence[Shape], other_numel: int, world: int, *, gather_bytes: int = 4,
                 flops_per_s: float = 400e12, ns_steps: int = 5) -> dict[str, float]:
    """Modeled bytes and NS FLOPs of one optimizer step of ``design`` (one of ``DESIGNS``) on ``world`` ranks.

    ``gather_bytes`` (4 fp32, 2 bf16) is the dtype of *our* designs' update gather/return; the public designs
    use their documented dtypes. Per design (``f = (W-1)/W``, ``b = gather_bytes``, ``Npad = ceil(N/W) W``):

    * torch-muon: sync ``2fP4``; optimizer 0; every rank runs all NS.
    * kj-muon: sync ``2fP4``; matrices sorted by shape descending, chunk ``k`` = entries ``kW .. kW+W-1``, rank
      ``r`` runs NS of entry ``r``; per chunk an all-gather of fp32 params, ``f * 4 * sum(numel)`` over the W
      entries, missing entries of the last chunk padded with the smallest matrix (``empty_like(params[-1])``).
    * modded-nanogpt: sync ``2fO4``; per shape group RS bf16 + AG bf16, ``2 * f * Npad*m*n * 2``; each rank
      runs ``Npad/W`` NS. The real code requires ``N % W == 0``; ``padded_matrices > 0`` flags a W it rejects.
    * moonlight-zero1: sync ``2fO4``; RS + AG fp32 of the matrices (``2fM4``, flat-buffer padding ignored);
      matrices laid out contiguously in list order, partition ``ceil(M/W)`` elements; every rank overlapping a
      matrix runs its NS and sends its slice (bf16) to each of the other ``k - 1`` overlapping ranks.
    * dion-ddp: sync ``2fP4``; per shape group with ``N > 1``: ``Npad/W`` NS per rank, AG bf16
      ``f * Npad*m*n * 2``; a group with ``N == 1`` is run on every rank without communication.
    * dion-fsdp2: FSDP2 sync; per shape group two all_to_all bf16 of the padded local shards,
      ``2 * f * Npad*ceil(m/W)*n * 2``; ``Npad/W`` NS per rank (zero matrices included).
    * ours-ddp: sync ``2fP4``; LPT owners; one all_gather_into_tensor padded to the largest payload,
      ``f * W * max_r(payload_r) * b``, or, when that padding exceeds 25% of the payload (as many ranks as
      matrices), one pipelined broadcast per owner of its exact payload, ``f * sum_r(payload_r) * b``.
    * ours-zero: sync ``2fO4``; RS fp32 of the matrix grads with the same padding (``f W max_r payload_r 4``)
      + the ours-ddp all-gather.
    * ours-fsdp2: FSDP2 sync; LPT owners; all_to_all #1 sends each rank's ``torch.chunk`` dim-0 shard of
      every matrix it does not own to the owner (fp32, unpadded splits); all_to_all #2 sends the owner's
      update shards back (``b``). Mean ~ ``f (M/W) (4 + b)``; the owner of a large matrix sends most.
    """
    w = world
    if w < 1:
        raise ValueError(f"world must be >= 1, got {w}.")
    f = (w - 1) / w
    mats = sum(m * n for m, n in shapes)
    total = mats + other_numel
    flops = [matrix_ns_flops(m, n, ns_steps) for m, n in shapes]
    ddp_sync = 2 * f * total * 4
    others_sync = 2 * f * other_numel * 4
    fsdp_sync = 2 * f * (w * sum(math.ceil(m / w) * n for m, n in shapes) + other_numel) * 4
    sent = [0.0] * w  # optimizer bytes sent by each rank
    loads = [0.0] * w  # NS FLOPs executed by each rank
    padded = 0

    if design == "torch-muon":
        sync, loads = ddp_sync, [sum(flops)] * w
    elif design == "kj-muon":
        sync = ddp_sync
        order = sorted(range(len(shapes)), key=lambda i: shapes[i], reverse=True)
        smallest = shapes[order[-1]][0] * shapes[order[-1]][1] if order else 0
        for base in range(0, len(order), w):
            chunk = order[base:base + w]
            numel = sum(shapes[i][0] * shapes[i][1] for i in chunk) + smallest * (w - len(chunk))
            sent = [s + f * numel * 4 for s in sent]
            for r, i in enumerate(chunk):
                loads[r] += flops[i]
    elif design in ("modded-nanogpt", "dion-ddp", "dion-fsdp2"):
        sync = {"modded-nanogpt": others_sync, "dion-ddp": ddp_sync, "dion-fsdp2": fsdp_sync}[design]
        for (m, n), count in _shape_groups(shapes).items():
            cost = matrix_ns_flops(m, n, ns_steps)
            if design == "dion-ddp" and count == 1:
                loads = [x + cost for x in loads]
                continue
            npad = math.ceil(count / w) * w
            padded += npad - count
            if design == "dion-fsdp2":
                nbytes = 2 * f * npad * math.ceil(m / w) * n * 2
            else:
                nbytes = (2 if design == "modded-nanogpt" else 1) * f * npad * m * n * 2
            sent = [s + nbytes for s in sent]
            loads = [x + npad // w * cost for x in loads]
    elif design == "moonlight-zero1":
        sync = others_sync
        sent = [2 * f * mats * 4] * w
        part, offset = max(1, math.ceil(mats / w)), 0
        for (m, n), cost in zip(shapes, flops):
            lo, hi = offset, offset + m * n
            ranks = range(lo // part, (hi - 1) // part + 1)
            for r in ranks:
                sent[r] += (min(hi, (r + 1) * part) - max(lo, r * part)) * (len(ranks) - 1) * 2
                loads[r] += cost
            offset = hi
    elif design in ("ours-ddp", "ours-zero"):
        sync = ddp_sync if design == "ours-ddp" else others_sync
        owners, payload = _owned(flops, shapes, w)
        per_byte = gather_bytes + (4 if design == "ours-zero" else 0)
        # all_gather_owned: padded all-gather, or per-owner broadcasts of exact payloads when padding > 25%
        padded_ok = w * max(payload) <= (1 + MAX_GATHER_PADDING) * sum(payload)
        sent = [f * (w * max(payload) if padded_ok else sum(payload)) * per_byte] * w
        loads = rank_loads(flops, owners, w)
    elif design == "ours-fsdp2":
        sync = fsdp_sync
        owners, _ = _owned(flops, shapes, w)
        for (m, n), owner in zip(shapes, owners):
            rows = shard_sizes(m, w)
            for r in range(w):
                if r != owner:
                    sent[r] += rows[r] * n * 4
            sent[owner] += (m - rows[owner]) * n * gather_bytes
        loads = rank_loads(flops, owners, w)
    else:
        raise ValueError(f"unknown design {design!r}; expected one of {DESIGNS}.")

    mean_bytes = sum(sent) / w
    one_copy, busiest, executed = sum(flops), max(loads), sum(loads)
    mean_load = executed / w
    return {
        "bytes_per_rank": mean_bytes,
        "bytes_max_rank": max(sent),
        "bytes_grad_sync": sync,
        "bytes_total": mean_bytes + sync,
        "bytes_extra": mean_bytes + sync - ddp_sync,
        "ns_flops_max_rank": busiest,
        "ns_flops_mean": mean_load,
        "imbalance": busiest / mean_load if mean_load else 1.0,
        "ns_redundancy": executed / one_copy if one_copy else 1.0,
        "ns_speedup": one_copy / busiest if busiest else 1.0,
        "ns_seconds": busiest / flops_per_s,
        "padded_matrices": float(padded),
    }


def table(shapes: Sequence[Shape], other_numel: int, worlds: Iterable[int], designs: Sequence[str] = DESIGNS, *,
          gather_bytes: int = 4, flops_per_s: float = 400e12) -> list[dict[str, float | int | str]]:
    """One row per ``(world, design)``: ``{"world", "design", **design_costs(...)}``, worlds outermost."""
    rows: list[dict[str, float | int | str]] = []
    for w in worlds:
        for d in designs:
            costs = design_costs(d, shapes, other_numel, w, gather_bytes=gather_bytes, flops_per_s=flops_per_s)
            rows.append({"world": w, "design": d, **costs})
    return rows
