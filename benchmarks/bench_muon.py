"""Muon step time on a GPT-like set of matrices, one CPU thread, variants interleaved.

Set: ``--blocks`` transformer blocks of width ``--d-model`` (default 6 x 512); per block q, k, v, o
(``d x d``; or one fused qkv ``3d x d`` with ``--fused-qkv``), mlp up ``4d x d`` and mlp down ``d x 4d``.

Variants, run in turn in every round (median over rounds):

* ``plain``: the plain reference, one matrix at a time: momentum EMA, float32 5-step quintic Newton-Schulz
  with three GEMMs per step (written here from the formulas), spectral scale, ``p -= lr * u``;
* ``muon``: ``emerging_optimizers.Muon`` (``ns_method="auto"``, shape-batched; float32 Newton-Schulz);
* ``muon_plain``: ``Muon(ns_method="plain")`` (batching only, no fast products; float32);
* ``muon_bf16``: ``Muon(ns_compute_dtype=torch.bfloat16)`` (the default on CPUs with bf16 matrix units);
* ``torch``: ``torch.optim.Muon`` (bf16 Newton-Schulz).

Usage: ``python benchmarks/bench_muon.py [--blocks 6] [--d-model 512] [--fused-qkv] [--rounds 7]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from emerging_optimizers.orthogonalized_optimizers import Muon

QUINTIC = [
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]


def gpt_shapes(blocks: int, d: int, fused_qkv: bool) -> list[tuple[int, int]]:
    attn = [(3 * d, d), (d, d)] if fused_qkv else [(d, d)] * 4
    return (attn + [(4 * d, d), (d, 4 * d)]) * blocks


def plain_ns(g: torch.Tensor) -> torch.Tensor:
    x = g.mT if g.shape[0] > g.shape[1] else g
    x = x / x.norm().clamp_min(1e-15)
    for a, b, c in QUINTIC:
        gram = x @ x.mT
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if g.shape[0] > g.shape[1] else x


def make_plain_step(params: list[torch.Tensor], lr: float, mu: float) -> Callable[[], None]:
    bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step() -> None:
        for p, buf in zip(params, bufs):
            assert p.grad is not None
            buf.lerp_(p.grad, 1 - mu)
            u = plain_ns(buf)
            p.add_(u, alpha=-lr * math.sqrt(max(p.shape)))

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--fused-qkv", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # the plain reference is true float32
    torch.manual_seed(0)

    shapes = gpt_shapes(args.blocks, args.d_model, args.fused_qkv)

    def make_params() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        ps: list[torch.Tensor] = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        return ps

    lr, mu = 1e-3, 0.95
    variants: dict[str, Callable[[], None]] = {}
    variants["plain"] = make_plain_step(make_params(), lr, mu)
    fp32 = torch.float32  # bf16 is the default on CPUs with bf16 matrix units; these rows are the fp32 ones
    variants["muon"] = Muon(make_params(), lr=lr, momentum=mu, weight_decay=0.0, ns_compute_dtype=fp32).step
    variants["muon_plain"] = Muon(
        make_params(), lr=lr, momentum=mu, weight_decay=0.0, ns_method="plain", ns_compute_dtype=fp32
    ).step
    variants["muon_bf16"] = Muon(
        make_params(), lr=lr, momentum=mu, weight_decay=0.0, ns_compute_dtype=torch.bfloat16
    ).step
    variants["torch"] = torch.optim.Muon(make_params(), lr=lr, momentum=mu, weight_decay=0.0, nesterov=False).step

    for f in variants.values():  # warm-up
        f()
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, f in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            f()
            cpu[name].append((time.process_time() - c0) * 1e3)
            wall[name].append((time.perf_counter() - w0) * 1e3)

    desc = f"{args.blocks} blocks, d_model {args.d_model}, {'fused qkv' if args.fused_qkv else 'q,k,v,o'}"
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(shapes)} matrices ({desc}), "
        f"median of {args.rounds} rounds"
    )
    print("(cpu = process CPU time: with one thread it is the wall time of an idle machine, and it is not inflated")
    print(" when other processes share the cores)")
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    wmed = {k: statistics.median(v) for k, v in wall.items()}
    for name in variants:
        print(
            f"{name:>11s}: cpu {cmed[name]:8.1f} ms/step ({cmed[name] / cmed['plain']:.2f}x plain)   "
            f"wall {wmed[name]:8.1f} ms/step ({wmed[name] / wmed['plain']:.2f}x plain)"
        )


if __name__ == "__main__":
    main()
