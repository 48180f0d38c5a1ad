"""benchmarks/gpu_check.py: its CPU dry run (every section, tiny sizes) ends with exit 0 and one table that lists
every registered optimizer and every section; without CUDA the default run says so and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import emerging_optimizers as eo

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
SECTIONS = ["1 environment", "2 correctness", "2 fused", "3 bf16 Newton-Schulz", "4 torch.compile", "5 speed",
            "6 NCCL"]


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO), env=env)


def _table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| section |"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def test_cpu_dry_run_lists_every_optimizer_and_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.md"
    # --budget-s 60 plus the watchdog's 40 s grace bound the script; the subprocess timeout is a backstop
    proc = _run("--device", "cpu", "--small", "--budget-s", "60", "--out", str(out), timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    assert rows and all(len(r) == 4 for r in rows), proc.stdout[-3000:]
    assert out.read_text().strip().endswith(proc.stdout.strip().splitlines()[-1])  # the same table in the file

    sections = {r[0] for r in rows}
    for section in SECTIONS:
        assert section in sections, f"section {section!r} missing from the table"
    correctness = [r[1] for r in rows if r[0] == "2 correctness"]
    for name in eo.get_optimizer_name_list():
        assert any(item == name or item.startswith(name + "-") for item in correctness), f"{name} not in the table"
    # every row has a verdict, and the harness itself did not crash
    assert all(r[2] for r in rows)
    assert "harness crashed" not in proc.stdout
    assert "Traceback" not in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so_and_exits_0() -> None:
    proc = _run(timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device: nothing to check" in proc.stdout
