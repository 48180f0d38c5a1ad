"""emopt: list the optimizers, compare them on real data, sweep their learning rates, time their steps.

    emopt list                                   # every registered optimizer, its family and defaults
    emopt compare                                # AdamW vs Muon (whole model) vs Lion on Shakespeare, ~2 min
    emopt compare --task vit-mnist5k --optimizers adamw muon:lr=0.02 --seeds 3 --out runs/vit
    emopt compare --task mlp-digits --optimizers muon_adamw torch_muon torch_adamw   # vs torch.optim baselines
    emopt sweep --task mlp-digits --optimizers adamw torch_muon muon_adamw --lrs 0.25 0.5 1 2 4 --seeds 3
    emopt bench --optimizers adamw muon          # ms per optimizer step vs torch.optim

`emopt compare` and `emopt sweep` need the CLI dependencies (rich, matplotlib, scikit-learn for mlp-digits),
which come with the `cli` extra: pip install "emerging-optimizers[cli]" (from a checkout: pip install -e ".[cli]").
`emopt list` and `emopt bench` need only torch and numpy.

Exit status: 0 on success; 1 when a data package or a CLI dependency is missing, or (emopt list) when a module
of the package failed to import (listed with its family and error after the table); 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

from emerging_optimizers.cli import tasks as tasks_mod
from emerging_optimizers.cli.specs import UsageError

__all__ = ["main", "build_parser", "CLI_EXTRA_INSTALL"]

#: How to install what ``emopt compare`` needs beyond torch and numpy.
CLI_EXTRA_INSTALL = ('pip install "emerging-optimizers[cli]"   (from a checkout of the repository: '
                     'pip install -e ".[cli]")')
#: Third-party modules each command imports beyond torch and numpy, with their pip distribution names.
COMMAND_MODULES: dict[str, dict[str, str]] = {"compare": {"rich": "rich", "matplotlib": "matplotlib"},
                                               "sweep": {"rich": "rich", "matplotlib": "matplotlib"}}
#: Commands that train on a task (its data packages are checked before anything runs).
TASK_COMMANDS = ("compare", "sweep")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written; appends ``(default: X)`` to options whose default is not None/False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


#: What --help says about the torch.optim baselines (compare and sweep).
BASELINES_HELP = (
    "Besides the registered optimizers (`emopt list`), two torch.optim baselines: torch_muon, the Muon recipe "
    "with torch's optimizers (torch.optim.Muon on the hidden matrices, split as muon_adamw splits them, with "
    "lr=0.04, momentum=0.95, nesterov=True, weight_decay=0.1, adjust_lr_fn='original'; torch.optim.AdamW on the "
    "rest with adamw_lr=4e-3, adamw_betas=(0.9, 0.95), adamw_weight_decay=0.0; override any Muon argument by "
    "its name and any AdamW argument with an adamw_ prefix, e.g. torch_muon:lr=0.02,adamw_lr=3e-3), and "
    "torch_adamw (torch.optim.AdamW, torch's defaults, the task's tuned adamw lr).")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emopt", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", metavar="{list,compare,sweep,bench}")
    sub.required = True

    p_list = sub.add_parser("list", help="list every registered optimizer with its family and defaults",
                            description="Every registered optimizer, one line each: name, family, the parameters "
                            "it handles and its default hyperparameters.", formatter_class=_Formatter)
    p_list.set_defaults(func=cmd_list)

    task_help = "\n".join(f"  {t.name}: {t.summary}" for t in tasks_mod.TASKS.values())
    p_cmp = sub.add_parser(
        "compare", help="train one model with each optimizer and compare losses, speed and memory",
        description="Train the same model from the same seeds with each optimizer; print a table and write "
        "results.json, table.csv, table.md and val_loss.png under --out.\n\nWithout --out every run gets a fresh "
        "emopt_out/run-YYYYmmdd-HHMMSS. A given --out must be a new or empty directory: a directory holding "
        "anything (an earlier run) is refused before training starts, unless --overwrite is given."
        "\n\n" + BASELINES_HELP + "\n\nNeeds the CLI dependencies: " + CLI_EXTRA_INSTALL + "\n\nTasks:\n"
        + task_help, formatter_class=_Formatter)
    p_cmp.add_argument("--task", default="charlm-shakespeare", help="task name (see above)")
    p_cmp.add_argument("--optimizers", nargs="+", metavar="SPEC", default=None,
                       help="optimizers as NAME or NAME:key=value,... e.g. adamw muon:lr=0.02 "
                       "torch_muon:adamw_lr=3e-3 (default: the task's adamw, muon_adamw, lion; names from `emopt "
                       "list`, including the torch.optim baselines torch_muon and torch_adamw)")
    p_cmp.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the task's)")
    p_cmp.add_argument("--seeds", type=_positive_int, default=1, help="number of seeds (0..N-1) per optimizer")
    p_cmp.add_argument("--threads", type=_positive_int, default=1, help="torch intra-op threads (pinned)")
    p_cmp.add_argument("--batch-size", type=_positive_int, default=None, help="batch size (default: the task's)")
    p_cmp.add_argument("--eval-points", type=_positive_int, default=None,
                       help="number of validation evaluations after step 0 (default: the task's)")
    p_cmp.add_argument("--reference", default=None,
                       help="optimizer whose final validation loss the others must reach (default: adamw if "
                       "compared, else the first)")
    p_cmp.add_argument("--out", type=Path, default=None,
                       help="output directory; must be new or empty unless --overwrite is given (default: a fresh "
                       "emopt_out/run-YYYYmmdd-HHMMSS for every run)")
    p_cmp.add_argument("--overwrite", action="store_true",
                       help="write into a non-empty --out, replacing the results.json, table.csv, table.md and "
                       "val_loss.png of an earlier run (other files there are left alone)")
    p_cmp.add_argument("--no-progress", action="store_true", help="no live progress bars")
    p_cmp.set_defaults(func=cmd_compare)

    p_sweep = sub.add_parser(
        "sweep", help="learning-rate robustness: final validation loss of each optimizer over a grid of lrs",
        description="Train each optimizer at each learning rate of a grid, --seeds seeds each, with compare's "
        "training loop (same model, batches and warm-up + cosine schedule); print a table of the final validation "
        "loss (mean ± std over seeds, diverged seeds counted) and write sweep.csv, results.json and "
        "lr_sensitivity.png (final validation loss against the lr, log x axis, one line per optimizer with a "
        "±std band, its best point starred) under --out: how wide each optimizer's basin is."
        "\n\nBy default --lrs are MULTIPLIERS of each optimizer's base lr on the task (its tuned lr, else its "
        "default; an lr= override in the spec replaces it), so one grid serves optimizers whose lrs differ by "
        "10x. With --absolute they are the lrs themselves. An optimizer with two lrs (muon_adamw and the matrix "
        "optimizers run inside it: lr and adamw_lr; torch_muon: Muon's lr and AdamW's adamw_lr) has BOTH scaled "
        "by the multiplier, so their ratio stays as tuned; with --absolute the given value is its lr and adamw_lr "
        "follows at the tuned ratio."
        "\n\nWithout --out every sweep gets a fresh emopt_out/sweep-YYYYmmdd-HHMMSS. A given --out must be a new "
        "or empty directory unless --overwrite is given."
        "\n\n" + BASELINES_HELP + "\n\nNeeds the CLI dependencies: " + CLI_EXTRA_INSTALL + "\n\nTasks:\n"
        + task_help, formatter_class=_Formatter)
    p_sweep.add_argument("--task", default="charlm-shakespeare", help="task name (see above)")
    p_sweep.add_argument("--optimizers", nargs="+", metavar="SPEC", default=["adamw", "torch_muon", "muon_adamw"],
                         help="optimizers as NAME or NAME:key=value,... (as for compare)")
    p_sweep.add_argument("--lrs", nargs="+", type=_positive_float, metavar="X", default=[0.25, 0.5, 1.0, 2.0, 4.0],
                         help="the lr grid: multipliers of each optimizer's base lr, or lrs with --absolute")
    p_sweep.add_argument("--absolute", action="store_true",
                         help="--lrs are learning rates, not multipliers (the same values for every optimizer)")
    p_sweep.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds (0..N-1) per grid point")
    p_sweep.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the task's)")
    p_sweep.add_argument("--threads", type=_positive_int, default=1, help="torch intra-op threads (pinned)")
    p_sweep.add_argument("--batch-size", type=_positive_int, default=None, help="batch size (default: the task's)")
    p_sweep.add_argument("--eval-points", type=_positive_int, default=None,
                         help="number of validation evaluations after step 0 (default: the task's)")
    p_sweep.add_argument("--out", type=Path, default=None,
                         help="output directory; must be new or empty unless --overwrite is given (default: a "
                         "fresh emopt_out/sweep-YYYYmmdd-HHMMSS for every sweep)")
    p_sweep.add_argument("--overwrite", action="store_true",
                         help="write into a non-empty --out, replacing the sweep.csv, results.json and "
                         "lr_sensitivity.png of an earlier sweep (other files there are left alone)")
    p_sweep.add_argument("--no-progress", action="store_true", help="no live progress bars")
    p_sweep.set_defaults(func=cmd_sweep)

    p_bench = sub.add_parser(
        "bench", help="time optimizer steps on a GPT-like parameter set against torch.optim",
        description="Time optimizer.step() on random gradients for a GPT-like parameter set, interleaving our "
        "optimizers with torch.optim.AdamW (fused and foreach) and torch.optim.Muon (2-D matrices, Newton-Schulz "
        "in bf16) in one process; print the CPU, the median ms/step and the ratio to torch's fused AdamW. "
        "Progress goes to stderr. A variant whose steps would take more than --cap-s seconds is dropped and "
        "reported as over cap (torch.optim.Muon is estimated first, by a bf16 matmul probe, and not run at all "
        "when the estimate is over the cap: bf16 matmul is very slow on CPUs without bf16 units). The defaults "
        "take well under 2 minutes on a 2-core CPU.", formatter_class=_Formatter)
    p_bench.add_argument("--optimizers", nargs="+", metavar="SPEC", default=None,
                         help="our optimizers to time (default: adamw, muon, muon_adamw where registered)")
    p_bench.add_argument("--layers", type=_positive_int, default=6, help="transformer blocks")
    p_bench.add_argument("--dim", type=_positive_int, default=512, help="model width")
    p_bench.add_argument("--vocab", type=_positive_int, default=8192, help="vocabulary size")
    p_bench.add_argument("--steps", type=_positive_int, default=None,
                         help="timed steps per round (default: per variant, as many as take about 0.2 s)")
    p_bench.add_argument("--rounds", type=_positive_int, default=3, help="interleaved rounds")
    p_bench.add_argument("--warmup", type=_positive_int, default=1,
                         help="steps first, not in the results (state, compilation; they count against --cap-s)")
    p_bench.add_argument("--threads", type=_positive_int, default=1, help="torch intra-op threads")
    p_bench.add_argument("--cap-s", type=_positive_float, default=30.0,
                         help="seconds of steps (warm-up included) one variant may take; one that would take "
                         "longer is dropped and reported as over cap")
    p_bench.add_argument("--no-torch", action="store_true", help="skip the torch.optim baselines")
    p_bench.set_defaults(func=cmd_bench)
    return parser


# ---------------------------------------------------------------------------------------------- list
def cmd_list(args: argparse.Namespace) -> int:
    from emerging_optimizers import registry
    from emerging_optimizers.cli import specs

    names = specs.load_registry()
    width = max(map(len, names), default=4)
    rows = []
    for name in names:
        cls = registry.get_optimizer_cls(name)
        family = specs.family_of(cls)
        if specs.is_whole_model(name):
            scope = "whole model"
        elif getattr(cls, "matrix_only", False):
            scope = "matrices"
        else:
            scope = "any"
        defaults = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                            for k, v in specs.default_kwargs(cls).items())
        rows.append((name, family, scope, defaults))
    fw = max((len(r[1]) for r in rows), default=6)
    print(f"{'name':<{width}}  {'family':<{fw}}  {'params':<11}  defaults")
    for name, family, scope, defaults in rows:
        print(f"{name:<{width}}  {family:<{fw}}  {scope:<11}  {defaults}")
    print(f"\n{len(rows)} optimizers. 'matrices' ones run inside {specs.WHOLE_MODEL} for `emopt compare`.")
    _list_baselines()
    failed = specs.import_errors()
    if not failed:
        return 0
    # a family that fails to import is shown, never silently left out: its optimizers are missing above
    print(f"\nFAILED TO IMPORT: {len(failed)} module(s) of the package; their optimizers are missing above:")
    mw = max(map(len, failed))
    for module, error in failed.items():
        print(f"  {specs.family_of_module(module):<{fw}}  {module:<{mw}}  {error}")
    print(f"emopt list: error: {len(failed)} module(s) failed to import: "
          + ", ".join(f"{m} ({specs.family_of_module(m)})" for m in failed), file=sys.stderr)
    return 1


def _list_baselines() -> None:
    """The torch.optim baselines that `emopt compare` and `emopt sweep` accept besides the registered names."""
    from emerging_optimizers.cli import baselines

    print("\nbaselines (torch.optim): not registered optimizers; `emopt compare` and `emopt sweep` accept them")
    bw = max(map(len, baselines.BASELINES))
    fw = len(baselines.FAMILY)
    for b in baselines.BASELINES.values():
        defaults = dict(b.defaults())
        if b.name == "torch_adamw":
            defaults["lr"] = "<the task's tuned adamw lr>"
        else:  # the recipe's values first
            defaults = {**{k: defaults[k] for k in baselines.TORCH_MUON_RECIPE}, **defaults}
        text = " ".join(f"{k}={v}" if k == "lr" and isinstance(v, str) and v.startswith("<")
                        else f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in defaults.items())
        print(f"{b.name:<{bw}}  {baselines.FAMILY:<{fw}}  {b.scope:<11}  {text}")
        print(f"{'':<{bw}}  {'':<{fw}}  {'':<11}  ({b.summary})")


# ---------------------------------------------------------------------------------------------- compare
def _console() -> Any:
    from rich.console import Console

    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal:  # logs and pipes: wide enough for the table
        console = Console(file=sys.stdout, highlight=False, width=200)
    return console


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from emerging_optimizers.cli import report, specs

    task = tasks_mod.get_task(args.task)
    spec_list = specs.parse_specs(args.optimizers or list(task.default_optimizers))
    labels = [s.label for s in spec_list]
    if args.reference is not None and args.reference not in labels:
        raise UsageError(f"--reference {args.reference!r} is not one of the compared optimizers: {', '.join(labels)}.")
    reference = args.reference or next((s.label for s in spec_list if s.name == "adamw"), labels[0])
    setup = _run_setup(args, task, "compare", "run")
    if setup is None:
        return 1
    steps, batch_size, eval_points, seeds, out, problem = setup
    console = _console()
    # build every optimizer once before training anything, so a bad value fails now and not after minutes
    for s in spec_list:
        specs.build_optimizer(s, problem.make_model(), task.tuned(s.name))
    families = {s.label: specs.family_of_name(s.name) for s in spec_list}

    console.print(f"[bold]{task.name}[/bold]: {task.summary}; {steps} steps x {len(seeds)} seed(s), batch "
                  f"{batch_size}, {args.threads} thread(s); optimizers: {escape(', '.join(labels))}")
    t_start = time.perf_counter()
    runs = _train_all(console, problem, task, spec_list, seeds, steps, eval_points, args.threads, args.no_progress)
    total_s = time.perf_counter() - t_start

    summaries, target = report.summarize(runs, families, reference)
    title = (f"{task.name}: {steps} steps, {len(seeds)} seed(s); reference {reference} (final val loss {target:.4f})"
             if target is not None else f"{task.name}: {steps} steps; reference {reference} diverged")
    console.print(report.rich_table(summaries, len(seeds), escape(title)))
    _print_untuned(console, task, spec_list)

    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "table.csv", summaries)
    report.write_markdown(out / "table.md", summaries, len(seeds), title)
    report.plot(out / "val_loss.png", runs, f"{task.name}: validation loss ({len(seeds)} seed(s), "
                f"{args.threads} thread(s))", target, reference)
    schedule = task.schedule(steps)
    settings = {
        "command": ["emopt", *(sys.argv[1:] if args.argv is None else args.argv)],
        "task": task.name, "task_doc": task.doc, "steps": steps, "seeds": seeds, "batch_size": batch_size,
        "threads": args.threads, "eval_points": eval_points, "reference": reference,
        "schedule": {"kind": "linear warm-up + cosine", "warmup_steps": schedule.warmup_steps,
                     "final_lr_fraction": schedule.final},
        "optimizers": [{"label": s.label, "name": s.name, "overrides": {k: repr(v) for k, v in s.overrides.items()},
                        "tuned": {k: repr(v) for k, v in task.tuned(s.name).items()}} for s in spec_list],
    }
    report.write_json(out / "results.json", {
        "settings": settings, "environment": report.environment(args.threads), "total_seconds": total_s,
        "reference_final_val_loss": target,
        "summary": [report.summary_json(s) for s in summaries],
        "runs": {label: [r.to_json() for r in rs] for label, rs in runs.items()},
    })
    console.print(escape(f"total {total_s:.0f} s; wrote {out / 'results.json'}, {out / 'table.csv'}, "
                         f"{out / 'table.md'}, {out / 'val_loss.png'}"))
    return 0


def _print_untuned(console: Any, task: tasks_mod.Task, spec_list: list[Any]) -> None:
    """Name the optimizers that train with values not tuned on ``task`` (and no lr given by the user)."""
    from rich.markup import escape

    from emerging_optimizers.cli import baselines, specs

    untuned = [s for s in spec_list if not task.tuned(s.name) and not {"lr", "learning_rate"} & set(s.overrides)]
    ours = [s.label for s in untuned if not specs.is_baseline(s.name)]
    if ours:
        console.print(escape(f"not tuned for {task.name} (optimizer defaults): {', '.join(ours)}"))
    for s in untuned:
        if specs.is_baseline(s.name):
            console.print(escape(f"not tuned for {task.name}: {s.label} ({baselines.BASELINES[s.name].untuned_note})"))


def _run_setup(args: argparse.Namespace, task: tasks_mod.Task, command: str,
               prefix: str) -> tuple[int, int, int, list[int], Path, Any] | None:
    """What ``compare`` and ``sweep`` share before training: steps, batch size, evaluation points and seeds (the
    task's unless given), the checked output directory (a fresh ``emopt_out/<prefix>-<timestamp>`` by default)
    and the loaded problem; None (after printing the error) when the task's data is missing."""
    from emerging_optimizers.cli.data import MissingDataError

    steps = args.steps or task.steps
    batch_size = args.batch_size or task.batch_size
    eval_points = args.eval_points or task.eval_points
    out: Path = args.out if args.out is not None else _fresh_run_dir(Path("emopt_out"), prefix)
    _check_out_dir(out, args.overwrite)
    try:
        problem = task.load(batch_size)
    except MissingDataError as exc:
        print(f"emopt {command}: error: {exc}", file=sys.stderr)
        return None
    return steps, batch_size, eval_points, list(range(args.seeds)), out, problem


def _fresh_run_dir(root: Path, prefix: str = "run") -> Path:
    """``root/<prefix>-<UTC timestamp>`` (``-2``, ``-3``, ... if taken): a new directory for every default run."""
    import time

    base = root / time.strftime(f"{prefix}-%Y%m%d-%H%M%S", time.gmtime())
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before anything trains, an ``--out`` that is a file, or a directory holding anything without
    ``--overwrite`` (an earlier run's results are never replaced by accident)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a directory; choose another --out.")
    if out.is_dir() and not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise UsageError(f"--out {str(out)!r} is not empty ({shown}): it holds an earlier run or other files. "
                             "Choose a new directory, or pass --overwrite to replace the earlier results.")


def _train_all(console: Any, problem: Any, task: tasks_mod.Task, spec_list: list[Any], seeds: list[int], steps: int,
               eval_points: int, threads: int, no_progress: bool) -> dict[str, list[Any]]:
    """Every (seed, optimizer) run, seeds outermost, with ``threads`` torch threads; a progress bar per run."""
    import torch
    from rich.markup import escape

    from emerging_optimizers.cli.train import RunResult, train_run

    schedule = task.schedule(steps)
    runs: dict[str, list[RunResult]] = {s.label: [] for s in spec_list}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _progress(console, disable=no_progress) as progress:
            for seed in seeds:
                for s in spec_list:
                    name = escape(f"{s.label} seed {seed}")
                    bar = progress.add_task(name, total=steps, loss=float("nan"), rate=0.0)
                    t0 = time.perf_counter()

                    def on_step(step: int, loss: float, bar: Any = bar, t0: float = t0) -> None:
                        rate = step / max(time.perf_counter() - t0, 1e-9)
                        progress.update(bar, completed=step, loss=loss, rate=rate)

                    r = train_run(problem, s, task.tuned(s.name), seed, steps, schedule, eval_points, on_step)
                    if r.diverged:
                        progress.update(bar, description=f"{name} [red]diverged at step {r.diverged_at}[/red]")
                    if no_progress:
                        result = (f"diverged at step {r.diverged_at}" if r.diverged
                                  else f"val loss {r.metrics['val_loss'][-1]:.4f}")
                        console.print(f"{name}: {result} ({r.train_time_s:.1f} s)")
                    runs[s.label].append(r)
    finally:
        torch.set_num_threads(old_threads)
    return runs


def _progress(console: Any, disable: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.1f} steps/s"),
                    TimeElapsedColumn(), console=console, disable=disable)


# ---------------------------------------------------------------------------------------------- sweep
def cmd_sweep(args: argparse.Namespace) -> int:
    import torch
    from rich.markup import escape

    from emerging_optimizers.cli import report, specs
    from emerging_optimizers.cli import sweep as sweep_mod
    from emerging_optimizers.cli.train import train_run

    task = tasks_mod.get_task(args.task)
    spec_list = specs.parse_specs(args.optimizers)
    plans = sweep_mod.plan(spec_list, task, args.lrs, args.absolute)
    setup = _run_setup(args, task, "sweep", "sweep")
    if setup is None:
        return 1
    steps, batch_size, eval_points, seeds, out, problem = setup
    console = _console()
    # build every grid point once before training anything: a bad value fails now, not after minutes
    for p in plans:
        for pt in p.points:
            specs.build_optimizer(pt.spec, problem.make_model(), p.tuned)
    env = report.environment(args.threads)
    n_runs = sum(len(p.points) for p in plans) * len(seeds)
    grid = ("lrs " if args.absolute else "lr multipliers ") + " ".join(f"{v:g}" for v in sorted(set(args.lrs)))
    console.print(f"[bold]{task.name}[/bold]: {task.summary}; {steps} steps, batch {batch_size}; {grid}; "
                  f"{len(seeds)} seed(s); {n_runs} runs")
    console.print(escape(f"CPU: {env['cpu']} ({env['cpu_count']} cores), {args.threads} thread(s); torch "
                         f"{env['torch']}"))
    for p in plans:
        base = ", ".join(f"{k} {v:.3g}" for k, v in p.base.items())
        origin = "tuned" if p.tuned or {"lr", "learning_rate"} & set(p.spec.overrides) else \
            "recipe" if p.spec.name == "torch_muon" else "default"
        console.print(escape(f"  {p.spec.label}: base {base} ({origin})"))

    schedule = task.schedule(steps)
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with _progress(console, disable=args.no_progress) as progress:
            overall = progress.add_task("sweep", total=n_runs, loss=float("nan"), rate=0.0)
            for p in plans:
                for pt in p.points:
                    for seed in seeds:
                        name = escape(f"{pt.spec.label} seed {seed}")
                        bar = progress.add_task(name, total=steps, loss=float("nan"), rate=0.0)
                        t0 = time.perf_counter()

                        def on_step(step: int, loss: float, bar: Any = bar, t0: float = t0) -> None:
                            rate = step / max(time.perf_counter() - t0, 1e-9)
                            progress.update(bar, completed=step, loss=loss, rate=rate)

                        pt.runs.append(train_run(problem, pt.spec, p.tuned, seed, steps, schedule, eval_points,
                                                 on_step))
                        progress.remove_task(bar)
                        last = pt.runs[-1].train_loss
                        progress.update(overall, advance=1, loss=last[-1] if last else float("nan"),
                                        rate=sum(len(r.train_loss) for p_ in plans for q in p_.points
                                                 for r in q.runs) / max(time.perf_counter() - t_start, 1e-9))
                    lrs = ", ".join(f"{k} {v:.3g}" for k, v in pt.lrs.items())
                    result = sweep_mod.mean_std_text(pt.val_mean, pt.val_std, len(seeds))
                    console.print(escape(f"{pt.spec.label} ({lrs}): val loss {result}, {pt.diverged}/{len(pt.runs)} "
                                         f"diverged ({sum(r.train_time_s for r in pt.runs):.1f} s)"))
    finally:
        torch.set_num_threads(old_threads)
    total_s = time.perf_counter() - t_start

    title = (f"{task.name}: final validation loss over {grid}; {steps} steps, {len(seeds)} seed(s); "
             f"{env['cpu']}, {args.threads} thread(s)")
    console.print(sweep_mod.rich_table(plans, len(seeds), escape(title)))
    for p in plans:
        best = sweep_mod.best_point(p.points)
        near = sweep_mod.near_best_range(p.points)
        if best is None:
            console.print(escape(f"{p.spec.label}: diverged at every lr"))
            continue
        keep = f"{1 - sweep_mod.NEAR_BEST:.0%} of its improvement"
        width = ("" if near is None else f"; only x{near[0]:.3g} keeps {keep}" if near[0] == near[1]
                 else f"; x{near[0]:.3g} to x{near[1]:.3g} keep {keep} ({near[1] / near[0]:.3g}x wide)")
        console.print(escape(f"{p.spec.label}: best x{best.multiplier:.3g} (lr {best.lr:.3g}), val loss "
                             f"{sweep_mod.mean_std_text(best.val_mean, best.val_std, len(seeds))}{width}"))
    _print_untuned(console, task, spec_list)

    out.mkdir(parents=True, exist_ok=True)
    sweep_mod.write_csv(out / "sweep.csv", plans)
    sweep_mod.plot(out / "lr_sensitivity.png", plans, f"{task.name}: final validation loss vs lr ({steps} steps, "
                   f"{len(seeds)} seed(s), {args.threads} thread(s))", args.absolute)
    optimizers, points = sweep_mod.points_json(plans)
    settings = {
        "command": ["emopt", *(sys.argv[1:] if args.argv is None else args.argv)],
        "task": task.name, "task_doc": task.doc, "steps": steps, "seeds": seeds, "batch_size": batch_size,
        "threads": args.threads, "eval_points": eval_points, "lrs": sorted(set(args.lrs)), "absolute": args.absolute,
        "lr_scaling": "every lr of an optimizer (lr, adamw_lr) scaled by the same factor; with absolute, the "
                      "given value is the main lr",
        "schedule": {"kind": "linear warm-up + cosine", "warmup_steps": schedule.warmup_steps,
                     "final_lr_fraction": schedule.final},
    }
    report.write_json(out / "results.json", {"settings": settings, "environment": env, "total_seconds": total_s,
                                             "optimizers": optimizers, "points": points})
    console.print(escape(f"total {total_s:.0f} s; wrote {out / 'sweep.csv'}, {out / 'results.json'}, "
                         f"{out / 'lr_sensitivity.png'}"))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from emerging_optimizers.cli import bench

    return bench.run(args)


# ---------------------------------------------------------------------------------------------- entry point
def _missing_modules(args: argparse.Namespace) -> list[str]:
    """pip names of the third-party modules ``args.command`` needs (and its task, for compare) that cannot be
    imported; the core package needs only torch and numpy, the rest comes with the ``cli`` extra."""
    needed = dict(COMMAND_MODULES.get(args.command, {}))
    if args.command in TASK_COMMANDS:
        task = tasks_mod.TASKS.get(args.task)  # an unknown task is reported later, as a usage error
        needed.update(task.requires if task is not None else {})
    missing = []
    for module, dist in needed.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    return missing


def main(argv: list[str] | None = None) -> int:
    """Run ``emopt`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return int(exc.code or 0)
    args.argv = argv
    missing = _missing_modules(args)
    if missing:
        print(f"emopt {args.command}: error: missing dependenc{'ies' if len(missing) > 1 else 'y'} "
              f"{', '.join(missing)}. emopt's tables, progress bars, plots and data sets come with the CLI "
              f"extra; install it with:\n    {CLI_EXTRA_INSTALL}", file=sys.stderr)
        return 1
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"emopt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
