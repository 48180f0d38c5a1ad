"""Muon step time on small models (per-matrix overhead), one CPU thread, all variants interleaved.

Three parameter sets, every variant with its own copy of the parameters, fixed random gradients:

* ``mlp``: the ``mlp-digits`` task's MLP 64-128-128-10 (26k parameters). ``muon``: ``Muon`` on its two hidden
  matrices (``fc1``, ``fc2``; defaults: bf16 Newton-Schulz on CPUs with bf16 matrix units, float32 elsewhere);
  ``muon_fp32``: the same with ``ns_compute_dtype=torch.float32``; ``adamw``: ``emerging_optimizers.AdamW`` on
  the whole model;
  ``adamw_rest``: that AdamW on the parameters ``MuonAdamW`` gives to AdamW (biases and the head);
  ``muon_adamw``: ``MuonAdamW(model, matrix_optimizer="muon")`` (the whole step); ``muon_adamw_normuon``:
  ``MuonAdamW(model)`` with its default matrix side (NorMuon); ``ns``: the plain float32 Newton-Schulz of the
  two matrices alone.
* ``charlm``: the ``charlm-shakespeare`` model's 16 hidden matrices (4 blocks x 128: qkv, proj, fc1, fc2).
* ``gpt``: 2 GPT blocks of d_model 512 (q, k, v, o, mlp up, mlp down; 12 matrices).

For ``charlm`` and ``gpt``: ``muon`` (``Muon(weight_decay=0, ns_compute_dtype=torch.float32)``) against
``plain``, the plain float32 reference of ``benchmarks/bench_muon.py`` (one matrix at a time, three GEMMs per
Newton-Schulz step); ``muon_default`` is ``Muon(weight_decay=0)`` at its default precision (bf16 on CPUs with
bf16 matrix units).

Timing: every round runs each variant for ``--steps`` consecutive steps (per set; the order rotates every
round); reported: the median over ``--rounds`` rounds of the mean ms/step, process CPU time (with one thread,
the wall time of an idle core, not inflated when other processes share the machine) and wall time.

Usage: ``python benchmarks/bench_muon_small.py [--rounds 15] [--threads 1]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_muon import QUINTIC, gpt_shapes, make_plain_step

from emerging_optimizers import AdamW
from emerging_optimizers.cli.bench import cpu_description, hidden_matrices
from emerging_optimizers.cli.models import MLP, CharTransformer
from emerging_optimizers.orthogonalized_optimizers import Muon, MuonAdamW

LR, MU = 1e-3, 0.95


def _with_grads(params: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 0.01
    return params


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    model = MLP(64)
    _with_grads(list(model.parameters()))
    return model


def _plain_ns_step(mats: list[torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        for g in mats:
            x = g.mT if g.shape[0] > g.shape[1] else g
            x = x / x.norm().clamp_min(1e-15)
            for a, b, c in QUINTIC:
                gram = x @ x.mT
                x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)

    return step


def mlp_variants() -> dict[str, Callable[[], None]]:
    v: dict[str, Callable[[], None]] = {}
    m = _mlp()
    v["muon"] = Muon([m.fc1.weight, m.fc2.weight], lr=LR, momentum=MU).step
    m = _mlp()
    v["muon_fp32"] = Muon([m.fc1.weight, m.fc2.weight], lr=LR, momentum=MU, ns_compute_dtype=torch.float32).step
    v["adamw"] = AdamW(_mlp().parameters(), lr=LR).step
    m = _mlp()
    hidden = {id(m.fc1.weight), id(m.fc2.weight)}
    v["adamw_rest"] = AdamW([p for p in m.parameters() if id(p) not in hidden], lr=LR).step
    v["muon_adamw"] = MuonAdamW(_mlp(), matrix_optimizer="muon").step
    v["muon_adamw_normuon"] = MuonAdamW(_mlp()).step
    m = _mlp()
    v["ns"] = torch.no_grad()(_plain_ns_step([m.fc1.weight.grad, m.fc2.weight.grad]))
    return v


def charlm_params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = CharTransformer(65, context=64, dim=128, depth=4, num_heads=4)
    return _with_grads([p for _, p in hidden_matrices(model)])


def gpt_params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in gpt_shapes(2, 512, False)]
    return _with_grads(ps)


def matrix_variants(make: Callable[[], list[torch.Tensor]]) -> dict[str, Callable[[], None]]:
    return {"plain": make_plain_step(make(), LR, MU),
            "muon": Muon(make(), lr=LR, momentum=MU, weight_decay=0.0, ns_compute_dtype=torch.float32).step,
            "muon_default": Muon(make(), lr=LR, momentum=MU, weight_decay=0.0).step}


def time_interleaved(sets: dict[str, tuple[dict[str, Callable[[], None]], int]], rounds: int
                     ) -> dict[str, dict[str, tuple[float, float]]]:
    """``{set: {variant: (median cpu ms/step, median wall ms/step)}}``."""
    flat = [(s, name, f, steps) for s, (vs, steps) in sets.items() for name, f in vs.items()]
    for _, _, f, _ in flat:  # warm-up: state allocation, first-call costs
        for _ in range(3):
            f()
    cpu: dict[tuple[str, str], list[float]] = {(s, n): [] for s, n, _, _ in flat}
    wall: dict[tuple[str, str], list[float]] = {(s, n): [] for s, n, _, _ in flat}
    for r in range(rounds):
        k = r % len(flat)
        for s, name, f, steps in flat[k:] + flat[:k]:
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                f()
            cpu[(s, name)].append((time.process_time() - c0) * 1e3 / steps)
            wall[(s, name)].append((time.perf_counter() - w0) * 1e3 / steps)
    out: dict[str, dict[str, tuple[float, float]]] = {s: {} for s in sets}
    for s, name, _, _ in flat:
        out[s][name] = (statistics.median(cpu[(s, name)]), statistics.median(wall[(s, name)]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # the plain reference is true float32
    sets = {"mlp": (mlp_variants(), 50), "charlm": (matrix_variants(charlm_params), 10),
            "gpt": (matrix_variants(gpt_params), 1)}
    res = time_interleaved(sets, args.rounds)
    print(cpu_description())
    print(f"median of {args.rounds} interleaved rounds; ms/step as process CPU time (wall time in brackets)")
    mlp = res["mlp"]
    for name, (c, w) in mlp.items():
        print(f"  mlp    {name:>19s}: {c:7.3f} ms ({w:7.3f})   {c / mlp['adamw'][0]:5.2f}x adamw")
    c = {k: v[0] for k, v in mlp.items()}
    print(f"  mlp    muon_adamw / (muon + adamw_rest) = {c['muon_adamw'] / (c['muon'] + c['adamw_rest']):.2f}")
    for s, label in (("charlm", "char-LM 16 matrices (4 x 128)"), ("gpt", "2 GPT blocks, d_model 512")):
        r = res[s]
        print(f"  {s:6s} {label}: muon (fp32) {r['muon'][0]:8.3f} ms ({r['muon'][1]:.3f}), plain "
              f"{r['plain'][0]:8.3f} ms ({r['plain'][1]:.3f}); muon / plain = {r['muon'][0] / r['plain'][0]:.2f}; "
              f"muon at its default precision {r['muon_default'][0]:8.3f} ms "
              f"({r['muon_default'][0] / r['plain'][0]:.2f}x plain)")


if __name__ == "__main__":
    main()
