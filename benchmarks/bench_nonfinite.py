"""What the non-finite gradient check costs: each optimizer's step with ``nonfinite="skip"`` (the default,
one fused check per step) against ``nonfinite="off"`` (no check), on the same parameters, interleaved.

Sets (GPT-2-style, ``_gpt_params.gpt_like_shapes``): ``small`` (2 blocks, d_model 128, vocab 65, context 64:
about the char-LM of ``emopt``) and ``large`` (6 blocks, d_model 512, vocab 8192: 23.6M params). One CPU
thread; median over rounds; the ratio is skip / off.

Usage: ``python benchmarks/bench_nonfinite.py [--set small|large|both] [--rounds 15]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _gpt_params import gpt_like_shapes, make_params

import emerging_optimizers as eo
from emerging_optimizers.cli.report import environment

SETS = {"small": dict(n_blocks=2, d_model=128, vocab=65, context=64),
        "large": dict(n_blocks=6, d_model=512, vocab=8192, context=1024)}

OPTIMIZERS = {
    "adamw": lambda ps, nf: eo.AdamW(ps, lr=1e-3, nonfinite=nf),
    "lion": lambda ps, nf: eo.Lion(ps, lr=1e-4, nonfinite=nf),
    "muon_adamw": lambda ps, nf: eo.MuonAdamW(ps, lr=5e-3, nonfinite=nf),
}


def run(set_name: str, rounds: int) -> None:
    shapes = gpt_like_shapes(**SETS[set_name])
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    print(f"\nset {set_name}: {numel / 1e6:.2f}M params in {len(shapes)} tensors")
    print(f"{'optimizer':<12} {'skip (ms)':>10} {'off (ms)':>10} {'skip/off':>9}")
    for name, make in OPTIMIZERS.items():
        opts = {}
        for nf in ("skip", "off"):
            params = make_params(shapes)
            named = [(n, p) for (n, _), p in zip(shapes, params)]
            opts[nf] = make(named, nf)
        times: dict[str, list[float]] = {"skip": [], "off": []}
        for r in range(rounds + 2):
            for nf in ("skip", "off"):
                t0 = time.perf_counter()
                opts[nf].step()
                if r >= 2:  # two warm-up rounds
                    times[nf].append(time.perf_counter() - t0)
        med = {nf: statistics.median(v) * 1e3 for nf, v in times.items()}
        print(f"{name:<12} {med['skip']:>10.3f} {med['off']:>10.3f} {med['skip'] / med['off']:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=["small", "large", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU: {environment(1)['cpu']}; torch {torch.__version__}; 1 thread")
    for set_name in (["small", "large"] if args.set == "both" else [args.set]):
        run(set_name, args.rounds)


if __name__ == "__main__":
    main()
