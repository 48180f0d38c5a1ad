"""Time one optimizer step of every scalar optimizer against torch.optim.AdamW (fused and foreach).

One process, one thread, interleaved rounds (each round times every optimizer once, so load on this
shared machine hits all of them alike); prints the median ms/step and the ratio to torch's fused AdamW,
which is the single-pass floor for Adam-type state. Sign/one-moment optimizers touch fewer bytes, so for
them the fused AdamW time is an upper bound of their floor.

    python benchmarks/bench_scalar.py                # 23.6M-parameter GPT-like set
    python benchmarks/bench_scalar.py --rounds 5 --blocks 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpt_params import gpt_like_shapes, make_params

import emerging_optimizers as eo

OURS = ["adamw", "ademamix", "sim_ademamix", "laprop", "lion", "signum", "rmsprop", "madam"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eager", action="store_true", help="also time our eager (fused=False) steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = gpt_like_shapes(args.blocks, args.d_model)
    n = sum(torch.Size(s).numel() for _, s in shapes)
    from emerging_optimizers.cli.bench import cpu_description

    print(cpu_description())
    print(f"GPT-like set: {len(shapes)} tensors, {n / 1e6:.1f}M fp32 params, {args.threads} thread(s); ours with "
          "fused=True and the default non-finite check (nonfinite='skip')")

    candidates: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    }
    for name in OURS:
        cls = eo.get_optimizer_cls(name)
        candidates[name] = lambda ps, cls=cls: cls(ps, fused=True)
        if args.eager:
            candidates[f"{name} (eager)"] = lambda ps, cls=cls: cls(ps, fused=False)

    opts, first = {}, {}
    for label, make in candidates.items():
        opt = make(make_params(shapes))
        t0 = time.perf_counter()
        opt.step()  # the first step allocates state and, for ours, compiles
        first[label] = time.perf_counter() - t0
        opts[label] = opt
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(args.rounds):
        for label, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[label].append(time.perf_counter() - t0)

    base = statistics.median(times["torch AdamW fused"])
    print(f"\n{'optimizer':<26}{'ms/step':>10}{'x fused AdamW':>15}{'first step s':>14}")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:<26}{med * 1e3:>10.1f}{med / base:>15.2f}{first[label]:>14.2f}")


if __name__ == "__main__":
    main()
