"""Train the ``emopt`` character LM (Shakespeare) with FSDP2 (or DDP) and ``MuonAdamW``.

Launch (CPU: gloo; with CUDA: nccl, one GPU per local rank)::

    torchrun --standalone --nproc-per-node 2 examples/fsdp2_charlm.py --steps 50
    torchrun --standalone --nproc-per-node 2 examples/fsdp2_charlm.py --steps 50 --ddp
    torchrun --standalone --nproc-per-node 2 examples/fsdp2_charlm.py --steps 50 --stop-at 25 --ckpt /tmp/charlm
    torchrun --standalone --nproc-per-node 2 examples/fsdp2_charlm.py --steps 50 --resume /tmp/charlm

FSDP2 (default): each transformer block, then the root, is ``fully_shard``-ed, so every parameter is a
DTensor sharded on dim 0. ``MuonAdamW(model)`` detects that by itself: each hidden matrix is assembled on one
owner rank, orthogonalized there and its update shards sent back; the AdamW side steps the local shards.
``--ddp``: DistributedDataParallel with ``MuonAdamW(model, process_group=WORLD)``; each rank orthogonalizes
the matrices it owns and one all-gather shares the updates.

Data, model and lr schedule are the ``charlm-shakespeare`` task's (``emopt compare``). Every rank draws the
same global batch (same sampler seed) and trains on its own slice of it. ``--ckpt DIR`` saves model and
optimizer at the end (or after ``--stop-at N`` steps) with torch.distributed.checkpoint; ``--resume DIR``
loads them and continues up to ``--steps``: the last two commands train exactly like the first (the lr
schedule always spans ``--steps``, so keep it the same when resuming).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import emerging_optimizers as eo
from emerging_optimizers.cli.tasks import CharLMProblem, Schedule


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="total training steps (the schedule's length)")
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (windows), split over the ranks")
    ap.add_argument("--seq-len", type=int, default=64, help="context length (characters)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--ddp", action="store_true", help="DDP + MuonAdamW(process_group=WORLD) instead of FSDP2")
    ap.add_argument("--ckpt", metavar="DIR", help="save model + optimizer here at the end")
    ap.add_argument("--resume", metavar="DIR", help="load model + optimizer from here and continue")
    ap.add_argument("--stop-at", type=int, help="stop (and save with --ckpt) after this step, to --resume later")
    return ap.parse_args()


def save_checkpoint(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd, "step": torch.tensor(step)}, checkpoint_id=path)


def load_checkpoint(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    model_sd, optim_sd = get_state_dict(model, opt)  # the layout (shards) to load into
    state = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["step"])


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} ranks")
    log = print if rank == 0 else (lambda *a, **k: None)

    problem = CharLMProblem(args.batch_size, context=args.seq_len, dim=args.d_model, depth=args.layers,
                            num_heads=args.heads)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = problem.make_model().to(device)
    if args.ddp:
        model = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        opt = eo.MuonAdamW(model.module, process_group=dist.group.WORLD)
    else:
        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = eo.MuonAdamW(model)
    base_lrs = [g["lr"] for g in opt.param_groups]
    schedule = Schedule.for_steps(args.steps)

    start = load_checkpoint(args.resume, model, opt) if args.resume else 0
    gen = torch.Generator().manual_seed(args.seed)  # same seed on every rank: the same global batches
    for _ in range(start):  # resume: skip the batches already trained on
        problem.sample_batch(gen)
    log(f"{'DDP' if args.ddp else 'FSDP2'} on {world} ranks ({device.type}), "
        f"{sum(p.numel() for p in model.parameters()):,} params, "  # a DTensor's numel() is the global one
        f"steps {start}..{args.steps}")

    model.train()
    t0, logged = time.perf_counter(), start
    stop = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    for t in range(start, stop):
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * schedule(t)
        x, y = (b.chunk(world)[rank].to(device) for b in problem.sample_batch(gen))
        loss = problem.loss(model, (x, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (t + 1) % args.log_every == 0 or t + 1 == stop:
            loss = loss.detach()
            dist.all_reduce(loss)  # the mean over the ranks' slices: the global batch's loss
            ms = (time.perf_counter() - t0) * 1e3 / (t + 1 - logged)
            log(f"step {t + 1:5d}  train_loss {loss.item() / world:.4f}  {ms:.1f} ms/step", flush=True)
            t0, logged = time.perf_counter(), t + 1

    model.eval()
    with torch.no_grad():  # validation: each rank its slice of the fixed windows, then the weighted mean
        vx, vy = (v.chunk(world)[rank].to(device) for v in problem.val_batch)
        stats = torch.tensor([problem.loss(model, (vx, vy)).item() * len(vx), len(vx)], device=device)
        dist.all_reduce(stats)
    val_loss = (stats[0] / stats[1]).item()
    log(f"val_loss {val_loss:.4f}" + ("" if math.isfinite(val_loss) else "  (not finite!)"), flush=True)

    if args.ckpt:
        save_checkpoint(args.ckpt, model, opt, max(start, stop))
        log(f"saved checkpoint to {args.ckpt} (step {max(start, stop)})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
