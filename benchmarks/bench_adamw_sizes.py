"""Our AdamW against torch's fused AdamW at 0.1M, 0.5M, 4M and 27M parameters (GPT-like sets), interleaved.

Variants: ``torch`` (``torch.optim.AdamW(fused=True)``), ``eo`` (``emerging_optimizers.AdamW`` defaults: torch's
fused kernel where it computes our update, plus the non-finite gradient check), ``eo_off`` (the same with
``nonfinite="off"``), ``eo_eager`` (``fused=False, nonfinite="off"``: our plain kernel, the reference path).
One thread; every round times 3 steps of each variant in turn; median of 7 rounds. Prints the CPU.

    python benchmarks/bench_adamw_sizes.py
"""

from __future__ import annotations

import statistics
import time

import torch

import emerging_optimizers as eo
from emerging_optimizers.cli.bench import cpu_description, gpt_like_model

SIZES = [(1, 64, 256), (2, 128, 256), (4, 256, 2048), (6, 512, 8192)]  # (layers, d_model, vocab)


def make(kind: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for q in copies:
        q.grad = torch.randn_like(q)
    if kind == "torch":
        return torch.optim.AdamW(copies, lr=1e-3, fused=True)
    if kind == "eo":
        return eo.AdamW(copies, lr=1e-3)
    if kind == "eo_off":
        return eo.AdamW(copies, lr=1e-3, nonfinite="off")
    return eo.AdamW(copies, lr=1e-3, nonfinite="off", fused=False)


def main() -> None:
    torch.set_num_threads(1)
    print(cpu_description(), flush=True)
    print("| params | torch fused ms | eo (default) | eo nonfinite=off | eo eager (fused=False) |")
    print("|---:|---:|---:|---:|---:|")
    for layers, dim, vocab in SIZES:
        params = list(gpt_like_model(layers, dim, vocab).parameters())
        opts = {k: make(k, params) for k in ("torch", "eo", "eo_off", "eo_eager")}
        for opt in opts.values():  # state allocation
            opt.step()
        times: dict[str, list[float]] = {k: [] for k in opts}
        for _ in range(7):
            for kind, opt in opts.items():
                start = time.perf_counter()
                for _ in range(3):
                    opt.step()
                times[kind].append((time.perf_counter() - start) / 3 * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        n = sum(p.numel() for p in params)
        cells = [f"{med[k]:.2f} ({med[k] / med['torch']:.2f}x)" for k in ("eo", "eo_off", "eo_eager")]
        print(f"| {n / 1e6:.2f}M | {med['torch']:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
