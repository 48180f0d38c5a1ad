"""float32 vs bfloat16 Newton-Schulz on this CPU: time, singular-value band and difference of the results.

The evidence behind :func:`emerging_optimizers.orthogonalized_optimizers.muon_utils.ns_compute_dtype` choosing
bf16 under ``"medium"`` on CPUs with bf16 matrix units, AMX-BF16 or AVX512-BF16 (float32 on the others, where
torch emulates bf16, and for matrices under ``CPU_BF16_MIN_DIM`` on their short side). For each shape, a
gradient-like input (rank-16 signal with decaying spectrum plus 30% noise) is orthogonalized with Muon's
default Newton-Schulz (``quintic`` x 5, ``method="auto"``: float32 picks its cheapest exact form, bf16 the plain
one) in float32 and in bfloat16. One thread; the two dtypes are timed alternately, median of the rounds.
Prints the CPU, per shape: milliseconds of each dtype and their ratio, min/max singular value of each result,
and the relative Frobenius difference ``||NS_bf16 - NS_fp32|| / ||NS_fp32||``.

    python benchmarks/ns_bf16_quality.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz
from emerging_optimizers.utils import cpu_has_bf16_matmul

try:
    from emerging_optimizers.cli.bench import cpu_description
except ImportError:  # the CLI extras are not installed
    import platform

    def cpu_description() -> str:
        return f"CPU: {platform.processor() or platform.machine()}; torch {torch.__version__}"


SHAPES = [(128, 512), (512, 512), (512, 2048), (1024, 4096)]
STEPS = 5


def gradient_like(m: int, n: int, seed: int = 0, rank: int = 16, noise: float = 0.3) -> torch.Tensor:
    """A rank-``rank`` matrix with singular values decaying from 1 to 0.01, plus Gaussian noise of relative
    RMS ``noise``: what a transformer weight's gradient or momentum looks like to Newton-Schulz."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(m, rank, generator=g)
    v = torch.randn(rank, n, generator=g)
    x = (u * torch.logspace(0, -2, rank)) @ v / rank**0.5
    return x + noise * x.norm() / (m * n) ** 0.5 * torch.randn(m, n, generator=g)


def ns(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return newton_schulz(x, STEPS, "quintic", compute_dtype=dtype)


def time_interleaved(x: torch.Tensor, rounds: int) -> dict[torch.dtype, float]:
    """Median seconds of one Newton-Schulz per dtype, the dtypes run in turn every round (after a warm-up)."""
    dtypes = (torch.float32, torch.bfloat16)
    for dt in dtypes:
        ns(x, dt)
    times: dict[torch.dtype, list[float]] = {dt: [] for dt in dtypes}
    for r in range(rounds):
        for dt in dtypes if r % 2 == 0 else dtypes[::-1]:
            t0 = time.perf_counter()
            ns(x, dt)
            times[dt].append(time.perf_counter() - t0)
    return {dt: statistics.median(ts) for dt, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per shape (default 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(cpu_description())
    print(f"emerging_optimizers.utils.cpu_has_bf16_matmul(): {cpu_has_bf16_matmul()}")
    print(f"Newton-Schulz quintic x {STEPS}, method='auto', one thread, median of {args.rounds} interleaved rounds; "
          "input: rank-16 + 30% noise\n")
    print(f"{'shape':>10} | {'fp32 ms':>8} {'bf16 ms':>8} {'fp32/bf16':>9} | {'fp32 sv min':>11} {'max':>6} | "
          f"{'bf16 sv min':>11} {'max':>6} | {'rel diff':>8} {'max |dsv|':>9}")
    for m, n in SHAPES:
        x = gradient_like(m, n)
        t = time_interleaved(x, args.rounds)
        a, b = ns(x, torch.float32), ns(x, torch.bfloat16)
        sa = torch.linalg.svdvals(a.double())
        sb = torch.linalg.svdvals(b.double())
        rel = ((b - a).norm() / a.norm()).item()
        dsv = (sb - sa).abs().max().item()  # both sorted descending
        print(f"{f'{m}x{n}':>10} | {t[torch.float32] * 1e3:8.1f} {t[torch.bfloat16] * 1e3:8.1f} "
              f"{t[torch.float32] / t[torch.bfloat16]:9.2f} | {sa.min():11.3f} {sa.max():6.3f} | "
              f"{sb.min():11.3f} {sb.max():6.3f} | {rel:8.4f} {dsv:9.4f}", flush=True)


if __name__ == "__main__":
    main()
