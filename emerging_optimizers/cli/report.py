"""Summaries of a comparison: the table (terminal and CSV), ``results.json`` and the PNG figure.

Per optimizer, over its seeds: final train loss (mean training loss over the last evaluation interval),
final validation loss (mean, std, min, max over the seeds that did not diverge), the step at which the
seed-mean validation curve first reaches the reference's (AdamW's) final validation loss and the training
seconds it took (interpolated linearly between evaluations), the median ``optimizer.step()`` time, the
optimizer state size and the status.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emerging_optimizers.cli.train import RunResult

__all__ = ["Summary", "summarize", "crossing", "mean_curve", "write_csv", "write_markdown", "summary_json",
           "write_json", "plot", "environment", "rich_table", "COLUMNS"]


@dataclass
class Summary:
    label: str
    family: str
    lr: float | None
    seeds: int
    diverged: int
    train_loss: tuple[float, float] | None  # (mean, std) over non-diverged seeds
    val_loss: tuple[float, float, float, float] | None  # mean, std, min, max
    val_acc: float | None
    steps_to_ref: int | None
    time_to_ref_s: float | None
    train_time_s: float
    opt_step_ms: float
    state_bytes: int

    @property
    def status(self) -> str:
        if not self.diverged:
            return "ok"
        return "diverged" if self.diverged == self.seeds else f"diverged ({self.diverged}/{self.seeds} seeds)"


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def mean_curve(runs: list[RunResult], key: str = "val_loss") -> tuple[list[int], list[float], list[float]]:
    """Eval steps reached by every run, with the seed-mean metric and the seed-mean training time there."""
    n = min(len(r.eval_step) for r in runs)
    steps = runs[0].eval_step[:n]
    vals = [statistics.fmean(r.metrics[key][i] for r in runs) for i in range(n)]
    times = [statistics.fmean(r.eval_time_s[i] for r in runs) for i in range(n)]
    return steps, vals, times


def crossing(steps: list[int], vals: list[float], times: list[float], target: float) -> tuple[int, float] | None:
    """First point where the curve ``vals`` reaches ``target``: step (rounded) and time, linearly interpolated
    between the two evaluations around the crossing; None if it never does."""
    for i, v in enumerate(vals):
        if v <= target:
            if i == 0 or not math.isfinite(vals[i - 1]) or vals[i - 1] == v:
                return steps[i], times[i]
            a = (vals[i - 1] - target) / (vals[i - 1] - v)
            return round(steps[i - 1] + a * (steps[i] - steps[i - 1])), times[i - 1] + a * (times[i] - times[i - 1])
    return None


def summarize(runs_by_label: dict[str, list[RunResult]], families: dict[str, str],
              reference: str) -> tuple[list[Summary], float | None]:
    """One :class:`Summary` per label, and the reference's final validation loss (None if it diverged)."""
    def final_vals(runs: list[RunResult]) -> list[float]:
        return [r.metrics["val_loss"][-1] for r in runs if not r.diverged]

    ref_vals = final_vals(runs_by_label[reference])
    target = statistics.fmean(ref_vals) if ref_vals else None
    out = []
    for label, runs in runs_by_label.items():
        ok = [r for r in runs if not r.diverged]
        steps_to = time_to = None
        if ok and target is not None:
            steps, vals, times = mean_curve(ok)
            reach = crossing(steps, vals, times, target)
            if reach is not None:
                steps_to, time_to = reach
        train, val, acc = None, None, None
        if ok:
            window = [statistics.fmean(r.train_loss[-max(1, r.steps // max(1, len(r.eval_step) - 1)):]) for r in ok]
            train = _mean_std(window)
            fv = final_vals(ok)
            val = (*_mean_std(fv), min(fv), max(fv))
            if "val_acc" in ok[0].metrics:
                acc = statistics.fmean(r.metrics["val_acc"][-1] for r in ok)
        out.append(Summary(
            label=label, family=families[label], lr=runs[0].lr,
            seeds=len(runs), diverged=len(runs) - len(ok), train_loss=train, val_loss=val, val_acc=acc,
            steps_to_ref=steps_to, time_to_ref_s=time_to,
            train_time_s=statistics.fmean(r.train_time_s for r in runs),
            opt_step_ms=statistics.median(r.opt_step_ms for r in runs if math.isfinite(r.opt_step_ms))
            if any(math.isfinite(r.opt_step_ms) for r in runs) else float("nan"),
            state_bytes=max(r.state_bytes for r in runs),
        ))
    return out, target


COLUMNS = ["optimizer", "family", "lr", "train loss", "val loss", "val acc", "steps to ref", "s to ref",
           "train s", "ms/opt step", "state MB", "status"]


def row(s: Summary, seeds: int) -> list[str]:
    """The table row of ``s`` as text (``-``: not reached / not applicable)."""
    pm = (lambda m, sd: f"{m:.4f} ± {sd:.4f}") if seeds > 1 else (lambda m, sd: f"{m:.4f}")
    return [
        s.label, s.family, f"{s.lr:g}" if s.lr is not None else "-",
        pm(*s.train_loss) if s.train_loss else "diverged",
        pm(*s.val_loss[:2]) if s.val_loss else "diverged",
        f"{s.val_acc:.3f}" if s.val_acc is not None else "-",
        str(s.steps_to_ref) if s.steps_to_ref is not None else "-",
        f"{s.time_to_ref_s:.1f}" if s.time_to_ref_s is not None else "-",
        f"{s.train_time_s:.1f}", f"{s.opt_step_ms:.2f}" if math.isfinite(s.opt_step_ms) else "-",
        f"{s.state_bytes / 2**20:.2f}", s.status,
    ]


def rich_table(summaries: list[Summary], seeds: int, title: str) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    show_acc = any(s.val_acc is not None for s in summaries)
    for c in COLUMNS:
        if c != "val acc" or show_acc:
            table.add_column(c, justify="left" if c in ("optimizer", "family", "status") else "right")
    for s in summaries:
        cells = row(s, seeds)
        if not show_acc:
            del cells[COLUMNS.index("val acc")]
        table.add_row(*map(escape, cells), style="red" if s.diverged else None)
    return table


def write_csv(path: Path, summaries: list[Summary]) -> None:
    """Machine-readable table: one row per optimizer, numbers unformatted (empty when not applicable)."""
    def num(x: float | int | None) -> str:
        return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else repr(x)

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "family", "lr", "seeds", "diverged_seeds", "train_loss_mean", "train_loss_std",
                    "val_loss_mean", "val_loss_std", "val_loss_min", "val_loss_max", "val_acc_mean",
                    "steps_to_ref", "seconds_to_ref", "train_seconds", "opt_step_ms", "state_bytes", "status"])
        for s in summaries:
            tl = s.train_loss or (None, None)
            vl = s.val_loss or (None, None, None, None)
            w.writerow([s.label, s.family, num(s.lr), s.seeds, s.diverged, num(tl[0]), num(tl[1]), *map(num, vl),
                        num(s.val_acc), num(s.steps_to_ref), num(s.time_to_ref_s), num(s.train_time_s),
                        num(s.opt_step_ms), s.state_bytes, s.status])


def write_markdown(path: Path, summaries: list[Summary], seeds: int, title: str) -> None:
    """The table as GitHub Markdown (for docs and READMEs)."""
    show_acc = any(s.val_acc is not None for s in summaries)
    cols = [c for c in COLUMNS if c != "val acc" or show_acc]
    lines = [f"**{title}**", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if c in ("optimizer", "family", "status") else "---:" for c in cols) + "|"]
    for s in summaries:
        cells = row(s, seeds)
        if not show_acc:
            del cells[COLUMNS.index("val acc")]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def summary_json(s: Summary) -> dict[str, Any]:
    """``s`` as a dict for ``results.json``, with ``status``."""
    return {**asdict(s), "status": s.status}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict[str, Any]:
    import emerging_optimizers

    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
        "emerging_optimizers": getattr(emerging_optimizers, "__version__", "unknown"),
        "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "threads": threads,
    }


def _finite(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (strict JSON has no NaN/Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(_finite(payload), f, indent=1, allow_nan=False)
        f.write("\n")


def plot(path: Path, runs_by_label: dict[str, list[RunResult]], title: str, target: float | None,
         reference: str = "reference") -> None:
    """Two panels, validation loss against steps and against training seconds: the seed mean as a line,
    min..max over seeds shaded; diverged seeds are left out (an ``x`` marks where a fully diverged run stopped)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_step, ax_time = fig.subplots(1, 2, sharey=True)
    lows, highs = [], []
    for i, (label, runs) in enumerate(runs_by_label.items()):
        color = f"C{i % 10}"
        ok = [r for r in runs if not r.diverged]
        if not ok:
            r = runs[0]
            if r.eval_step:
                for ax, x in ((ax_step, r.eval_step), (ax_time, r.eval_time_s)):
                    ax.plot(x, r.metrics["val_loss"], color=color, label=f"{label} (diverged)")
                    ax.plot(x[-1:], [v if math.isfinite(v) else np.nan for v in r.metrics["val_loss"][-1:]],
                            "x", color=color)
            continue
        steps, vals, times = mean_curve(ok)
        n = len(steps)
        stack = np.array([r.metrics["val_loss"][:n] for r in ok])
        for ax, x in ((ax_step, steps), (ax_time, times)):
            note = f" ({len(runs) - len(ok)} diverged)" if len(ok) < len(runs) else ""
            ax.plot(x, vals, color=color, label=label + note)
            if len(ok) > 1:
                ax.fill_between(x, stack.min(0), stack.max(0), color=color, alpha=0.2, linewidth=0)
        lows.append(float(stack.min()))
        highs.append(float(stack[:, 1].max()) if n > 1 else float(stack.max()))
    if target is not None:
        for ax in (ax_step, ax_time):
            ax.axhline(target, color="0.5", linestyle=":", linewidth=1, label=f"{reference} final ({target:.3f})")
    if lows:
        lo, hi = min(lows), max(highs)
        pad = 0.05 * max(hi - lo, 1e-3)
        ax_step.set_ylim(lo - pad, hi + pad)
    ax_step.set_xlabel("step")
    ax_time.set_xlabel("training time (s)")
    ax_step.set_ylabel("validation loss")
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
    ax_step.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
