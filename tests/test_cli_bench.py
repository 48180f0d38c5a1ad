"""Tests of ``emopt bench``: the CPU line, progress, the per-variant time cap and failures.

The end-to-end runs use a tiny parameter set (one block of width 64, vocabulary 128: about 0.1M parameters, far
below the size at which a fused step is compiled), so the file takes a few seconds. The cap is exercised with
stand-in optimizers whose steps are counted: what is asserted is how many steps ran, never how long they took.
"""

from __future__ import annotations

import re
import time

import pytest
import torch

from emerging_optimizers.cli import bench
from emerging_optimizers.cli.main import main

TINY = ["bench", "--layers", "1", "--dim", "64", "--vocab", "128"]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([*TINY, *argv])
    out, err = capsys.readouterr()
    return code, out, err


class _VirtualTime:
    """Stands in for the ``time`` module inside ``bench`` (which only calls ``perf_counter``): a clock that only
    the stand-in optimizers advance, so what the cap decides does not depend on how loaded the machine is."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def vtime(monkeypatch: pytest.MonkeyPatch) -> _VirtualTime:
    clock = _VirtualTime()
    monkeypatch.setattr(bench, "time", clock)
    return clock


class _Counted:
    """A stand-in optimizer: ``step()`` counts, takes ``delays[i]`` seconds (the last one repeats) of the virtual
    clock ``vtime`` (real sleeps without one), or raises."""

    def __init__(self, delays: list[float] | None = None, fail_at: int | None = None,
                 vtime: _VirtualTime | None = None) -> None:
        self.delays = delays or [0.0]
        self.fail_at = fail_at
        self.vtime = vtime
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("boom\nsecond line")
        delay = self.delays[min(self.steps - 1, len(self.delays) - 1)]
        if self.vtime is None:
            time.sleep(delay)
        else:
            self.vtime.now += delay


def _variant(label: str, opt: _Counted) -> bench.Variant:
    return bench.Variant(label, opt, 10, False)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- end to end
def test_bench_prints_cpu_progress_and_table(capsys):
    code, out, err = _run(capsys, "--rounds", "2", "--steps", "2", "--optimizers", "adamw", "muon")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == bench.cpu_description()  # the CPU line comes first (threads as set by --threads: 1)
    assert lines[0].startswith(f"CPU: {bench.cpu_model()} (") and f"torch {torch.__version__}" in lines[0]
    assert "torch threads 1" in lines[0]
    assert "torch.optim.Muon runs its Newton-Schulz in bf16" in out and "GFLOP/s" in out
    # progress on stderr: a line per variant built and warmed up, one per round naming every variant
    for label in ("torch AdamW fused", "torch AdamW foreach", bench.TORCH_MUON, "adamw", "muon"):
        assert re.search(rf"built {re.escape(label)} in ", err)
        assert re.search(rf"{re.escape(label)}: warmed up, 1 step\(s\)", err)
    rounds = [line for line in err.splitlines() if re.search(r"\] round \d/2:", line)]
    assert len(rounds) == 2
    for line in rounds:
        assert re.search(r"muon [\d.]+ ms \(2 steps\)", line) and "torch AdamW fused" in line
    # the table: a header, one row per variant with numbers, the total at the end
    header = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    assert "ms/step" in lines[header] and "x AdamW fused" in lines[header] and "x torch Muon" in lines[header]
    rows = {line.split("  ")[0].strip(): line for line in lines[header + 1:header + 6]}
    assert set(rows) == {"torch AdamW fused", "torch AdamW foreach", bench.TORCH_MUON, "adamw", "muon"}
    assert all("over cap" not in row for row in rows.values())
    assert re.search(r"^muon\s+[\d.]+M\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", rows["muon"])  # ratio to torch Muon
    assert re.match(r"total [\d.]+ s$", lines[-1])


def test_bench_auto_steps_and_no_torch(capsys):
    code, out, err = _run(capsys, "--rounds", "1", "--no-torch", "--optimizers", "adamw")
    assert code == 0, err
    assert "auto steps" in out and "torch AdamW" not in out and "torch.optim.Muon" not in out
    assert re.search(r"round 1/1: adamw [\d.]+ ms", err)


def test_tiny_cap_reports_over_cap_instead_of_waiting(capsys):
    code, out, err = _run(capsys, "--rounds", "3", "--steps", "5", "--warmup", "2", "--cap-s", "0.0001",
                          "--optimizers", "adamw", "muon")
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    rows = lines[header + 1:header + 6]
    assert len(rows) == 5 and all("over cap (" in row for row in rows), rows
    # the torch Muon estimate (a probe) is over a 0.1 ms cap: not run at all; the others stop after one step
    assert re.search(rf"{re.escape(bench.TORCH_MUON)}\s.*over cap \(est\. [\d.e-]+ s/step, not run\)", out)
    for label in ("torch AdamW fused", "torch AdamW foreach", "adamw", "muon"):
        assert re.search(rf"^{re.escape(label)}\s.*over cap \([\d.e-]+ s for 1 step\)$", out, re.M)
    assert err.count("), dropped") == 5 and "every variant dropped: 3 round(s) not run" in err
    assert "round 1/3" not in err


def test_cap_must_be_positive(capsys):
    code, _, err = _run(capsys, "--cap-s", "0")
    assert code == 2 and "--cap-s" in err


# ---------------------------------------------------------------------------------------------- the cap
def test_first_step_over_cap_drops_the_variant_at_once(vtime):
    slow, fast = _Counted([0.05], vtime=vtime), _Counted(vtime=vtime)
    variants = [_variant("slow", slow), _variant("fast", fast)]
    bench.time_variants(variants, 1, 3, 2, cap_s=0.01)
    assert slow.steps == 1 and variants[0].over_cap and variants[0].ms == []  # not its second warm-up step
    assert variants[0].result() == f"over cap ({bench._secs(variants[0].used_s)} s for 1 step)"
    assert fast.steps == 2 + 3 and len(variants[1].ms) == 3 and not variants[1].over_cap


def test_estimate_over_cap_means_not_run(vtime):
    opt = _Counted(vtime=vtime)
    v = _variant("estimated", opt)
    v.step_s = 5.0  # as the bf16 probe sets it for torch Muon
    bench.time_variants([v], 1, 2, 1, cap_s=1.0)
    assert opt.steps == 0 and v.over_cap and v.result() == "over cap (est. 5 s/step, not run)"


def test_variant_that_slows_down_is_dropped_before_its_rounds_run_out(vtime):
    opt = _Counted([0.0, 0.1], vtime=vtime)  # warm-up instant, then 0.1 s a step
    v = _variant("slows", opt)
    bench.time_variants([v], 1, 4, 1, cap_s=0.25)
    assert v.over_cap and opt.steps < 1 + 4 and len(v.ms) == opt.steps - 1
    assert v.result().startswith("over cap (") and v.result().endswith(f"for {opt.steps} steps)")


def test_no_cap_runs_everything(vtime):
    opt = _Counted(vtime=vtime)
    v = _variant("free", opt)
    bench.time_variants([v], 2, 3, 1, cap_s=None)
    assert opt.steps == 1 + 2 * 3 and len(v.ms) == 3 and not v.over_cap


def test_failing_step_is_reported_and_the_others_go_on(capsys, vtime):
    bad, good = _Counted(fail_at=2, vtime=vtime), _Counted(vtime=vtime)
    variants = [_variant("bad", bad), _variant("good", good)]
    bench.time_variants(variants, 1, 2, 1, cap_s=10.0, progress=True)
    assert variants[0].failed == "RuntimeError: boom" and variants[0].result() == "failed (RuntimeError)"
    assert good.steps == 3 and len(variants[1].ms) == 2
    bench._print_table(variants)
    out, err = capsys.readouterr()
    assert re.search(r"^bad\s.*failed \(RuntimeError\)$", out, re.M) and "failed in step 2: RuntimeError: boom" in out
    assert "round 1/2: bad failed (RuntimeError), good" in err


# ---------------------------------------------------------------------------------------------- the CPU
def test_cpu_detection_types():
    assert isinstance(bench.cpu_model(), str) and bench.cpu_model()
    flags = bench.cpu_flags()
    assert flags is None or (isinstance(flags, frozenset) and all(isinstance(f, str) for f in flags))
    assert isinstance(bench.cpu_has_bf16_matmul(), bool)
    text = bench.cpu_description()
    assert isinstance(text, str) and text.startswith("CPU: ") and "\n" not in text
    assert f"torch {torch.__version__}" in text and f"torch threads {torch.get_num_threads()}" in text


@pytest.mark.parametrize("flags, caps, bf16", [
    ("fpu sse2 avx avx2 fma", "AVX2; bf16 matmul units: no", False),
    ("avx2 avx512f avx512bw", "AVX-512, AVX2; bf16 matmul units: no", False),
    ("avx2 avx512f avx512_bf16", "AVX512-BF16, AVX-512, AVX2; bf16 matmul units: yes", True),
    ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "AMX-BF16, AVX512-BF16, AVX-512, AVX2; bf16 matmul units: yes",
     True),
    ("fpu sse2", "none of AMX-BF16/AVX512-BF16/AVX-512/AVX2; bf16 matmul units: no", False),
])
def test_cpu_capability_from_flags(monkeypatch, flags, caps, bf16):
    monkeypatch.setattr(bench, "_cpuinfo", lambda: {"model name": "Test CPU 9000", "flags": flags})
    assert bench.cpu_model() == "Test CPU 9000"
    assert bench.cpu_has_bf16_matmul() is bf16
    assert bench.cpu_description().startswith(f"CPU: Test CPU 9000 ({caps}")


def test_cpu_unknown_without_proc_cpuinfo(monkeypatch):
    monkeypatch.setattr(bench, "_cpuinfo", lambda: {})
    monkeypatch.setattr(bench.platform, "processor", lambda: "SomeArch Processor")
    assert bench.cpu_flags() is None and bench.cpu_has_bf16_matmul() is False
    assert bench.cpu_description().startswith("CPU: SomeArch Processor (capability unknown")


def test_torch_muon_estimate():
    shapes = [torch.Size([1536, 512]), torch.Size([512, 2048])]
    slow, fast = bench.torch_muon_step_s(shapes, 3.0), bench.torch_muon_step_s(shapes, 300.0)
    assert slow == pytest.approx(100 * fast) and fast > 0
    # 5 iterations of X X^T, (bA + cA^2) X and A^2 on a 512 x 2048 matrix
    assert bench.torch_muon_step_s([torch.Size([512, 2048])], 1.0) == pytest.approx(
        5 * (4 * 512 * 512 * 2048 + 2 * 512 ** 3) / 1e9)
    assert bench.matmul_gflops(torch.float32, n=32, min_s=0.001) > 0
