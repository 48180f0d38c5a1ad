"""``examples/fsdp2_charlm.py`` run for real: ``torch.distributed.run`` with 2 CPU processes (gloo).

A tiny model (2 blocks of width 64, context 32, global batch 8) for a few steps, so three launches fit in
well under a minute on 2 cores (each launch is mostly process start-up and imports):

* FSDP2, stopped after 3 of 6 steps with a checkpoint (``--stop-at 3 --ckpt``);
* FSDP2 resumed from it up to step 6 (``--resume``);
* DDP (``--ddp``, ``process_group=WORLD``), 6 steps straight.

Checks: exit code 0, every printed loss finite, the training loss went down, and the resumed FSDP2 run ends
where the uninterrupted DDP run does, step by step (same data, init and schedule; FSDP2 and DDP differ only by
the order of float sums, ~1e-7, and we read 4 printed decimals: tolerance 5e-4). Resuming without the
optimizer state (momentum, AdamW moments, step counts) was measured to move the step-5 loss by 7e-3.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fsdp2_charlm.py"
TINY = ["--steps", "6", "--log-every", "1", "--batch-size", "8", "--seq-len", "32", "--d-model", "64",
        "--layers", "2", "--heads", "4"]
TIMEOUT_S = 120

pytestmark = pytest.mark.distributed


def launch(*args: str) -> str:
    """Run the example on 2 processes; its stdout (rank 0's prints). Kills the whole launch on timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
           *TINY, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the ranks die with the launcher
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args)}: no result after {TIMEOUT_S} s\n{out}\n{err[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(args)}: exit code {proc.returncode}\n{out}\n{err[-4000:]}"
    return out


def parse(out: str) -> tuple[dict[int, float], float]:
    """``({step: train loss}, validation loss)`` from the example's output; both must be finite."""
    losses = {int(s): float(v) for s, v in re.findall(r"^step\s+(\d+)\s+train_loss\s+(\S+)", out, re.MULTILINE)}
    val = re.findall(r"^val_loss\s+(\S+)", out, re.MULTILINE)
    assert losses and len(val) == 1, f"no losses printed:\n{out}"
    assert all(math.isfinite(v) for v in losses.values()), out
    assert math.isfinite(float(val[0])), out
    return losses, float(val[0])


def test_fsdp2_checkpoint_resume_and_ddp(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    out = launch("--stop-at", "3", "--ckpt", str(ckpt))
    first, _ = parse(out)
    assert "FSDP2 on 2 ranks" in out and sorted(first) == [1, 2, 3], out
    assert (ckpt / ".metadata").is_file(), list(ckpt.iterdir())

    out = launch("--resume", str(ckpt))
    resumed, resumed_val = parse(out)
    assert "steps 3..6" in out and sorted(resumed) == [4, 5, 6], out

    out = launch("--ddp")
    ddp, ddp_val = parse(out)
    assert "DDP on 2 ranks" in out and sorted(ddp) == list(range(1, 7)), out
    assert ddp[6] < ddp[1], f"DDP: the training loss did not go down: {ddp}"
    assert resumed[6] < first[1], f"FSDP2: the training loss did not go down: {first} then {resumed}"
    for t in range(1, 7):  # checkpoint + resume under FSDP2 = one uninterrupted DDP run
        assert abs({**first, **resumed}[t] - ddp[t]) <= 5e-4, (t, first, resumed, ddp)
    assert abs(resumed_val - ddp_val) <= 5e-4, (resumed_val, ddp_val)
