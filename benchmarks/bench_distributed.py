"""Distributed optimizer steps on real processes: step time and bytes sent per rank, DDP vs FSDP2, Muon vs AdamW.

For each world size (``--worlds``, default 1 2 4) the script spawns that many CPU processes (gloo over
loopback, one thread each) and trains a GPT-like model (``emopt``'s ``CharTransformer``: ``--layers`` pre-norm
blocks of width ``--d-model`` with fused QKV and a 4x MLP, a 256-token vocabulary, context 64, untied head) on
random tokens, 4 sequences per rank, with each of:

* ``ddp+muon``          DDP + ``MuonAdamW(matrix_optimizer="muon")``, no process_group: every rank runs every NS;
* ``ddp+muon pg``       the same with ``process_group=WORLD``: each rank its own matrices, one all-gather;
* ``ddp+muon pg bf16``  ... and ``gather_dtype=torch.bfloat16``;
* ``zero+muon``         no DDP wrapper: ``MuonAdamW(..., process_group=WORLD, reduce_gradients=True)`` (the
                        zero-extra-bytes recipe: reduce-scatter of matrix grads, all-gather of updates, all-reduce of
                        the AdamW side's grads, all counted as the optimizer's bytes);
* ``fsdp2+muon``        FSDP2 (``fully_shard`` per block, then the root) + ``MuonAdamW(matrix_optimizer="muon")``;
* ``fsdp2+adamw``       FSDP2 + ``eo.AdamW`` (local shards, no optimizer communication);
* ``ddp+adamw``         DDP + ``eo.AdamW``.

("muon" variants: Muon on the hidden matrices, AdamW on embeddings, head, norms and biases, as one trains.)

All variants of a world live in the same processes: each is built and warmed up (``--warmup`` steps), then
``--steps`` rounds run one step of every variant in turn, so load on a shared machine hits them alike.

Columns, per rank and step: ``opt ms``: ``optimizer.step()`` (ranks aligned by a barrier first; the slowest
rank's time; median over the measured steps); ``fwd+bwd ms``: forward + backward (with the
gradient sync), same statistic; ``opt MB``: bytes the optimizer's own collectives sent (``COMM_STATS``, mean over
ranks); ``sync MB``: gradient synchronisation, ring model: DDP counts each bucket in a comm hook (``2 (W-1)/W``
of its bytes, then the usual all-reduce); FSDP2 is computed from the parameter bytes (dim-0 shards padded to
``ceil(rows / W)``): an all-gather (``(W-1)/W``) in forward, a second one in backward for the blocks (the root
keeps its parameters unsharded after forward, FSDP2's default) and a reduce-scatter (``(W-1)/W``) of the
gradients. The FSDP2 figure is checked against the bytes of FSDP2's actual collectives (a warning if they
differ). MB = 1e6 bytes.

On a machine with fewer cores than ``W`` the ranks share cores: times then include the oversubscription (the
header prints the core count). Each variant is capped at ``--cap-s`` seconds of its own (build, warm-up and
steps): it stops measuring when its next step would pass the cap ("over cap" when the warm-up already does);
a world whose ranks have not finished by 60 s + the caps is killed and its rows reported as timed out.

    python benchmarks/bench_distributed.py                        # W = 1 2 4, 4 blocks of 256
    python benchmarks/bench_distributed.py --worlds 2 --steps 10 --d-model 512 --layers 6 --out dist.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import queue
import socket
import statistics
import time
import traceback
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import emerging_optimizers as eo
from emerging_optimizers.cli.models import CharTransformer
from emerging_optimizers.distributed import COMM_STATS

VARIANTS = ("ddp+muon", "ddp+muon pg", "ddp+muon pg bf16", "zero+muon", "fsdp2+muon", "fsdp2+adamw", "ddp+adamw")
VOCAB, CONTEXT, BATCH_PER_RANK = 256, 64, 4


def build(variant: str, args: argparse.Namespace, world: int) -> tuple[torch.nn.Module, Any, dict[str, float]]:
    """The wrapped model, its optimizer and a counter ``{"sync": bytes}`` that the DDP comm hook feeds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = CharTransformer(VOCAB, context=CONTEXT, dim=args.d_model, depth=args.layers)
    counter = {"sync": 0.0}
    if variant.startswith("fsdp2"):
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    elif variant.startswith("zero"):
        wrapped = model  # the optimizer averages the gradients itself
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)

        def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations
            buf = bucket.buffer()
            counter["sync"] += 2 * (world - 1) / world * buf.numel() * buf.element_size()
            return allreduce_hook(state, bucket)

        wrapped.register_comm_hook(dist.group.WORLD, counting_allreduce)
    if variant.endswith("adamw"):
        opt = eo.AdamW(model.parameters(), lr=1e-3)
    else:
        dist_kwargs: dict[str, Any] = {}
        if " pg" in variant or variant.startswith("zero"):
            dist_kwargs["process_group"] = dist.group.WORLD
        if variant.startswith("zero"):
            dist_kwargs["reduce_gradients"] = True
        if variant.endswith("bf16"):
            dist_kwargs["gather_dtype"] = torch.bfloat16
        opt = eo.MuonAdamW(model, matrix_optimizer="muon", **dist_kwargs)
    return wrapped, opt, counter


def fsdp2_sync_bytes(model: torch.nn.Module, world: int) -> float:
    """Per rank and step: all-gather (twice for the blocks) + reduce-scatter, ring model, padded dim-0 shards."""
    def padded_bytes(params: Any) -> int:
        return sum(math.ceil(p.shape[0] / world) * world * math.prod(p.shape[1:]) * p.element_size() for p in params)

    f = (world - 1) / world
    blocks = sum(padded_bytes(b.parameters()) for b in model.blocks)
    block_ids = {id(p) for b in model.blocks for p in b.parameters()}
    root = padded_bytes(p for p in model.parameters() if id(p) not in block_ids)
    return f * (3 * blocks + 2 * root)


class CollectiveCounter:
    """Counts the bytes of FSDP2's all_gather_single / reduce_scatter_single (ring model) while active."""

    def __init__(self, world: int) -> None:
        self.world, self.bytes, self._saved = world, 0.0, {}

    def __enter__(self) -> CollectiveCounter:
        for name in ("all_gather_single", "reduce_scatter_single"):
            orig = self._saved[name] = getattr(dist, name)

            def wrapped(*a: Any, _orig: Any = orig, _name: str = name, **k: Any) -> Any:
                full = (a[0] if a else k["output"]) if _name == "all_gather_single" else (a[1] if len(a) > 1
                                                                                           else k["input"])
                self.bytes += (self.world - 1) / self.world * full.numel() * full.element_size()
                return _orig(*a, **k)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, orig in self._saved.items():
            setattr(dist, name, orig)


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


class Bench:
    """One variant on this rank: model, optimizer, this rank's batch, the time it has used, its measurements."""

    def __init__(self, variant: str, args: argparse.Namespace, rank: int, world: int) -> None:
        started = time.perf_counter()
        self.variant, self.world = variant, world
        self.model, self.opt, self.counter = build(variant, args, world)
        tokens = torch.randint(0, VOCAB, (BATCH_PER_RANK, CONTEXT + 1), generator=torch.Generator().manual_seed(rank))
        self.x, self.y = tokens[:, :-1], tokens[:, 1:]
        self.times: list[tuple[float, float]] = []
        self.fsdp_bytes = self.opt_bytes = 0.0
        self.used = slowest(time.perf_counter() - started)  # seconds against the cap (build + every step)

    def step(self, measure: bool) -> float:
        """One training step; returns its wall time (the slowest rank's)."""
        COMM_STATS.reset()
        with CollectiveCounter(self.world) as fsdp_counter:
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(self.x).flatten(0, 1), self.y.flatten()).backward()
            t1 = time.perf_counter()
            dist.barrier()  # every rank starts the optimizer step together
            t2 = time.perf_counter()
            self.opt.step()
            t3 = time.perf_counter()
        t_opt, t_fb = slowest(t3 - t2), slowest(t1 - t0)
        if measure:
            self.times.append((t_opt, t_fb))
            self.opt_bytes += COMM_STATS.total()
            self.fsdp_bytes += fsdp_counter.bytes
        else:
            self.counter["sync"] = 0.0
        self.used += t_opt + t_fb
        return t_opt + t_fb

    def row(self, warm: float) -> dict[str, Any]:
        n = len(self.times)
        if n == 0:
            return {"variant": self.variant, "world": self.world, "over_cap": True, "warm_s": warm}
        opt_bytes = torch.tensor([self.opt_bytes / n], dtype=torch.float64)
        dist.all_reduce(opt_bytes)
        if self.variant.startswith("fsdp2"):
            sync, measured = fsdp2_sync_bytes(self.model, self.world), self.fsdp_bytes / n
        else:
            sync = measured = self.counter["sync"] / n
        return {"variant": self.variant, "world": self.world, "over_cap": False, "steps": n,
                "opt_ms": 1e3 * statistics.median(t for t, _ in self.times),
                "fb_ms": 1e3 * statistics.median(t for _, t in self.times),
                "opt_bytes": float(opt_bytes) / self.world, "sync_bytes": sync, "sync_measured": measured}


def run_all(args: argparse.Namespace, rank: int, world: int) -> list[dict[str, Any]]:
    """Every variant built, warmed up, then ``--steps`` rounds of one step each (interleaved: load on a shared
    machine hits them alike). A variant stops when its next step would pass ``--cap-s``; every decision uses
    times reduced over the ranks, so all ranks take it alike."""
    benches, warm = [], {}
    for v in args.variants:
        benches.append(b := Bench(v, args, rank, world))
        warm[v] = max(b.step(measure=False) for _ in range(args.warmup))
        if rank == 0:
            print(f"  W={world} {v:<17} built, warm-up step {warm[v]:.2f} s", flush=True)
    for _ in range(args.steps):
        for b in benches:
            if b.used + warm[b.variant] <= args.cap_s:
                b.step(measure=True)
    return [b.row(warm[b.variant]) for b in benches]


def worker(rank: int, world: int, port: int, results: Any, args: argparse.Namespace) -> None:
    try:
        torch.set_num_threads(1)
        # torch >= 2.10 deprecates all_gather_into_tensor (the library's all-gather): once per rank is enough noise
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        for row in run_all(args, rank, world):
            if rank == 0:
                results.put(row)
    except Exception:
        results.put({"error": f"rank {rank} of {world}:\n{traceback.format_exc()}"})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_world(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Spawn ``world`` ranks; rows as they arrive (progress lines), the ranks killed at the time limit."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, results, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 60 + args.cap_s * len(args.variants)  # start-up, then the variants' caps
    rows: list[dict[str, Any]] = []
    try:
        while len(rows) < len(args.variants) and time.monotonic() < deadline:
            try:
                row = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if "error" in row:
                print(row["error"], flush=True)
                break
            rows.append(row)
            what = (f"over cap (warm-up step {row['warm_s']:.1f} s)" if row["over_cap"] else
                    f"opt {row['opt_ms']:.1f} ms, fwd+bwd {row['fb_ms']:.1f} ms ({row['steps']} steps)")
            print(f"  W={world} {row['variant']:<17} {what}", flush=True)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    done = {r["variant"] for r in rows}
    rows += [{"variant": v, "world": world, "missing": True} for v in args.variants if v not in done]
    return rows


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return platform.processor() or "?"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| variant | W | steps | opt ms | fwd+bwd ms | opt MB/step | sync MB/step | total MB/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (VARIANTS.index(r["variant"]), r["world"])):
        head = f"| {r['variant']} | {r['world']} |"
        if r.get("missing"):
            lines.append(head + " | failed or timed out | | | | |")
        elif r["over_cap"]:
            lines.append(head + f" 0 | over cap (warm-up step {r['warm_s']:.1f} s) | | | | |")
        else:
            ob, sb = r["opt_bytes"] / 1e6, r["sync_bytes"] / 1e6
            lines.append(head + f" {r['steps']} | {r['opt_ms']:.1f} | {r['fb_ms']:.1f} | {ob:.3f} | {sb:.3f} "
                                f"| {ob + sb:.3f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=7, help="measured steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per variant first (>= 1)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--cap-s", type=float, default=20.0, help="time cap per variant and world (seconds)")
    ap.add_argument("--out", metavar="FILE.md", help="also write the header and table here (Markdown)")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (its step time drives the cap)")

    n_params = sum(p.numel() for p in CharTransformer(VOCAB, context=CONTEXT, dim=args.d_model,
                                                      depth=args.layers).parameters())
    header = [f"CPU: {cpu_model()} ({os.cpu_count()} cores); 1 thread per rank; torch {torch.__version__}; gloo",
              f"model: {args.layers} blocks x d_model {args.d_model}, vocab {VOCAB}, context {CONTEXT} "
              f"({n_params / 1e6:.2f}M params, fp32); {BATCH_PER_RANK} sequences per rank; "
              f"median of {args.steps} steps after {args.warmup} warm-up"]
    print("\n".join(header), flush=True)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for world in args.worlds:
        print(f"W={world}: spawning {world} rank(s) ...", flush=True)
        rows += run_world(world, args)
    notes = [f"FSDP2 sync check: computed {r['sync_bytes']:.0f} B vs FSDP2's collectives {r['sync_measured']:.0f} B "
             f"({r['variant']}, W={r['world']})" for r in rows
             if not r.get("missing") and not r["over_cap"]
             and abs(r["sync_bytes"] - r["sync_measured"]) > 0.01 * max(r["sync_bytes"], 1.0)]
    out = header + [""] + table(rows) + ([""] + notes if notes else [])
    print("\n" + "\n".join(out) + f"\n\n(total {time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
