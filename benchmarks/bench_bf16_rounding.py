"""Where a compiled bf16-state step spends its time on CPU: the stochastic rounding, taken apart.

One tensor of ``--numel`` elements (default 4M) with Adam's two moments, updated as Adam's kernel does
(``m.lerp_(g, 0.1)``, ``v.lerp_(g * g, 0.001)``), each variant compiled by ``torch.compile`` (static shapes,
one fused loop), all interleaved over ``--rounds`` rounds on one thread; median ms per call:

* ``fp32 state``: the moments in float32, updated in place (12 bytes of moment traffic per element, x2).
* ``bf16, round to nearest``: bf16 moments, computed in float32, written back with ``.to(bfloat16)``
  (what a plain cast does: small updates are lost, the stall the rounding exists to avoid).
* ``bf16, bitcasts, fixed noise``: the library's rounding with the hash replaced by a constant: only the
  ``view(torch.int32)`` / ``view(torch.float32)`` bit casts of ``stochastic_round_``.
* ``bf16, hash, no bitcasts``: the hash of ``stochastic_round_`` (one per moment) computed and folded into the
  value without bit casts (the result is not a stochastic rounding: this only times the hash).
* ``bf16, float-only dither (not used)``: a rounding without bit casts or integers: 16-bit noise from a float
  ramp shifted by the step's salt, scaled to the bf16 spacing (Rump's unit in the first place) and added
  before the cast's round-to-nearest, clamped to the value's binade. Unbiased to within one float32 ulp (ties
  go to even), its noise a structured ramp: a weaker rounding, measured to see what a cheaper one could buy.
* ``bf16, stochastic_round_``: what ``state_dtype=torch.bfloat16`` runs (hash + bit casts).

Measured (AMD EPYC with AVX-512 + AVX512-BF16, torch 2.13.0+cpu, one thread, 4M elements, ``--rounds 9``):
1.33 / 1.04 / 8.03 / 4.90 / 3.31 / 8.44 ms.
Inductor's C++ backend has no vectorized form of ``to_dtype_bitcast``: each bit cast is a scalar loop through a
stack buffer (see the generated code with ``TORCH_LOGS=output_code``), and the 16-bit hash is a dozen integer
vector ops (three 32-bit multiplies) per moment; in a kernel that touches bf16, Inductor works 32 lanes at a time
(``VectorizedN<T, 2>``), for which ``at::vec`` has no int32-to-float conversion (its generic one is a scalar loop
as well) and the index ramp the hash starts from is built lane by lane. A rounding written with float operations
only (a bit-exact equivalent exists, via Rump's "unit in the first place") was measured slower still (10 ms: ~45
vector ops per value, a division among them). Even the float-only dither, ~10 vector ops per value and no exact
rounding, takes 2.5x the fp32 step: round-to-nearest leaves 0.3 ms of headroom below fp32 for 8M roundings, and
each vector op over the two 4M moments costs ~0.1 ms here (the kernel is compute-bound once a rounding is in it).
Hence bf16 state saves memory on CPU but not time on one thread; where bandwidth, not arithmetic, bounds the step
(a GPU, or many threads) the rounding's ops are free and the halved bytes count.

Usage: ``python benchmarks/bench_bf16_rounding.py [--numel 4194304] [--rounds 7]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from emerging_optimizers.cli.bench import cpu_description
from emerging_optimizers.scalar_optimizers.base import _hash16, stochastic_round_


def fp32_state(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, salt: torch.Tensor) -> None:
    m.lerp_(g, 0.1)
    v.lerp_(g * g, 0.001)


def _moments(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return m.float().lerp(g, 0.1), v.float().lerp(g * g, 0.001)


def bf16_nearest(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, salt: torch.Tensor) -> None:
    mf, vf = _moments(m, v, g)
    m.copy_(mf)
    v.copy_(vf)


def bf16_bitcasts_fixed_noise(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, salt: torch.Tensor) -> None:
    mf, vf = _moments(m, v, g)
    for t, w in ((m, mf), (v, vf)):
        t.copy_(((w.view(torch.int32) + 0x7FFF) & -65536).view(torch.float32))


def bf16_hash_no_bitcasts(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, salt: torch.Tensor) -> None:
    mf, vf = _moments(m, v, g)
    for k, (t, w) in enumerate(((m, mf), (v, vf))):
        t.copy_(w + _hash16(w.numel(), salt + k, w.device).view(w.shape).float() * 1e-30)


def _dithered(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``|x| + w * spacing`` clamped to ``|x|``'s binade, with ``x``'s sign: bf16's round-to-nearest of it (the
    cast on store) is a stochastic rounding when ``w`` is uniform on [-1/2, 1/2) in units of the bf16 spacing
    (here ``w`` is pre-scaled by 2^-7). Floats only: the spacing is Rump's unit in the first place,
    ``q - (1 - 2^-24) q`` with ``q = (2^23 + 1) |x|``, times 2^-7. Values past 2^100 are left to the cast."""
    a = x.abs()
    q = a * 8388609.0
    ufp = q - q * (1.0 - 2.0**-24)
    y = torch.maximum(a + w * ufp, ufp)
    return torch.copysign(torch.where(a < 2.0**100, y, a), x)


def bf16_float_dither(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, salt: torch.Tensor) -> None:
    mf, vf = _moments(m, v, g)
    i = torch.arange(mf.numel(), dtype=torch.float32, device=mf.device).view(mf.shape)
    j = i + salt.float()  # a ramp of 16-bit noise shifted by the step's salt
    u = (j - torch.floor(j * 2.0**-16) * 65536.0) * 2.0**-16
    m.copy_(_dithered(mf, u * 2.0**-7 - 2.0**-8))
    u = u + 0.5
    v.copy_(_dithered(vf, (u - torch.floor(u)) * 2.0**-7 - 2.0**-8))


def bf16_stochastic_round(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, salt: torch.Tensor) -> None:
    mf, vf = _moments(m, v, g)
    for k, (t, w) in enumerate(((m, mf), (v, vf))):
        stochastic_round_(t, w, salt + k)


VARIANTS: dict[str, Callable[..., None]] = {
    "fp32 state": fp32_state,
    "bf16, round to nearest": bf16_nearest,
    "bf16, bitcasts, fixed noise": bf16_bitcasts_fixed_noise,
    "bf16, hash, no bitcasts": bf16_hash_no_bitcasts,
    "bf16, float-only dither (not used)": bf16_float_dither,
    "bf16, stochastic_round_": bf16_stochastic_round,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20, help="calls per variant per round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(args.numel, generator=gen)
    m0, v0 = torch.randn(args.numel, generator=gen) * 0.01, torch.rand(args.numel, generator=gen) * 1e-4
    salt = torch.tensor(3.0, dtype=torch.float64)
    tensors = {name: (m0.clone(), v0.clone()) if name == "fp32 state" else
               (m0.to(torch.bfloat16), v0.to(torch.bfloat16)) for name in VARIANTS}
    compiled = {name: torch.compile(fn, dynamic=False, fullgraph=True) for name, fn in VARIANTS.items()}
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; {args.numel:,} elements; one thread")
    with torch.no_grad():
        for name, fn in compiled.items():
            start = time.perf_counter()
            fn(*tensors[name], g, salt)
            print(f"  compiled {name!r} in {time.perf_counter() - start:.1f} s", flush=True)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, fn in compiled.items():
                m, v = tensors[name]
                start = time.perf_counter()
                for _ in range(args.calls):
                    fn(m, v, g, salt)
                times[name].append((time.perf_counter() - start) / args.calls * 1e3)
    base = statistics.median(times["fp32 state"])
    print("\n| variant | ms per call | x fp32 state |\n|---|---:|---:|")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"| {name} | {ms:.3f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
