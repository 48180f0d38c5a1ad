"""Markdown tables of the modeled per-step communication and Newton-Schulz cost of distributed Muon designs.

A model, not a measurement: see ``emerging_optimizers/distributed/comm_model.py`` for every formula. Default: a
7B-class GPT (d_model 4096, 32 layers, vocab 50304, untied head) for W = 1 ... 1024 data-parallel ranks.

Usage: ``python benchmarks/comm_model_table.py [--d-model 4096] [--layers 32] [--vocab 50304] [--tflops 400]
[--gather-bytes 4|2] [--worlds 1,2,4,8] [--out table.md]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from emerging_optimizers.distributed.comm_model import DESIGNS, gpt_shapes, table

Row = dict[str, float | int | str]


def _pivot(title: str, rows: list[Row], worlds: list[int], cell: Callable[[Row], str]) -> list[str]:
    """One markdown table: a row per world size, a column per design."""
    by_key = {(r["world"], r["design"]): r for r in rows}
    lines = [f"### {title}", "", "| W | " + " | ".join(DESIGNS) + " |", "|---:|" + "---:|" * len(DESIGNS)]
    for w in worlds:
        lines.append(f"| {w} | " + " | ".join(cell(by_key[(w, d)]) for d in DESIGNS) + " |")
    return lines + [""]


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def _opt_cell(r: Row) -> str:
    s = _gb(float(r["bytes_per_rank"]))
    if float(r["bytes_max_rank"]) > 1.05 * float(r["bytes_per_rank"]):
        s += f" (max {_gb(float(r['bytes_max_rank']))})"
    return s + ("*" if float(r["padded_matrices"]) else "")


def _imbalance_cell(r: Row) -> str:
    s = f"{float(r['imbalance']):.2f}"
    return s + (f" (x{float(r['ns_redundancy']):.1f} work)" if float(r["ns_redundancy"]) > 1.005 else "")


def render(args: argparse.Namespace) -> str:
    shapes, other = gpt_shapes(args.d_model, args.layers, args.vocab, tied=args.tied)
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = table(shapes, other, worlds, gather_bytes=args.gather_bytes, flops_per_s=args.tflops * 1e12)
    mats = sum(m * n for m, n in shapes)
    head = [
        f"## Distributed Muon designs: modeled cost per optimizer step (d_model {args.d_model}, {args.layers} layers, "
        f"vocab {args.vocab}{', tied head' if args.tied else ''})",
        "",
        f"{len(shapes)} Muon matrices ({mats / 1e9:.2f} B elements), {other / 1e9:.2f} B other elements "
        f"(embedding, head, norms). A model, not a measurement: ring collectives, bytes *sent per rank* "
        f"(GB = 1e9 B), fp32 grads/params, 5-step Newton-Schulz FLOPs, our update gather in "
        f"{'bf16' if args.gather_bytes == 2 else 'fp32'}. NS time assumes {args.tflops:g} TFLOP/s sustained "
        f"(an H100-class bf16 GEMM rate; an assumption, not measured). Formulas: "
        f"`emerging_optimizers/distributed/comm_model.py`.",
        "",
    ]
    out = head
    out += _pivot("Optimizer collectives, GB sent per rank (mean over ranks; max if > 5% above)", rows, worlds,
                  _opt_cell)
    out.append("\\* some shape group has N % W != 0 and is padded with zero matrices (modded-nanogpt itself "
               "rejects such a W; dion pads).")
    out.append("")
    out += _pivot("Gradient sync outside the optimizer (DDP all-reduce / FSDP2 AG+RS / non-matrix all-reduce), "
                  "GB sent per rank", rows, worlds, lambda r: _gb(float(r["bytes_grad_sync"])))
    out += _pivot("Total GB sent per rank (plain fp32 data parallelism = 2(W-1)/W x 4 x all params)", rows, worlds,
                  lambda r: _gb(float(r["bytes_total"])))
    out += _pivot("Newton-Schulz GFLOP on the busiest rank", rows, worlds,
                  lambda r: f"{float(r['ns_flops_max_rank']) / 1e9:,.0f}")
    out += _pivot("NS imbalance (busiest / mean executed; x = executed work / one copy, from redundancy, "
                  "duplication or zero padding)", rows, worlds, _imbalance_cell)
    out += _pivot(f"Modeled NS time on the busiest rank, ms at {args.tflops:g} TFLOP/s", rows, worlds,
                  lambda r: f"{float(r['ns_seconds']) * 1e3:.1f}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--tied", action="store_true", help="tied embedding / head (counted once)")
    parser.add_argument("--worlds", default="1,2,4,8,16,64,256,1024", help="comma-separated world sizes")
    parser.add_argument("--tflops", type=float, default=400.0,
                        help="assumed sustained NS throughput per rank, TFLOP/s (default 400: H100-class bf16 GEMM)")
    parser.add_argument("--gather-bytes", type=int, choices=(4, 2), default=4,
                        help="bytes per element of our update gather / return (4 fp32, 2 bf16)")
    parser.add_argument("--out", type=Path, help="also write the markdown to this file")
    args = parser.parse_args()
    text = render(args)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
