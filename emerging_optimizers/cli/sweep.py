"""``emopt sweep``: learning-rate robustness, the final validation loss of each optimizer over a grid of lrs.

The grid (:func:`plan`): by default ``--lrs`` are multipliers of each optimizer's base lr on the task (its tuned
lr, else its default; an ``lr=`` override in the spec replaces it), so one grid such as ``0.25 0.5 1 2 4`` serves
optimizers whose lrs differ by 10x; with ``--absolute`` they are the lrs themselves. An optimizer with two lrs
(``muon_adamw`` and the matrix optimizers run inside it: ``lr`` and ``adamw_lr``; ``torch_muon``: Muon's ``lr``
and AdamW's ``adamw_lr``) has both scaled by the same factor, so their ratio stays as tuned (with
``--absolute`` the value is the main ``lr`` and ``adamw_lr`` follows it by the tuned ratio).

Every grid point trains ``--seeds`` seeds with compare's training loop (:func:`~emerging_optimizers.cli.train.
train_run`: same model, batches, schedule and divergence rule), and is summarized by the mean, std, min and max
of the final validation loss over the seeds that did not diverge, and the number that diverged. The best point of
an optimizer is its lowest mean among the points where no seed diverged (else among all points); its basin
(:func:`near_best_range`) is the run of adjacent grid points that keep 95% of the best point's improvement over
the untrained model. Written:
``sweep.csv`` (one row per point), ``results.json`` (settings, environment, points with every run) and
``lr_sensitivity.png`` (final validation loss against the lr and against the multiplier, log x axes, a +-std
band over seeds, the best point starred, fully diverged points as ``x`` at the top).
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emerging_optimizers import registry
from emerging_optimizers.cli import specs
from emerging_optimizers.cli.specs import OptimizerSpec, UsageError
from emerging_optimizers.cli.train import RunResult

__all__ = ["LR_KEYS", "SECOND_LR_KEYS", "FILES", "NEAR_BEST", "GridPoint", "OptimizerPlan", "base_lrs", "plan",
           "best_point", "initial_loss", "near_best_range", "mean_std_text", "rich_table", "write_csv",
           "points_json", "plot"]

#: Main learning-rate keys (the first present is the x axis), then the second lr scaled with it.
LR_KEYS: tuple[str, ...] = ("lr", "learning_rate")
SECOND_LR_KEYS: tuple[str, ...] = ("adamw_lr",)
#: The files a sweep writes into ``--out``.
FILES: tuple[str, ...] = ("sweep.csv", "results.json", "lr_sensitivity.png")
#: "near best": a grid point that keeps all but this fraction of the best point's improvement over the untrained
#: model (:func:`near_best_range`).
NEAR_BEST = 0.05


@dataclass
class GridPoint:
    """One (optimizer, lr) point of the sweep and its runs (one per seed)."""

    label: str  # the optimizer as typed in --optimizers
    name: str
    multiplier: float  # lr / base lr
    lrs: dict[str, float]  # the lr values trained with: main key first (lr, adamw_lr for two-lr optimizers)
    spec: OptimizerSpec
    runs: list[RunResult] = field(default_factory=list)

    @property
    def lr(self) -> float:
        return next(iter(self.lrs.values()))

    def _ok(self) -> list[RunResult]:
        return [r for r in self.runs if not r.diverged]

    @property
    def diverged(self) -> int:
        return len(self.runs) - len(self._ok())

    @property
    def val_losses(self) -> list[float]:
        return [r.metrics["val_loss"][-1] for r in self._ok()]

    @property
    def val_mean(self) -> float | None:
        v = self.val_losses
        return statistics.fmean(v) if v else None

    @property
    def val_std(self) -> float | None:
        v = self.val_losses
        return (statistics.stdev(v) if len(v) > 1 else 0.0) if v else None

    @property
    def val_acc(self) -> float | None:
        ok = self._ok()
        return statistics.fmean(r.metrics["val_acc"][-1] for r in ok) if ok and "val_acc" in ok[0].metrics else None

    @property
    def train_time_s(self) -> float | None:
        return statistics.fmean(r.train_time_s for r in self.runs) if self.runs else None


@dataclass
class OptimizerPlan:
    """One optimizer of the sweep: its base lrs on the task and its grid points (ascending lr)."""

    spec: OptimizerSpec
    base: dict[str, float]  # base lr values, main key first
    tuned: dict[str, Any]  # the task's tuned values ({}: the optimizer's defaults)
    points: list[GridPoint]


def _lr_keys(name: str) -> tuple[str, ...]:
    """The lr keys of ``name``: the main one, then a second lr scaled with it (``adamw_lr``)."""
    if specs.is_baseline(name):
        from emerging_optimizers.cli import baselines

        return baselines.lr_keys(name)
    built, _ = specs.resolve(name)
    valid = registry.valid_kwargs(registry.get_optimizer_cls(built))
    main = [k for k in LR_KEYS if k in valid][:1]
    return tuple(main + [k for k in SECOND_LR_KEYS if k in valid])


def _defaults(name: str) -> dict[str, Any]:
    if specs.is_baseline(name):
        from emerging_optimizers.cli import baselines

        return baselines.default_kwargs(name)
    built, _ = specs.resolve(name)
    return specs.default_kwargs(registry.get_optimizer_cls(built))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def base_lrs(spec: OptimizerSpec, tuned: dict[str, Any]) -> dict[str, float]:
    """The lrs ``spec`` trains with on a task with tuned values ``tuned``: main key first (``lr``), then
    ``adamw_lr`` for the two-lr optimizers. :class:`UsageError` when it has no numeric lr to scale."""
    keys = _lr_keys(spec.name)
    if not keys:
        raise UsageError(f"{spec.label!r} has no learning-rate argument ({', '.join(LR_KEYS)}) to sweep.")
    _, kwargs = specs.constructor_kwargs(spec, tuned)
    defaults = _defaults(spec.name)
    out: dict[str, float] = {}
    for k in keys:
        value = kwargs.get(k, defaults.get(k))
        if not _is_number(value) or value <= 0:
            raise UsageError(f"Cannot sweep {spec.label!r}: its {k} is {value!r}, not a positive number; give one, "
                             f"e.g. {spec.name}:{k}=1e-3.")
        out[k] = float(value)
    return out


def plan(spec_list: list[OptimizerSpec], task: Any, values: list[float], absolute: bool) -> list[OptimizerPlan]:
    """The grid of every optimizer: ``values`` as multipliers of its base lrs, or (``absolute``) as its main lr
    with the second lr kept at the base ratio. Points in ascending lr; the lr keys become overrides."""
    values = sorted(set(values))
    out = []
    for s in spec_list:
        tuned = task.tuned(s.name)
        base = base_lrs(s, tuned)
        main = next(iter(base.values()))
        points = []
        for v in values:
            m = v / main if absolute else v
            lrs = {k: (v if absolute and i == 0 else b * m) for i, (k, b) in enumerate(base.items())}
            tag = f"lr={v:g}" if absolute else f"x{v:g}"
            point_spec = OptimizerSpec(f"{s.label} {tag}", s.name, {**s.overrides, **lrs})
            points.append(GridPoint(s.label, s.name, m, lrs, point_spec))
        out.append(OptimizerPlan(s, base, tuned, points))
    return out


def best_point(points: list[GridPoint]) -> GridPoint | None:
    """Lowest mean final validation loss among the points where no seed diverged (else among all points with a
    finite mean); None when every point diverged."""
    finite = [p for p in points if p.val_mean is not None and math.isfinite(p.val_mean)]
    if not finite:
        return None
    clean = [p for p in finite if p.diverged == 0]
    return min(clean or finite, key=lambda p: p.val_mean)  # type: ignore[arg-type, return-value]


def initial_loss(points: list[GridPoint]) -> float | None:
    """Mean validation loss of the untrained model (step 0) over the runs of ``points``."""
    vals = [r.metrics["val_loss"][0] for pt in points for r in pt.runs
            if r.metrics.get("val_loss") and math.isfinite(r.metrics["val_loss"][0])]
    return statistics.fmean(vals) if vals else None


def near_best_range(points: list[GridPoint], tol: float = NEAR_BEST) -> tuple[float, float] | None:
    """Multipliers ``(lo, hi)`` of the run of adjacent grid points around the best one that keep at least
    ``1 - tol`` of the best point's improvement over the untrained model (mean final validation loss at most
    ``best + tol * (initial - best)``) with no seed diverged: the width of the basin."""
    best = best_point(points)
    start = initial_loss(points)
    if best is None or best.val_mean is None or start is None:
        return None
    limit = best.val_mean + tol * max(start - best.val_mean, 0.0)

    def good(p: GridPoint) -> bool:
        return p.diverged == 0 and p.val_mean is not None and p.val_mean <= limit

    i = points.index(best)
    lo = hi = i
    while lo > 0 and good(points[lo - 1]):
        lo -= 1
    while hi < len(points) - 1 and good(points[hi + 1]):
        hi += 1
    return points[lo].multiplier, points[hi].multiplier


# ---------------------------------------------------------------------------------------------- output
def mean_std_text(mean: float | None, std: float | None, seeds: int) -> str:
    if mean is None:
        return "diverged"
    return f"{mean:.4f} ± {std:.4f}" if seeds > 1 else f"{mean:.4f}"


def _second(plans: list[OptimizerPlan]) -> bool:
    return any(len(p.base) > 1 for p in plans)


def rich_table(plans: list[OptimizerPlan], seeds: int, title: str) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    second = _second(plans)
    show_acc = any(pt.val_acc is not None for p in plans for pt in p.points)
    cols = ["optimizer", "x tuned", "lr", *(["adamw lr"] if second else []), "val loss", "min", "max",
            *(["val acc"] if show_acc else []), "diverged", "train s", "best"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("optimizer", "best") else "right")
    for p in plans:
        best = best_point(p.points)
        for i, pt in enumerate(p.points):
            vals = pt.val_losses
            cells = [pt.label if i == 0 else "", f"{pt.multiplier:.3g}", f"{pt.lr:.3g}"]
            if second:
                cells.append(f"{pt.lrs['adamw_lr']:.3g}" if "adamw_lr" in pt.lrs else "-")
            cells += [mean_std_text(pt.val_mean, pt.val_std, seeds), f"{min(vals):.4f}" if vals else "-",
                      f"{max(vals):.4f}" if vals else "-"]
            if show_acc:
                cells.append(f"{pt.val_acc:.3f}" if pt.val_acc is not None else "-")
            cells += [f"{pt.diverged}/{len(pt.runs)}",
                      f"{pt.train_time_s:.1f}" if pt.train_time_s is not None else "-", "*" if pt is best else ""]
            style = ("red" if pt.diverged == len(pt.runs) else "yellow" if pt.diverged
                     else "bold" if pt is best else None)
            table.add_row(*map(escape, cells), style=style, end_section=i == len(p.points) - 1)
    return table


def write_csv(path: Path, plans: list[OptimizerPlan]) -> None:
    """One row per grid point; numbers unformatted, empty when not applicable."""
    def num(x: float | int | None) -> str:
        return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else repr(x)

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "name", "multiplier", "lr", "adamw_lr", "seeds", "diverged_seeds", "val_loss_mean",
                    "val_loss_std", "val_loss_min", "val_loss_max", "val_acc_mean", "train_seconds_mean", "best"])
        for p in plans:
            best = best_point(p.points)
            for pt in p.points:
                vals = pt.val_losses
                w.writerow([pt.label, pt.name, num(pt.multiplier), num(pt.lr), num(pt.lrs.get("adamw_lr")),
                            len(pt.runs), pt.diverged, num(pt.val_mean), num(pt.val_std),
                            num(min(vals) if vals else None), num(max(vals) if vals else None), num(pt.val_acc),
                            num(pt.train_time_s), int(pt is best)])


def points_json(plans: list[OptimizerPlan]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(optimizers, points)`` for ``results.json``: per optimizer its base lrs, best point and near-best
    range; per point its lrs, summary and every run."""
    optimizers, points = [], []
    for p in plans:
        best = best_point(p.points)
        near = near_best_range(p.points)
        optimizers.append({
            "label": p.spec.label, "name": p.spec.name, "family": specs.family_of_name(p.spec.name),
            "overrides": {k: repr(v) for k, v in p.spec.overrides.items()},
            "tuned": {k: repr(v) for k, v in p.tuned.items()}, "base_lrs": p.base,
            "best": None if best is None else {"multiplier": best.multiplier, "lrs": best.lrs,
                                               "val_loss_mean": best.val_mean, "val_loss_std": best.val_std},
            "initial_val_loss": initial_loss(p.points),
            "near_best_multipliers": list(near) if near else None,
            "near_best_rule": f"keeps >= {1 - NEAR_BEST:.0%} of the best point's improvement over the initial "
                              "validation loss, no seed diverged, adjacent to the best",
        })
        for pt in p.points:
            vals = pt.val_losses
            points.append({
                "optimizer": pt.label, "name": pt.name, "multiplier": pt.multiplier, "lrs": pt.lrs,
                "seeds": len(pt.runs), "diverged_seeds": pt.diverged, "val_loss_mean": pt.val_mean,
                "val_loss_std": pt.val_std, "val_loss_min": min(vals) if vals else None,
                "val_loss_max": max(vals) if vals else None, "val_acc_mean": pt.val_acc,
                "train_seconds_mean": pt.train_time_s, "best": pt is best,
                "runs": [r.to_json() for r in pt.runs],
            })
    return optimizers, points


def plot(path: Path, plans: list[OptimizerPlan], title: str, absolute: bool) -> None:
    """Final validation loss against the (main) lr and against lr / base lr, log x axes: the seed mean as a
    line with a +-std band, the best point starred, fully diverged points as ``x`` at the top edge."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter
    from matplotlib.transforms import blended_transform_factory

    fig = Figure(figsize=(11, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax_lr, ax_rel = fig.subplots(1, 2, sharey=True)
    lows, highs, starts = [], [], []
    for i, p in enumerate(plans):
        color = f"C{i % 10}"
        ok = [pt for pt in p.points if pt.val_mean is not None and math.isfinite(pt.val_mean)]
        dead = [pt for pt in p.points if pt not in ok]
        best = best_point(p.points)
        base = next(iter(p.base.values()))
        label = f"{p.spec.label} (base lr {base:.3g}" + (f", adamw_lr {p.base['adamw_lr']:.3g})" if "adamw_lr" in p.base
                                                       else ")")
        for pt in p.points:
            starts += [r.metrics["val_loss"][0] for r in pt.runs if r.metrics.get("val_loss")
                       and math.isfinite(r.metrics["val_loss"][0])]
        for ax, xs in ((ax_lr, [pt.lr for pt in ok]), (ax_rel, [pt.multiplier for pt in ok])):
            if ok:
                mean = np.array([pt.val_mean for pt in ok])
                std = np.array([pt.val_std or 0.0 for pt in ok])
                ax.plot(xs, mean, "o-", color=color, label=label, markersize=4)
                if any(len(pt.val_losses) > 1 for pt in ok):
                    ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
                for pt, x in zip(ok, xs):
                    if pt.diverged:  # some seeds diverged: a hollow ring around the point
                        ax.plot([x], [pt.val_mean], "o", mfc="none", mec="red", markersize=9)
            if best is not None:
                bx = best.lr if ax is ax_lr else best.multiplier
                ax.plot([bx], [best.val_mean], "*", color=color, markersize=15, markeredgecolor="black",
                        zorder=5, label=None)
            top = blended_transform_factory(ax.transData, ax.transAxes)
            for pt in dead:
                ax.plot([pt.lr if ax is ax_lr else pt.multiplier], [0.98], "x", color=color, markersize=9,
                        markeredgewidth=2, transform=top, clip_on=False,
                        label=f"{p.spec.label}: diverged" if ax is ax_lr and pt is dead[0] and not ok else None)
        if ok:
            lows.append(min(pt.val_mean - (pt.val_std or 0.0) for pt in ok))
            highs.append(max(pt.val_mean + (pt.val_std or 0.0) for pt in ok))
    if lows:
        lo, hi = min(lows), max(highs)
        if starts:  # a point worse than the untrained model would squash the rest: cap at the initial loss
            hi = min(hi, 1.05 * max(starts))
        hi = max(hi, lo + 1e-3)
        pad = 0.05 * (hi - lo)
        ax_lr.set_ylim(lo - pad, hi + pad)
    for ax in (ax_lr, ax_rel):
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
    multipliers = sorted({pt.multiplier for p in plans for pt in p.points})
    if not absolute and multipliers:  # one grid for all: tick exactly the multipliers
        ax_rel.set_xticks(multipliers, [f"x{m:g}" for m in multipliers])
        ax_rel.set_xticks([], minor=True)
    else:
        ax_rel.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"x{x:g}"))
    ax_lr.set_xlabel("peak lr" + (" (given)" if absolute else "") + " (two-lr optimizers: the matrix lr)")
    ax_rel.set_xlabel("lr / base lr (tuned, else default)")
    ax_lr.set_ylabel("final validation loss")
    ax_lr.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
