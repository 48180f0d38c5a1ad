"""One training run: a task's model from a seed, one optimizer, a warm-up + cosine schedule.

Measured per run: the training loss of every step; the validation metrics at ``eval_points`` evenly
spaced steps (and at step 0); the cumulative training time at each of them, as wall clock and as process
CPU time (steadier on a shared machine), counting forward, backward and optimizer step but not evaluation;
the time of every ``optimizer.step()``; the bytes of every tensor in the optimizer state. A non-finite
training loss stops the run and marks it diverged.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from emerging_optimizers.cli.specs import OptimizerSpec, build_optimizer
from emerging_optimizers.cli.tasks import Problem, Schedule

__all__ = ["RunResult", "train_run", "state_bytes", "eval_steps"]

ProgressFn = Callable[[int, float], None]


@dataclass
class RunResult:
    label: str
    seed: int
    steps: int
    lr: float | None = None  # peak lr of the first param group
    diverged: bool = False
    diverged_at: int | None = None
    train_loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_time_s: list[float] = field(default_factory=list)
    eval_cpu_s: list[float] = field(default_factory=list)  # process CPU seconds (robust on a shared machine)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    opt_step_ms: float = float("nan")
    state_bytes: int = 0
    train_time_s: float = 0.0
    train_cpu_s: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of all distinct tensors in ``opt.state`` (and in the state of sub-optimizers it holds)."""
    seen: dict[int, torch.Tensor] = {}
    opts: list[Any] = [opt]
    for attr in vars(opt).values():  # a composite optimizer may keep its parts in a list or dict
        items = attr.values() if isinstance(attr, dict) else attr if isinstance(attr, (list, tuple)) else [attr]
        opts += [o for o in items if isinstance(o, torch.optim.Optimizer) and o is not opt]
    for o in opts:
        for t in _tensors(dict(o.state)):
            seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


def eval_steps(steps: int, eval_points: int) -> list[int]:
    """Step counts (0 .. steps) after which the model is evaluated: 0 and ``eval_points`` evenly spaced."""
    n = max(1, min(eval_points, steps))
    return sorted({0, *(round(steps * i / n) for i in range(1, n + 1))})


def train_run(problem: Problem, spec: OptimizerSpec, tuned: dict[str, Any], seed: int, steps: int,
              schedule: Schedule, eval_points: int, progress: ProgressFn | None = None) -> RunResult:
    """Train ``problem``'s model from ``seed`` with ``spec`` for ``steps`` steps; deterministic for fixed threads.

    Small optimizers stay on their eager step: under ``fused=None`` they would switch to their compiled step once
    their eager steps took a few seconds, at a step that depends on the machine's speed, and the compiled step may
    round differently in the last bits (FMA contraction).
    """
    from emerging_optimizers.scalar_optimizers.base import auto_fuse_after

    with auto_fuse_after(None):
        return _train_run(problem, spec, tuned, seed, steps, schedule, eval_points, progress)


def _train_run(problem: Problem, spec: OptimizerSpec, tuned: dict[str, Any], seed: int, steps: int,
               schedule: Schedule, eval_points: int, progress: ProgressFn | None = None) -> RunResult:
    torch.manual_seed(seed)
    model = problem.make_model()
    opt, kwargs = build_optimizer(spec, model, tuned)
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(10_007 * seed + 1)
    result = RunResult(spec.label, seed, steps, lr=base_lrs[0] if base_lrs else None,
                       kwargs={k: repr(v) for k, v in kwargs.items()})
    checkpoints = set(eval_steps(steps, eval_points))
    step_ms: list[float] = []
    elapsed = cpu = 0.0

    def evaluate(step: int) -> None:
        model.eval()
        metrics = problem.evaluate(model)
        model.train()
        result.eval_step.append(step)
        result.eval_time_s.append(elapsed)
        result.eval_cpu_s.append(cpu)
        for k, v in metrics.items():
            result.metrics.setdefault(k, []).append(v)

    evaluate(0)
    for t in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        factor = schedule(t)
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * factor
        loss = problem.loss(model, problem.sample_batch(gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            result.diverged, result.diverged_at = True, t
            result.train_loss.append(loss_value)
            break
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        elapsed += t2 - t0
        cpu += time.process_time() - c0
        step_ms.append((t2 - t1) * 1e3)
        result.train_loss.append(loss_value)
        if progress is not None:
            progress(t + 1, loss_value)
        if t + 1 in checkpoints:
            evaluate(t + 1)
            if not all(math.isfinite(v[-1]) for v in result.metrics.values()):
                result.diverged, result.diverged_at = True, t + 1
                break
    result.train_time_s, result.train_cpu_s = elapsed, cpu
    # the first step allocates the state; the median of the rest is the steady-state cost
    result.opt_step_ms = statistics.median(step_ms[1:] or step_ms) if step_ms else float("nan")
    result.state_bytes = state_bytes(opt)
    return result
