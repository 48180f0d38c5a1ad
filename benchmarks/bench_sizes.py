"""Every scalar optimizer's step against torch.optim.AdamW at 0.1M, 1M, 4M and 25M parameters and on the char-LM
of ``emopt compare``, each against its own byte floor.

Sets: GPT-like parameter lists (``_gpt_params.gpt_like_shapes``: embeddings, blocks with fused QKV, MLP 4x, norms;
fp32) of about 0.1M, 1M, 4M and 25M elements, and ``charlm``: the model of ``emopt compare``'s
``charlm-shakespeare`` task, built by the task itself (0.82M params in 53 tensors). Gradients are random, fixed,
and shared by every variant (no optimizer here writes them); every variant owns its parameters and state.

Variants: ``torch AdamW fused`` (``torch.optim.AdamW(fused=True)``, the baseline), ``torch AdamW foreach``; each
of our scalar optimizers (``emerging_optimizers.get_optimizer_cls(name)``) at its defaults (``fused=None``,
``nonfinite='skip'``), the same with ``nonfinite='off'``, and ``adamw`` with ``state_dtype=torch.bfloat16``.

Timing, per set, in one process with ``--threads`` torch threads (default 1):

* first step: ``step()`` of a freshly built optimizer (state allocation, and any compilation it blocks on:
  ``fused=None`` never blocks; it compiles in a background thread, from the first step when the optimizer holds at
  least ``AUTO_FUSE_MIN_NUMEL`` elements, else once its eager steps have taken ``AUTO_FUSE_AFTER_S`` seconds: 5 s in
  the library, set to 0 for this run by ``--after-s`` so that the steady state timed is the compiled path a long run
  reaches; ``--after-s -1`` times the eager path). While that compiles, the variant keeps stepping, as a training loop
  would (``steps while compiling``; ``slowest step s``: the longest of those steps and the first, the stall a user
  would see); ``compile s``: the time until the compilation is done (0 when nothing was compiling, e.g. when an
  earlier variant of the same kernel compiled it: compiled code is shared within a process); then one untimed warm-up
  step, before the next variant is built;
* steady state: ``--rounds`` interleaved rounds (each round times every variant in turn, in an order rotated every
  round, each for as many consecutive steps as take about ``--round-s`` seconds, or ``--steps``); reported: the
  median over rounds of the round's mean ms/step, and the fastest round. A variant whose step raises is reported
  as failed; the others go on.

Byte floor: ``torch AdamW fused``'s ms/step x B / 28, B being the bytes a single-pass update of this optimizer
moves per element: parameter read + write, gradient read, and read + write of every state tensor it holds
after one step (at their element sizes: fp32 AdamW = 8 + 4 + 2 x 8 = 28; bf16 state = 8 + 4 + 2 x 4 = 20).
The non-finite check of ``nonfinite='skip'`` reads the gradient once more; B does not count it.

Budget: ``--max-s`` bounds the whole run. Before a set is timed, its number of rounds is cut (not below 1) to fit
its share of the time left, keeping an estimate of the later sets' set-up in reserve; a set whose set-up alone
would not fit is skipped and said so. Progress lines go to stderr; the tables (markdown, one per set, then a
summary: optimizer x set, ratio to the byte floor) to stdout.

    python benchmarks/bench_sizes.py                       # every set, 5 rounds: ~4 min on a 2-core CPU
    python benchmarks/bench_sizes.py --sizes 0.1M,charlm --rounds 9 --json sizes.json
    python benchmarks/bench_sizes.py --quick               # tiny sets, 1 round of 1 step, eager (smoke test)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpt_params import gpt_like_shapes, make_params

import emerging_optimizers as eo
from emerging_optimizers.cli.bench import cpu_description
from emerging_optimizers.scalar_optimizers import base as scalar_base

OURS = ["adamw", "adam", "ademamix", "sim_ademamix", "laprop", "lion", "signum", "rmsprop", "madam"]
BASELINE = "torch AdamW fused"
ADAMW_BYTES = 28  # fp32: param read+write 8, grad read 4, two moments read+write 16
LIBRARY_AFTER_S = scalar_base.AUTO_FUSE_AFTER_S  # the library's own (``--after-s`` sets another for the run)

#: name -> (n_blocks, d_model, vocab, context) of a GPT-like set; "charlm" is the char-LM task's model.
GPT_SETS: dict[str, tuple[int, int, int, int]] = {
    "0.1M": (1, 64, 512, 256),      # 99,264 params, 16 tensors
    "1M": (4, 128, 1280, 256),      # 989,952 params, 52 tensors
    "4M": (2, 384, 1280, 512),      # 4,237,824 params, 28 tensors: just above AUTO_FUSE_MIN_NUMEL (4,194,304)
    "25M": (6, 512, 10240, 1024),   # 24,682,496 params, 76 tensors
    # --quick
    "tiny": (1, 16, 32, 16),        # 4,080 params, 16 tensors
    "tiny2": (2, 32, 64, 32),       # 28,544 params, 28 tensors
}
CHARLM = "charlm"
DEFAULT_SIZES = ["0.1M", "1M", "4M", "25M", CHARLM]
QUICK_SIZES = ["tiny", "tiny2"]


# ---------------------------------------------------------------------------------------------- the sets
@dataclass
class ParamSet:
    name: str
    describe: str
    params: list[torch.nn.Parameter]  # with .grad set; every variant gets copies sharing these gradients

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def gpt_set(name: str) -> ParamSet:
    blocks, d, vocab, context = GPT_SETS[name]
    params = make_params(gpt_like_shapes(blocks, d, vocab, context))
    return ParamSet(name, f"GPT-like: {blocks} block(s), d_model {d}, vocab {vocab}, context {context}", params)


def charlm_set() -> ParamSet:
    """The parameters of ``charlm-shakespeare``'s model, built as ``emopt compare`` builds it (the task loads its
    corpus for the vocabulary), with random gradients."""
    from emerging_optimizers.cli import tasks

    task = tasks.get_task("charlm-shakespeare")
    model = task.load(task.batch_size).make_model()
    gen = torch.Generator().manual_seed(1)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return ParamSet(CHARLM, f"emopt compare's charlm-shakespeare model ({type(model).__name__}, built by the task)",
                    params)


def load_set(name: str) -> ParamSet:
    return charlm_set() if name == CHARLM else gpt_set(name)


# ---------------------------------------------------------------------------------------------- the variants
def variant_builders() -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    builders: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        BASELINE: lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    }
    for name in OURS:
        cls = eo.get_optimizer_cls(name)
        builders[name] = lambda ps, cls=cls: cls(ps)
        builders[f"{name} nonfinite=off"] = lambda ps, cls=cls: cls(ps, nonfinite="off")
    builders["adamw state_dtype=bf16"] = lambda ps: eo.get_optimizer_cls("adamw")(ps, state_dtype=torch.bfloat16)
    return builders


def bytes_per_element(opt: torch.optim.Optimizer) -> float:
    """Bytes one single-pass update moves per element: param read+write, grad read, each full-size state tensor
    read+write, at their element sizes (from the state after a step), averaged over the elements."""
    total = numel = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            moved = 2 * p.element_size() + (p.grad.element_size() if p.grad is not None else p.element_size())
            moved += sum(2 * t.element_size() for k, t in state.items()
                         if k != "step" and isinstance(t, torch.Tensor) and t.numel() == p.numel())
            total += moved * p.numel()
            numel += p.numel()
    return total / max(numel, 1)


@dataclass
class Result:
    """One variant of one set: its optimizer (dropped once timed), first step, compile wait, bytes per element,
    latest seconds per step (sizes its rounds) and the mean ms/step of each round; ``failed``: why it stopped."""

    label: str
    opt: torch.optim.Optimizer | None
    first_s: float = 0.0
    compile_s: float = 0.0
    slowest_s: float = 0.0
    steps_compiling: int = 0
    bytes: float = float("nan")
    step_s: float = 0.0
    ms: list[float] = field(default_factory=list)
    failed: str = ""


# ---------------------------------------------------------------------------------------------- one set
def setup_estimate_s(numel: int, n_variants: int) -> float:
    """Rough seconds to build every variant of a set and take its first and warm-up steps (compilation excluded):
    about 20 ms per variant plus 40 ns per element on a 2-core CPU (measured: 25M params, 21 variants: 15-21 s)."""
    return n_variants * (0.02 + 4e-8 * numel)


def round_steps(r: Result, steps: int | None, round_s: float) -> int:
    """Steps of ``r`` in one round: ``steps``, else as many as take about ``round_s`` (1 to 1000)."""
    if steps is not None:
        return steps
    return max(1, min(1000, math.ceil(round_s / r.step_s))) if r.step_s > 0 else 1


def _step(r: Result) -> float:
    """One step of ``r``, its seconds; a step that raises drops ``r`` (``r.failed``) and returns 0."""
    assert r.opt is not None
    t0 = time.perf_counter()
    try:
        r.opt.step()
    except Exception as exc:  # reported in the table; the other variants go on
        r.failed = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        r.opt = None
        return 0.0
    return time.perf_counter() - t0


def run_set(pset: ParamSet, rounds: int, steps: int | None, round_s: float, allowance_s: Callable[[], float],
            log: Callable[[str], None]) -> tuple[list[Result], int]:
    """Build every variant in turn (timed first step, compile wait, warm-up step), then time as many of ``rounds``
    interleaved rounds as fit in ``allowance_s()`` seconds (asked once the set-up is done; at least one)."""
    results: list[Result] = []
    for label, make in variant_builders().items():
        copies = []
        for p in pset.params:
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = p.grad  # shared: never written
            copies.append(q)
        r = Result(label, make(copies))
        results.append(r)
        r.first_s = r.slowest_s = _step(r)
        t0 = time.perf_counter()
        while r.opt is not None and scalar_base._COMPILED.compiling():  # train on while it compiles, as a user would
            r.slowest_s = max(r.slowest_s, _step(r))
            r.steps_compiling += 1
        scalar_base._COMPILED.wait()
        r.compile_s = time.perf_counter() - t0
        if r.opt is not None:
            r.bytes = bytes_per_element(r.opt)
            r.step_s = _step(r)  # warm-up, on the compiled code where there is one: the rate rounds are sized by
    live = [r for r in results if not r.failed]
    cost, allowance = sum(round_steps(r, steps, round_s) * r.step_s for r in live), allowance_s()
    fit = rounds if cost <= 0 else max(1, min(rounds, int(allowance // cost)))
    log(f"{pset.name}: set up; timing {fit} round(s) of ~{cost:.1f} s"
        + (f" (cut from {rounds}: {allowance:.0f} s allowed)" if fit < rounds else ""))
    for k in range(fit):
        for r in live[k % len(live):] + live[:k % len(live)]:  # every variant in turn, rotated every round
            if r.failed:
                continue
            n = round_steps(r, steps, round_s)
            t0 = time.perf_counter()
            for _ in range(n):
                _step(r)
            if not r.failed:
                r.step_s = (time.perf_counter() - t0) / n
                r.ms.append(r.step_s * 1e3)
    for r in results:
        r.opt = None  # free the state before the next set
    return results, fit


def table(pset: ParamSet, results: list[Result], rounds: int) -> tuple[str, dict[str, dict[str, float]]]:
    med = {r.label: statistics.median(r.ms) for r in results if r.ms}
    base = med.get(BASELINE)
    lines = ["| optimizer | ms/step | min ms | x torch fused | B/elem | floor ms | x floor | first step s "
             "| compile s | steps while compiling | slowest step s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows: dict[str, dict[str, float]] = {}
    for r in results:
        if r.label not in med:
            lines.append(f"| {r.label} | failed: {r.failed or 'no result'} | | | | | | | | | |")
            continue
        ms = med[r.label]
        floor = base * r.bytes / ADAMW_BYTES if base else float("nan")
        row = dict(ms=ms, min_ms=min(r.ms), x_fused=ms / base if base else float("nan"), bytes=r.bytes,
                   floor_ms=floor, x_floor=ms / floor, first_step_s=r.first_s, compile_s=r.compile_s,
                   steps_compiling=r.steps_compiling, slowest_step_s=r.slowest_s)
        rows[r.label] = row
        lines.append(f"| {r.label} | {ms:.3f} | {row['min_ms']:.3f} | {row['x_fused']:.2f} | {r.bytes:g} | "
                     f"{floor:.3f} | {row['x_floor']:.2f} | {r.first_s:.3f} | {r.compile_s:.2f} | "
                     f"{r.steps_compiling} | {r.slowest_s:.3f} |")
    auto, after = pset.numel >= scalar_base.AUTO_FUSE_MIN_NUMEL, scalar_base.AUTO_FUSE_AFTER_S
    mode = ("compiled from the first step, dynamic-shape chunks of FUSED_CHUNK tensors" if auto else
            "eager (AUTO_FUSE_AFTER_S = None)" if after is None else
            f"compiled once its eager steps took AUTO_FUSE_AFTER_S = {after:g} s, static-shape chunks")
    head = (f"### {pset.name}: {pset.numel:,} params in {len(pset.params)} tensors ({pset.describe}); "
            f"fused=None: {mode} ({'>=' if auto else '<'} AUTO_FUSE_MIN_NUMEL = "
            f"{scalar_base.AUTO_FUSE_MIN_NUMEL:,}); {rounds} round(s)")
    return head + "\n\n" + "\n".join(lines), rows


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None,
                    help=f"comma-separated sets, in order (default {','.join(DEFAULT_SIZES)}; also "
                         f"{','.join(QUICK_SIZES)})")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per set (median over them)")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per variant per round (default: as many as take --round-s)")
    ap.add_argument("--round-s", type=float, default=0.3,
                    help="with --steps unset, each round times as many steps of a variant as take this long "
                         "(1 to 1000 steps; default 0.3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--max-s", type=float, default=330.0, help="time budget of the whole run, seconds")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: sets {','.join(QUICK_SIZES)} (unless --sizes), 1 round of 1 step")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    ap.add_argument("--after-s", type=float, default=None,
                    help="AUTO_FUSE_AFTER_S for this run (negative: None). Below AUTO_FUSE_MIN_NUMEL, fused=None "
                         "compiles once its eager steps have taken this long (the library's default is "
                         f"{scalar_base.AUTO_FUSE_AFTER_S} s); default here 0: from the first step, so the steady "
                         "state timed is the compiled path a long run reaches (-1 under --quick: a smoke test "
                         "does not wait minutes for compilations)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 1
    if args.after_s is None:
        args.after_s = -1.0 if args.quick else 0.0
    sizes = args.sizes.split(",") if args.sizes else (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    unknown = [s for s in sizes if s != CHARLM and s not in GPT_SETS]
    if unknown:
        ap.error(f"unknown set(s) {unknown}; choose from {[*GPT_SETS, CHARLM]}")
    if args.rounds < 1 or (args.steps is not None and args.steps < 1) or args.threads < 1:
        ap.error("--rounds, --steps and --threads must be >= 1")
    args.sizes = sizes
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with scalar_base.auto_fuse_after(None if args.after_s < 0 else args.after_s):
            return _main(args)
    finally:
        torch.set_num_threads(old_threads)


def _main(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    load_start = _load()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {text}", file=sys.stderr, flush=True)

    print(cpu_description(), flush=True)
    steps_text = f"{args.steps} step(s)" if args.steps else f"~{args.round_s:g} s of steps (1 to 1000)"
    print(f"Every set: {args.rounds} interleaved round(s) (order rotated per round), each timing {steps_text} of "
          f"every variant; ms/step = median over rounds of the round's mean. Steady state: measured after "
          f"emerging_optimizers.scalar_optimizers.base._COMPILED.wait() (fused=None compiles in a background "
          f"thread: from the first step for optimizers of >= {scalar_base.AUTO_FUSE_MIN_NUMEL:,} elements, once "
          f"their eager steps took AUTO_FUSE_AFTER_S = {scalar_base.AUTO_FUSE_AFTER_S} s for smaller ones; "
          f"library default {LIBRARY_AFTER_S} s) and one warm-up step. "
          f"first step s: step() of a fresh optimizer (state allocation + any compilation it blocks on; fused=None "
          f"never blocks). compile s: from that first step until the background compilation is done (0: none, or "
          f"already compiled by an earlier variant of the same kernel in this process), the variant stepping on "
          f"meanwhile (steps while compiling); slowest step s: the longest of those steps and the first.")
    print(f"Byte floor: {BASELINE}'s ms/step x B/{ADAMW_BYTES}. B (B/elem) = bytes a single-pass update moves per "
          f"element: param read+write + grad read + read+write of each state tensor the optimizer holds after one "
          f"step, at their element sizes (fp32 AdamW: 8 + 4 + 2 x 8 = {ADAMW_BYTES}; bf16 state: 8 + 4 + 2 x 4 = 20). "
          f"x floor = ms/step / floor ms. nonfinite='skip' (the default) also reads the gradient once more for "
          f"its check: not counted in B.", flush=True)

    n_variants = len(variant_builders())
    done: list[dict[str, dict[str, float]]] = []  # each timed set's rows
    report: dict[str, Any] = {"cpu": cpu_description(), "threads": args.threads, "rounds": args.rounds,
                              "steps": args.steps, "max_s": args.max_s, "sizes": []}
    for i, name in enumerate(args.sizes):
        left = args.max_s - (time.perf_counter() - t_start)
        later = args.sizes[i + 1:]
        setup = setup_estimate_s(set_numel(name), n_variants)
        # the later sets' set-up is kept in reserve, except for a set that could not fit anyway
        reserve = sum(e for e in (setup_estimate_s(set_numel(n), n_variants) for n in later) if e <= left - setup)
        why = ""
        if left - reserve < setup:
            why = (f"budget --max-s {args.max_s:g} spent: {left:.0f} s left, set-up ~{setup:.0f} s + later sets' "
                   f"~{reserve:.0f} s")
        else:
            try:
                pset = load_set(name)
            except Exception as exc:  # the char-LM's corpus is an optional dependency
                why = f"{type(exc).__name__}: {exc}"
        if why:
            log(f"{name}: skipped ({why})")
            print(f"\n### {name}: skipped ({why})", flush=True)
            report["sizes"].append({"name": name, "skipped": why})
            continue
        log(f"{name}: {pset.numel:,} params in {len(pset.params)} tensors; building {n_variants} variants "
            f"(first step, compile wait, warm-up step each)")
        t_set = time.perf_counter()

        def allowance(later: list[str] = later, reserve: float = reserve) -> float:
            """This set's share of the time left, once the later sets' set-up is reserved."""
            return (args.max_s - (time.perf_counter() - t_start) - reserve) / (len(later) + 1)

        results, fit = run_set(pset, args.rounds, args.steps, args.round_s, allowance, log)
        text, rows = table(pset, results, fit)
        print("\n" + text, flush=True)
        log(f"{name}: done in {time.perf_counter() - t_set:.1f} s (compile waits "
            f"{sum(r.compile_s for r in results):.1f} s)")
        done.append(rows)
        report["sizes"].append({"name": name, "params": pset.numel, "tensors": len(pset.params),
                                "describe": pset.describe, "rounds": fit,
                                "auto_fused": pset.numel >= scalar_base.AUTO_FUSE_MIN_NUMEL,
                                "auto_fuse_after_s": scalar_base.AUTO_FUSE_AFTER_S,
                                "variants": {r.label: dict(rows.get(r.label, {}), round_ms=r.ms,
                                                           failed=r.failed) for r in results}})
        pset.params = []  # free this set's tensors before the next one
        del results
        gc.collect()

    total = time.perf_counter() - t_start
    print("\n" + cpu_description())
    print("\n### Summary: ms/step / byte floor (x floor)\n")
    print("| optimizer | " + " | ".join(f"{entry['name']} ({entry['params'] / 1e6:.2f}M)"
                                       for entry in report["sizes"] if "params" in entry) + " |")
    print("|---|" + "---:|" * len(done))
    for label in variant_builders():
        cells = [f"{rows[label]['x_floor']:.2f}" if label in rows else "-" for rows in done]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\ntotal {total:.1f} s (budget --max-s {args.max_s:g}); load average (1 min) at the start "
          f"{load_start:.2f}, at the end {_load():.2f} (other processes share this machine's cores and memory "
          f"bandwidth)", flush=True)
    report["total_s"] = total
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=float) + "\n")
    return 0


def _load() -> float:
    """The 1-minute load average (nan where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def set_numel(name: str) -> int:
    """A set's element count without building it (the char-LM's is known: 822,016)."""
    if name == CHARLM:
        return 822_016
    blocks, d, vocab, context = GPT_SETS[name]
    return sum(torch.Size(s).numel() for _, s in gpt_like_shapes(blocks, d, vocab, context))


if __name__ == "__main__":
    sys.exit(main())
