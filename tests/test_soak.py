"""Soak test: every registered optimizer trains 2,000 steps, and checkpoint + resume every 250 steps is exact.

For each registered name (``emerging_optimizers.cli.specs.load_registry()``), a small real model -- an MLP
64 -> 32 -> 10 (GELU) on scikit-learn's bundled ``load_digits`` (all 1,797 images, pixels / 16) -- trains for
``STEPS`` steps with batch ``BATCH`` under the CLI's warm-up + cosine schedule (``cli.tasks.Schedule`` in a
``LambdaLR``), twice:

(a) uninterrupted;
(b) every ``EVERY`` steps: ``torch.save({"model", "opt", "sched", "rng"}, BytesIO)``, then a NEW model, a NEW
    optimizer and a NEW scheduler are built from scratch, loaded from the bytes with
    ``torch.load(..., weights_only=True)``, and training continues.

Asserted: the final params of (a) and (b) are bit-identical (``torch.equal``), all finite, and the loss on the
whole training set went down (final < initial).

Building follows the CLI: an optimizer with ``matrix_only = True`` runs inside ``MuonAdamW`` as its
``matrix_optimizer`` (``cli.specs.resolve``), with the params given as ``model.named_parameters()``; ``fc1.weight``
is the matrix side, ``head`` and the biases go to AdamW. Learning rates come from the ``mlp-digits`` task's tuned
values (``cli.tasks``) or, where that task has none, from ``tests/contract_cases.py``.

Determinism: batches are a fixed function of the step index (a table drawn once from a private
``torch.Generator``), the model is initialised under a fixed seed inside ``torch.random.fork_rng`` (building the
new model in (b) leaves the global RNG alone), and the global RNG state is saved in the checkpoint and restored,
in case an optimizer draws from it. One thread (``tests/conftest.py``).

Also asserted: the optimizer's and the scheduler's final ``state_dict()`` are identical too (so a further resume
stays exact). No registered optimizer draws from the global RNG (checked); the RNG state is saved regardless.

Time (torch 2.13 CPU, one thread): about 115-130 s CPU for all 31 names (4,000 steps each; the cost is per-op
overhead, so model and batch size barely matter: 16 hidden / batch 8 measured within noise of 32 / 16). Slowest:
psgd_pro ~10 s, the SOAP family ~6-7 s each, the MuonAdamW wraps ~3 s, scalar optimizers ~2 s. The table per
optimizer (CPU and wall seconds, losses, bit-identity): ``PYTHONPATH=. python tests/test_soak.py [names...]``.
"""

from __future__ import annotations

import io
import math
import sys
import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from emerging_optimizers import registry
from emerging_optimizers.cli import specs
from emerging_optimizers.cli.tasks import Schedule, get_task

STEPS, EVERY, BATCH, HIDDEN = 2000, 250, 16, 32
MODEL_SEED, BATCH_SEED = 0, 1234
#: Frobenius radius of ``fc1.weight`` for ``muon_hyperball`` (the default init has norm ~3.3).
HYPERBALL_RADIUS = 3.0

NAMES: list[str] = specs.load_registry()

#: Learning rates where the ``mlp-digits`` task has no tuned value: ``tests/contract_cases.py``'s (for a matrix
#: optimizer, as MuonAdamW's matrix-side ``lr``), and a value for ``muon_hyperball`` (``lr`` ~ angle per step).
#: Each entry is the constructor kwargs of the class that is built (after ``resolve``).
EXTRA_KWARGS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 3e-2},
    "ademamix": {"lr": 2e-2},
    "sim_ademamix": {"lr": 2e-3},
    "laprop": {"lr": 3e-2},
    "madam": {"lr": 3e-2},
    "rmsprop": {"lr": 1e-2},
    "signum": {"lr": 1e-2},
    "mxnet_signum": {"learning_rate": 1e-2},
    "adaptive_muon": {"lr": 3e-3},
    "mop": {"lr": 0.5},
    "polargrad": {"lr": 0.5},
    "scion": {"lr": 0.05},
    "spel": {"lr": 0.05},
    "muown": {"lr": 0.02},
    "muon_hyperball": {"lr": 0.02, "matrix_kwargs": {"hyperball_radius": HYPERBALL_RADIUS}},
}


class MLP(nn.Module):
    """64 -> ``HIDDEN`` -> 10 with GELU; ``fc1`` is a hidden matrix, ``head`` the output head (MuonAdamW's rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, HIDDEN)
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc1(x)))


_DATA: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, xb, yb)``: all 1,797 digits, and the batches ``xb[step]``, ``yb[step]`` (``[STEPS, BATCH, ...]``),
    drawn with replacement once from a private generator: the batch order is a function of the step index."""
    global _DATA
    if _DATA is None:
        datasets = pytest.importorskip("sklearn.datasets")
        bunch = datasets.load_digits()
        x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
        y = torch.tensor(bunch.target, dtype=torch.int64)
        gen = torch.Generator().manual_seed(BATCH_SEED)
        index = torch.randint(0, len(y), (STEPS, BATCH), generator=gen)
        _DATA = (x, y, x[index], y[index])
    return _DATA


def build_kwargs(name: str) -> tuple[str, dict[str, Any]]:
    """The registry name to build for ``name`` (``muon_adamw`` for a matrix optimizer) and its kwargs."""
    tuned = get_task("mlp-digits").tuned(name)
    spec = specs.OptimizerSpec(name, name)
    built, kwargs = specs.constructor_kwargs(spec, tuned or EXTRA_KWARGS.get(name, {}))
    return built, kwargs


def make_model(name: str) -> MLP:
    """A fresh model, the same for every call: initialised under a fixed seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = MLP()
    if name == "muon_hyperball":  # its params must lie on the sphere when the optimizer is built
        with torch.no_grad():
            model.fc1.weight.mul_(HYPERBALL_RADIUS / model.fc1.weight.norm())
    return model


def make_all(name: str) -> tuple[MLP, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    built, kwargs = build_kwargs(name)
    model = make_model(name)
    opt = registry.get_optimizer_cls(built)(model.named_parameters(), **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule.for_steps(STEPS))
    return model, opt, sched


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int) -> None:
    _, _, xb, yb = data()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(xb[step]), yb[step]).backward()
    opt.step()
    sched.step()


@torch.no_grad()
def full_loss(model: nn.Module) -> float:
    x, y, _, _ = data()
    return F.cross_entropy(model(x), y).item()


def checkpoint(model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "rng": torch.get_rng_state()}, buf)
    return buf.getvalue()


def resume(name: str, blob: bytes) -> tuple[MLP, torch.optim.Optimizer, Any]:
    """A new model, optimizer and scheduler, built from scratch and loaded from ``blob`` (``weights_only``)."""
    model, opt, sched = make_all(name)
    try:
        ckpt = torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends: the finding is the message
        pytest.fail(f"{name}: torch.load(weights_only=True) of its checkpoint failed: {type(exc).__name__}: {exc}")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    torch.set_rng_state(ckpt["rng"])
    return model, opt, sched


def run_uninterrupted(name: str) -> tuple[MLP, torch.optim.Optimizer, Any, float]:
    """(a): ``STEPS`` steps in one go; returns the model, optimizer, scheduler and the initial train loss."""
    model, opt, sched = make_all(name)
    loss0 = full_loss(model)
    for step in range(STEPS):
        train_step(model, opt, sched, step)
    return model, opt, sched, loss0


def run_resumed(name: str) -> tuple[MLP, torch.optim.Optimizer, Any]:
    """(b): a checkpoint every ``EVERY`` steps, resumed into new objects each time."""
    model, opt, sched = make_all(name)
    for step in range(STEPS):
        if step > 0 and step % EVERY == 0:
            model, opt, sched = resume(name, checkpoint(model, opt, sched))
        train_step(model, opt, sched, step)
    return model, opt, sched


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}.{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flatten(val, f"{prefix}[{i}]").items()}
    return {prefix: obj}


def state_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Entries of two state dicts that are not identical (tensors: same dtype, shape and bits)."""
    fa, fb = _flatten(a), _flatten(b)
    out = []
    for key in sorted(fa.keys() | fb.keys()):
        x, y = fa.get(key, "<missing>"), fb.get(key, "<missing>")
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            same = (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and x.shape == y.shape and torch.equal(x, y))
        else:
            same = type(x) is type(y) and x == y
        if not same:
            out.append(key)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_soak_resume_bit_identical(name: str) -> None:
    rng = torch.get_rng_state()
    model_a, opt_a, sched_a, loss0 = run_uninterrupted(name)
    loss_a = full_loss(model_a)
    torch.set_rng_state(rng)  # (b) sees the same global RNG as (a), should an optimizer draw from it
    model_b, opt_b, sched_b = run_resumed(name)

    params_a, params_b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    for n, p in params_a.items():
        assert torch.isfinite(p).all(), f"{name}: (a) param {n} is not finite after {STEPS} steps"
        assert torch.isfinite(params_b[n]).all(), f"{name}: (b) param {n} is not finite after {STEPS} steps"
    assert math.isfinite(loss_a) and loss_a < loss0, f"{name}: train loss did not go down: {loss0:.4f} -> {loss_a:.4f}"
    differ = {n: (p - params_b[n]).abs().max().item() for n, p in params_a.items() if not torch.equal(p, params_b[n])}
    assert not differ, (f"{name}: resuming every {EVERY} steps is not bit-identical to the uninterrupted run; "
                        f"max |a - b| per param: {differ}")
    # The resumed run also ends in the same optimizer and scheduler state (so a further resume stays exact).
    assert not (d := state_differences(opt_a.state_dict(), opt_b.state_dict())), \
        f"{name}: optimizer state after the resumed run differs from the uninterrupted one at {d[:8]}"
    assert not (d := state_differences(sched_a.state_dict(), sched_b.state_dict())), \
        f"{name}: scheduler state after the resumed run differs at {d[:8]}"


if __name__ == "__main__":  # time table: PYTHONPATH=. python tests/test_soak.py [names...]
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    total_cpu = total_wall = 0.0
    print(f"{'optimizer':16s} {'built':12s} {'cpu s':>6s} {'wall s':>6s} {'loss0':>7s} {'loss':>7s}  bit-identical")
    for name in sys.argv[1:] or NAMES:
        torch.manual_seed(0)
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            a, _, _, l0 = run_uninterrupted(name)
            b, _, _ = run_resumed(name)
        except (Exception, pytest.fail.Exception) as exc:  # a table row, not a test
            print(f"{name:16s} ERROR {type(exc).__name__}: {str(exc)[:200]}")
            continue
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        total_cpu, total_wall = total_cpu + cpu, total_wall + wall
        eq = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        print(f"{name:16s} {build_kwargs(name)[0]:12s} {cpu:6.2f} {wall:6.2f} {l0:7.4f} {full_loss(a):7.4f}  {eq}",
              flush=True)
    print(f"total: cpu {total_cpu:.1f} s, wall {total_wall:.1f} s")
