"""One-shot GPU check: every optimizer's CUDA path against a CPU float64 reference, bf16 Newton-Schulz, the
compiled/fused paths, a speed comparison with torch's fused AdamW and ``torch.optim.Muon``, and a 1-rank NCCL
smoke test, printed as one markdown table.

Made for a single run on one GPU under a strict time budget:

* every check is wrapped: an exception is recorded as ``FAIL`` with its error text and the script goes on;
* ``--budget-s`` (default 420) is the time the checks may take; each section gets a share of the time left
  when it starts (``SECTION_SHARE``, against the sections still to run), and a check that would start after its
  section's or the global deadline is reported ``skipped: budget``. A watchdog thread prints the table
  collected so far and exits (code 0) if a single check is still running ``--grace-s`` (default 40) seconds
  after the global deadline;
* ``torch.compile(opt.step)`` and the distributed checks run in child processes: a compile item over its share
  of the section's time (or one that crashes the process) is a FAIL and a fresh process runs the next ones; a
  hang costs its share of the budget and no more;
* progress lines are flushed as checks finish; the table goes to stdout at the end (and to ``--out FILE.md``);
* exit code 0 whenever the script itself ran (the table says which checks failed); 2 only when the harness
  crashes.

Sections (in the table's order; run in the order env, 2, 3, 5, 6, 2 fused, 4 so that the cheap and most
important checks come first):

1. environment: GPU, capability, memory, torch / CUDA / NCCL versions.
2. correctness: every optimizer case of ``tests/contract_cases.py`` (every registered optimizer; a registered name
   without a case gets minimal keyword arguments), 5 steps from the same float64 init with the same float64
   gradients (generated on the CPU, correlated from step to step as in training), on the device in float32 and on
   the CPU in float64. ``dev`` is the max over parameters of ``||p_dev - p_ref|| / ||p_ref||``. Tolerances per
   family (``TOLERANCES``; default precision / strict precision):

   * scalar (element-wise) 1e-5 / 1e-5: float32 rounding only (measured ~1e-7);
   * Newton-Schulz based (orthogonalized optimizers, Muown, MuonAdamW) 3e-2 / 1e-4: with the default
     ``fp32_matmul_prec="medium"`` the Newton-Schulz iteration runs in **bf16 on CUDA** (by design, see
     ``muon_utils.ns_compute_dtype``), whose rounding moves the update by ~0.5% per step (measured with
     ``ns_compute_dtype=torch.bfloat16`` on the CPU: 3e-4 .. 2.4e-2 after 5 steps, adaptive_muon largest), so the
     case is run a second time with ``fp32_matmul_prec="highest"`` (``strict``) and that run must agree to 1e-4;
   * manifold (oblique, iso) 1e-3 / 1e-4;
   * Kronecker / eigenbasis (SOAP family, Shampoo, MOSO) 1e-3 / 1e-3 (strict: every ``*fp32_matmul_prec`` the
     constructor takes set to ``"highest"``; SOAP's QR refresh runs under ``"high"``, i.e. TF32, by default);
   * PSGD 5e-2: its random probes come from the device's generator (CPU and CUDA streams differ).

   ``cpu32`` is the same run on the CPU in float32: the rounding floor of the problem. A case outside its
   tolerance whose device error is within 10x of ``cpu32`` is ``WARN`` (the problem itself is that sensitive to
   float32 rounding, the device is not worse than the CPU), otherwise ``FAIL``.
   "2 fused": for the scalar cases marked ``fused`` in the contract table, ``fused=True`` (the compiled
   single-pass step) against ``fused=False`` on the device, equal within 1e-6 (relative), and no fallback to
   eager.
3. bf16 Newton-Schulz: ``newton_schulz(x, 5, "quintic", compute_dtype=torch.bfloat16)`` against float32 on the
   device for shapes (512, 512), (1024, 4096), (4096, 1024); inputs have singular values spread over 1..3 so the
   quintic map's band (computed from its coefficients, ~[0.978, 1.032]) applies. Pass: float32 singular values
   within the band +- 1e-3, bf16 within +- 2e-2, relative difference bf16 vs float32 <= 2e-2.
4. torch.compile: ``torch.compile(opt.step)`` against the eager step after 3 steps for adamw, lion, muon,
   normuon (may fail today: the error is recorded).
5. speed: ms per ``optimizer.step()`` (CUDA events, warm-up then the median of ``--steps``) on a GPT-like
   parameter set (``emerging_optimizers.cli.bench.gpt_like_model(12, 1024, 32768)``, ~0.2B parameters, fixed
   random gradients): torch AdamW(fused=True), our AdamW (fused None and True), Lion, Muon on the hidden matrices
   vs torch.optim.Muon on the same matrices, MuonAdamW on the whole model; ratios to torch's fused AdamW and,
   for the matrix-only ones, to torch.optim.Muon.
6. NCCL: multi-rank runs are not made (one GPU); a 1-rank NCCL process group, one ``Muon(process_group=WORLD)``
   step against the same step without a process group, and one FSDP2 (``fully_shard``, DTensor) model step with
   ``MuonAdamW`` against the same unsharded step.

``--device cpu`` is a dry run of every section on the CPU (gloo instead of NCCL) to test the script's logic; with
``--small`` the models are tiny. On a machine without CUDA (and ``--device cuda``, the default) the script prints
``no CUDA device: nothing to check`` and exits 0.

    python benchmarks/gpu_check.py --out gpu_check.md          # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --small --budget-s 60
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SECTIONS = {
    "env": "1 environment",
    "correct": "2 correctness",
    "fused": "2 fused",
    "ns": "3 bf16 Newton-Schulz",
    "compile": "4 torch.compile",
    "speed": "5 speed",
    "nccl": "6 NCCL",
}
SECTION_ORDER = list(SECTIONS.values())
#: run order, and each section's weight: it may use (time left) * weight / (sum of the weights still to run)
RUN_ORDER = ["env", "correct", "ns", "speed", "nccl", "fused", "compile"]
SECTION_SHARE = {"env": 0.05, "correct": 0.30, "ns": 0.08, "speed": 0.30, "nccl": 0.12, "fused": 0.20,
                 "compile": 0.15}
#: family -> (tolerance at default precision, tolerance with every fp32 matmul precision at "highest")
TOLERANCES = {"scalar": (1e-5, 1e-5), "ns": (3e-2, 1e-4), "manifold": (1e-3, 1e-4), "kron": (1e-3, 1e-3),
              "psgd": (5e-2, 5e-2)}
WARN_FACTOR = 10.0  # a device error within this factor of the CPU float32 error is WARN, not FAIL
CORRECTNESS_STEPS = 5
FUSED_TOL = 1e-6
ROW_PREFIX = "@@ROW "


# ---------------------------------------------------------------------------------------------- reporting
def short_error(exc: BaseException, limit: int = 240) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Report:
    """Rows (section, item, result, numbers), progress lines, and the final markdown table."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.rows: list[tuple[str, str, str, str]] = []
        self.lock = threading.Lock()
        self.current: tuple[str, str] | None = None
        self.proc: subprocess.Popen[str] | None = None  # the running worker, if any (the watchdog kills it)
        self.finished = False

    def add(self, section: str, item: str, result: str, numbers: str = "") -> None:
        with self.lock:
            if self.finished:
                return
            self.rows.append((section, item, result, numbers))
        print(f"[{time.monotonic() - self.t0:7.1f}s] {section} | {item} | {result} | {numbers}", flush=True)

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)

    def table(self) -> str:
        def cell(s: str) -> str:
            return " ".join(str(s).split()).replace("|", "\\|")

        with self.lock:
            rows = sorted(self.rows, key=lambda r: SECTION_ORDER.index(r[0]) if r[0] in SECTION_ORDER else 99)
        lines = ["| section | item | result | numbers |", "|---|---|---|---|"]
        lines += [f"| {cell(a)} | {cell(b)} | {cell(c)} | {cell(d)} |" for a, b, c, d in rows]
        return "\n".join(lines)

    def summary(self) -> str:
        with self.lock:
            results = [r[2] for r in self.rows]
        counts = {k: sum(1 for r in results if r.startswith(k)) for k in ("PASS", "WARN", "FAIL", "skipped")}
        return ", ".join(f"{v} {k}" for k, v in counts.items())


@dataclass
class Clock:
    t0: float
    budget_s: float

    @property
    def deadline(self) -> float:
        return self.t0 + self.budget_s

    def left(self, deadline: float | None = None) -> float:
        return min(self.deadline, deadline if deadline is not None else math.inf) - time.monotonic()


def check(report: Report, section: str, item: str, fn: Callable[[], tuple[str, str]], deadline: float) -> None:
    """Run one check unless its deadline has passed; an exception is a FAIL row, never a crash."""
    if time.monotonic() >= deadline:
        report.add(section, item, "skipped: budget")
        return
    report.current = (section, item)
    try:
        result, numbers = fn()
    except Exception as exc:  # (the point: one failure must not stop the script)
        result, numbers = "FAIL", short_error(exc)
    finally:
        report.current = None
    report.add(section, item, result, numbers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_diff(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """max over tensors of ||a - b|| / ||b|| (float64, on the CPU); inf when ``out`` is not finite."""
    worst = 0.0
    for a, b in zip(out, ref):
        a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
        if not torch.isfinite(a).all():
            return math.inf
        worst = max(worst, (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item())
    return worst


# ---------------------------------------------------------------------------------------------- 1 environment
def section_env(report: Report, device: torch.device, deadline: float) -> None:
    sec = SECTIONS["env"]
    if device.type == "cuda":
        def gpu() -> tuple[str, str]:
            props = torch.cuda.get_device_properties(device)
            return "info", f"{props.name}; {torch.cuda.device_count()} device(s)"

        def capability() -> tuple[str, str]:
            major, minor = torch.cuda.get_device_capability(device)
            return "info", f"sm_{major}{minor}; bf16 supported: {torch.cuda.is_bf16_supported()}"

        def memory() -> tuple[str, str]:
            free, total = torch.cuda.mem_get_info(device)
            return "info", f"{total / 2**30:.1f} GiB total, {free / 2**30:.1f} GiB free"

        check(report, sec, "gpu", gpu, deadline)
        check(report, sec, "capability", capability, deadline)
        check(report, sec, "memory", memory, deadline)
    else:
        report.add(sec, "device", "info", f"CPU dry run: {platform.processor() or platform.machine()}")
    check(report, sec, "torch", lambda: ("info", f"torch {torch.__version__}; python {platform.python_version()}"),
          deadline)
    check(report, sec, "cuda", lambda: ("info", f"CUDA {torch.version.cuda}; cuDNN "
                                                f"{torch.backends.cudnn.version() if device.type == 'cuda' else '-'}"),
          deadline)

    def nccl() -> tuple[str, str]:
        import torch.distributed as dist

        if not dist.is_available():
            return "info", "torch.distributed not available"
        version = "-"
        if dist.is_nccl_available() and torch.cuda.is_available():
            with contextlib.suppress(Exception):
                version = ".".join(map(str, torch.cuda.nccl.version()))
        return "info", (f"NCCL available: {dist.is_nccl_available()} (version {version}); "
                        f"gloo: {dist.is_gloo_available()}")

    check(report, sec, "nccl", nccl, deadline)

    def host() -> tuple[str, str]:
        try:
            import triton

            triton_v = triton.__version__
        except Exception:
            triton_v = "not installed"
        return "info", (f"{os.cpu_count()} CPU cores; triton {triton_v}; float32 matmul precision "
                        f"{torch.get_float32_matmul_precision()!r}")

    check(report, sec, "host", host, deadline)


# ---------------------------------------------------------------------------------------------- 2 correctness
@dataclass
class OptCase:
    id: str
    name: str  # registered name
    build: Callable[..., torch.optim.Optimizer]
    lr: float
    lr_arg: str
    matrix_only: bool
    fused: bool


def load_cases() -> tuple[list[OptCase], str]:
    """The contract table's cases (tests/contract_cases.py) plus a minimal case per registered name it lacks."""
    import emerging_optimizers as eo

    names = list(eo.get_optimizer_name_list())
    cases: list[OptCase] = []
    note = "tests/contract_cases.py"
    try:
        tests_dir = str(REPO / "tests")
        if tests_dir not in sys.path:
            sys.path.insert(0, tests_dir)
        from contract_cases import CASES  # type: ignore[import-not-found]

        for c in CASES:
            base = c.id.split("-")[0]
            name = base if base in names else c.id
            cases.append(OptCase(c.id, name, c.build, c.lr, c.lr_arg, c.matrix_only, c.fused))
    except Exception as exc:
        note = f"contract cases not importable ({short_error(exc)}); minimal kwargs"
    covered = {c.name for c in cases}
    for name in names:
        if name in covered:
            continue
        cls = eo.get_optimizer_cls(name)
        params = inspect.signature(cls.__init__).parameters
        lr_arg = "lr" if "lr" in params else ("learning_rate" if "learning_rate" in params else "lr")
        extra: dict[str, Any] = {}
        if name == "muon_adamw":  # unnamed params: route matrices to the matrix side by shape
            extra["route"] = lambda _n, p: "matrix" if p.ndim >= 2 else "adamw"
        cases.append(OptCase(name, name, lambda ps, cls=cls, extra=extra, **o: cls(ps, **{**extra, **o}), 1e-2,
                             lr_arg, bool(getattr(cls, "matrix_only", False)), False))
    return cases, note


def family(name: str) -> str:
    import emerging_optimizers as eo

    if name == "muon_adamw":
        return "ns"
    module = eo.get_optimizer_cls(name).__module__
    if "scalar_optimizers" in module or ".compat" in module:
        return "scalar"
    if "orthogonalized_optimizers" in module or ".contrib" in module:
        return "ns"
    if "riemannian" in module:
        return "manifold"
    if ".psgd" in module:
        return "psgd"
    return "kron"


def strict_overrides(name: str) -> dict[str, Any] | None:
    """Constructor arguments that put every float32 matmul of the optimizer at "highest" (None: nothing to set)."""
    import emerging_optimizers as eo

    if name == "muon_adamw":
        return {"matrix_kwargs": {"fp32_matmul_prec": "highest"}}
    params = inspect.signature(eo.get_optimizer_cls(name).__init__).parameters
    keys = [k for k in params if k.endswith("fp32_matmul_prec")]
    return {k: "highest" for k in keys} or None


def model_init(matrix_only: bool, small: bool) -> list[torch.Tensor]:
    """float64 CPU tensors of a 2-layer MLP (weights ~ N(0, 1/fan_in), biases unless matrix_only)."""
    shapes = [(16, 8), (4, 16)] if small else [(64, 32), (16, 64)]
    gen = torch.Generator().manual_seed(0)
    init = []
    for out_f, in_f in shapes:
        init.append(torch.randn(out_f, in_f, generator=gen, dtype=torch.float64) / math.sqrt(in_f))
        if not matrix_only:
            init.append(torch.randn(out_f, generator=gen, dtype=torch.float64) * 0.1)
    return init


def gradient_sequence(init: list[torch.Tensor], steps: int) -> list[list[torch.Tensor]]:
    """float64 CPU gradients: a fixed direction plus 30% fresh noise each step (correlated, as in training)."""
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in init]
    return [[b + 0.3 * torch.randn(b.shape, generator=gen, dtype=torch.float64) for b in base] for _ in range(steps)]


def run_steps(case: OptCase, init: list[torch.Tensor], grads: list[list[torch.Tensor]], device: torch.device,
              dtype: torch.dtype, **overrides: Any) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(t.to(device=device, dtype=dtype, copy=True)) for t in init]
    opt = case.build(params, **{case.lr_arg: case.lr, **overrides})
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(device=device, dtype=dtype, copy=True)
        opt.step()
    sync(device)
    return [p.detach().to("cpu", torch.float64) for p in params]


def correctness_case(case: OptCase, device: torch.device, small: bool) -> tuple[str, str]:
    fam = family(case.name)
    tol, strict_tol = TOLERANCES[fam]
    init = model_init(case.matrix_only, small)
    grads = gradient_sequence(init, CORRECTNESS_STEPS)
    try:
        ref = run_steps(case, init, grads, torch.device("cpu"), torch.float64)
    except Exception as exc:
        return "FAIL", f"CPU float64 reference: {short_error(exc)}"
    cpu32 = rel_diff(run_steps(case, init, grads, torch.device("cpu"), torch.float32), ref)
    dev = cpu32 if device.type == "cpu" else rel_diff(run_steps(case, init, grads, device, torch.float32), ref)
    strict = None
    over = strict_overrides(case.name)
    if over is not None:
        strict = rel_diff(run_steps(case, init, grads, device, torch.float32, **over), ref)
    nums = f"[{fam}] dev={dev:.1e}"
    if strict is not None:
        nums += f" strict={strict:.1e}"
    nums += f" cpu32={cpu32:.1e} tol={tol:.0e}" + (f"/{strict_tol:.0e}" if strict is not None else "")
    ok = dev <= tol and (strict is None or strict <= strict_tol)
    if ok:
        return "PASS", nums
    worst = max(dev, strict or 0.0)
    if math.isfinite(worst) and worst <= WARN_FACTOR * max(cpu32, 1e-12):
        return "WARN", nums + f" (within {WARN_FACTOR:.0f}x of CPU float32: the problem is this sensitive)"
    return "FAIL", nums


def section_correct(report: Report, device: torch.device, small: bool, deadline: float,
                    cases: list[OptCase]) -> None:
    sec = SECTIONS["correct"]
    for case in cases:
        check(report, sec, case.id, lambda case=case: correctness_case(case, device, small), deadline)


def fused_case(case: OptCase, device: torch.device, small: bool) -> tuple[str, str]:
    init = model_init(case.matrix_only, small)
    grads = gradient_sequence(init, CORRECTNESS_STEPS)
    eager = run_steps(case, init, grads, device, torch.float32, fused=False)
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = [torch.nn.Parameter(x.to(device=device, dtype=torch.float32, copy=True)) for x in init]
        opt = case.build(params, **{case.lr_arg: case.lr, "fused": True})
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(device=device, dtype=torch.float32, copy=True)
            opt.step()
        sync(device)
    seconds = time.perf_counter() - t
    fell_back = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                 and any(k in str(w.message).lower() for k in ("fail", "eager", "not available"))]
    if getattr(opt, "_fuse_failed", False) and not fell_back:
        fell_back = ["_fuse_failed is set"]
    fused = [p.detach() for p in params]
    d = rel_diff(fused, eager)
    ref = run_steps(case, init, grads, torch.device("cpu"), torch.float64, fused=False)
    nums = (f"fused vs eager {d:.1e} (tol {FUSED_TOL:.0e}); vs CPU float64: fused {rel_diff(fused, ref):.1e}, "
            f"eager {rel_diff(eager, ref):.1e}; {seconds:.1f}s incl. compile")
    if fell_back:
        return "FAIL", f"fell back to eager: {fell_back[0][:200]}; {nums}"
    return ("PASS" if d <= FUSED_TOL else "FAIL"), nums


def section_fused(report: Report, device: torch.device, small: bool, deadline: float, cases: list[OptCase],
                  limit: int | None) -> None:
    sec = SECTIONS["fused"]
    fused_cases = [c for c in cases if c.fused]
    for i, case in enumerate(fused_cases):
        if limit is not None and i >= limit:
            report.add(sec, case.id, "skipped: --fused-limit")
            continue
        check(report, sec, case.id, lambda case=case: fused_case(case, device, small), deadline)
    if not fused_cases:
        report.add(sec, "fused cases", "skipped: none marked fused")


# ---------------------------------------------------------------------------------------------- 3 bf16 NS
def quintic_band(s: torch.Tensor, steps: int = 5) -> tuple[float, float]:
    from emerging_optimizers.orthogonalized_optimizers.muon_utils import get_coefficients

    x = s.double() / s.double().norm()
    for a, b, c in get_coefficients(steps, "quintic"):
        x = a * x + b * x**3 + c * x**5
    return x.min().item(), x.max().item()


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def ns_case(m: int, n: int, device: torch.device) -> tuple[str, str]:
    from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz

    gen = torch.Generator(device=device).manual_seed(m * 7 + n)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, device=device))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, device=device))
    s = torch.linspace(1.0, 3.0, k, device=device)
    x = (u * s) @ v.T
    lo, hi = quintic_band(s.cpu())
    o32 = newton_schulz(x, 5, "quintic", compute_dtype=torch.float32)
    o16 = newton_schulz(x, 5, "quintic", compute_dtype=torch.bfloat16)
    sv32 = torch.linalg.svdvals(o32.double())
    sv16 = torch.linalg.svdvals(o16.double())
    rel = (torch.linalg.vector_norm(o16.float() - o32) / torch.linalg.vector_norm(o32)).item()
    reps = 5 if device.type == "cuda" else 3
    ms32 = time_ms(lambda: newton_schulz(x, 5, "quintic", compute_dtype=torch.float32), device, reps)
    ms16 = time_ms(lambda: newton_schulz(x, 5, "quintic", compute_dtype=torch.bfloat16), device, reps)
    ok32 = lo - 1e-3 <= sv32.min().item() and sv32.max().item() <= hi + 1e-3
    ok16 = lo - 2e-2 <= sv16.min().item() and sv16.max().item() <= hi + 2e-2
    ok = ok32 and ok16 and rel <= 2e-2 and o16.dtype == x.dtype and torch.isfinite(o16).all().item()
    nums = (f"band [{lo:.4f}, {hi:.4f}]; bf16 sv [{sv16.min().item():.4f}, {sv16.max().item():.4f}]; "
            f"fp32 sv [{sv32.min().item():.4f}, {sv32.max().item():.4f}]; rel(bf16, fp32)={rel:.1e}; "
            f"ms bf16 {ms16:.2f} / fp32 {ms32:.2f}")
    return ("PASS" if ok else "FAIL"), nums


def section_ns(report: Report, device: torch.device, small: bool, deadline: float) -> None:
    sec = SECTIONS["ns"]
    shapes = [(64, 64), (64, 256), (256, 64)] if small else [(512, 512), (1024, 4096), (4096, 1024)]
    for m, n in shapes:
        check(report, sec, f"{m}x{n}", lambda m=m, n=n: ns_case(m, n, device), deadline)


# ---------------------------------------------------------------------------------------------- 5 speed
def section_speed(report: Report, device: torch.device, small: bool, deadline: float, steps: int | None,
                  warmup: int | None) -> None:
    import emerging_optimizers as eo

    sec = SECTIONS["speed"]
    layers, dim, vocab = (2, 64, 256) if small else (12, 1024, 32768)
    steps = steps or (5 if small else 20)
    warmup = warmup or (2 if small else 3)
    state: dict[str, Any] = {}

    def setup() -> tuple[str, str]:
        try:
            from emerging_optimizers.cli.bench import gpt_like_model, hidden_matrices

            template = gpt_like_model(layers=layers, dim=dim, vocab=vocab)
            src = "emerging_optimizers.cli.bench.gpt_like_model"
        except Exception:  # (fallback: a plain stack of GPT-shaped linear layers)
            torch.manual_seed(0)
            mods: dict[str, torch.nn.Module] = {"embed": torch.nn.Embedding(vocab, dim)}
            for i in range(layers):
                mods[f"blocks_{i}_qkv"] = torch.nn.Linear(dim, 3 * dim)
                mods[f"blocks_{i}_proj"] = torch.nn.Linear(dim, dim)
                mods[f"blocks_{i}_fc"] = torch.nn.Linear(dim, 4 * dim)
                mods[f"blocks_{i}_out"] = torch.nn.Linear(4 * dim, dim)
            mods["head"] = torch.nn.Linear(dim, vocab, bias=False)
            template = torch.nn.ModuleDict(mods)

            def hidden_matrices(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
                return [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks")]

            src = "fallback shapes"
        template = template.to(device)
        gen = torch.Generator(device=device).manual_seed(1)
        grads = {n: torch.randn(p.shape, generator=gen, device=device) * 1e-3 for n, p in template.named_parameters()}
        state.update(template=template, grads=grads, hidden=hidden_matrices)
        total = sum(p.numel() for p in template.parameters())
        hidden = sum(p.numel() for _, p in hidden_matrices(template))
        state.update(total=total, hidden_numel=hidden)
        return "info", (f"{src}({layers}, {dim}, {vocab}): {total / 1e6:.1f}M params, {hidden / 1e6:.1f}M in hidden "
                        f"matrices; {warmup} warm-up + median of {steps} steps")

    check(report, sec, "parameter set", setup, deadline)

    def copy_model() -> torch.nn.Module:
        model = copy.deepcopy(state["template"])
        for n, p in model.named_parameters():
            p.grad = state["grads"][n]  # shared: optimizers never modify gradients
        return model

    def hidden(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for _, p in state["hidden"](model)]

    variants: list[tuple[str, bool, Callable[[], torch.optim.Optimizer]]] = [
        ("torch AdamW fused", False, lambda: torch.optim.AdamW(copy_model().parameters(), lr=1e-3, fused=True)),
        ("eo AdamW fused=None", False, lambda: eo.AdamW(copy_model().parameters(), lr=1e-3)),
        ("eo AdamW fused=True", False, lambda: eo.AdamW(copy_model().parameters(), lr=1e-3, fused=True)),
        ("eo Lion", False, lambda: eo.Lion(copy_model().parameters(), lr=1e-4)),
        ("eo Muon (hidden)", True, lambda: eo.Muon(hidden(copy_model()), lr=0.02)),
        ("torch Muon (hidden)", True, lambda: torch.optim.Muon(hidden(copy_model()), lr=0.02)),
        ("eo MuonAdamW (whole model)", False, lambda: eo.MuonAdamW(copy_model(), lr=0.02)),
    ]
    results: dict[str, float] = {}

    def measure(label: str, matrix_only: bool, build: Callable[[], torch.optim.Optimizer]) -> tuple[str, str]:
        if "template" not in state:
            raise RuntimeError("parameter set not built")
        if label.startswith("torch Muon") and not hasattr(torch.optim, "Muon"):
            return "skipped: no torch.optim.Muon", f"torch {torch.__version__}"
        if label == "eo AdamW fused=True" and small and device.type == "cpu":
            return "skipped: --small on CPU", "compiling costs ~30 s on 2 cores; the fused path is checked in 2 fused"
        opt = build()
        try:
            t = time.perf_counter()
            for _ in range(warmup):
                opt.step()
            # fused=None compiles in a background thread: wait for it so that the compiled path is timed
            with contextlib.suppress(Exception):
                from emerging_optimizers.scalar_optimizers import base as scalar_base

                scalar_base._COMPILED.wait(max(1.0, deadline - time.monotonic()))
            opt.step()
            sync(device)
            warm_s = time.perf_counter() - t
            ms = time_ms(opt.step, device, steps)
        finally:
            del opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[label] = ms
        numel = state["hidden_numel"] if matrix_only else state["total"]
        nums = f"{ms:.2f} ms/step; {numel / 1e6:.1f}M params; warm-up {warm_s:.1f}s"
        base, muon = results.get("torch AdamW fused"), results.get("torch Muon (hidden)")
        if base and label != "torch AdamW fused":
            nums += f"; x{ms / base:.2f} torch AdamW fused"
        if muon and matrix_only and label != "torch Muon (hidden)":
            nums += f"; x{ms / muon:.2f} torch Muon"
        return "ok", nums

    # torch Muon before eo Muon so that the ratio is known when eo Muon's row is written
    order = [0, 1, 2, 3, 5, 4, 6]
    for i in order:
        label, matrix_only, build = variants[i]
        check(report, sec, label, lambda label=label, m=matrix_only, b=build: measure(label, m, b), deadline)
    state.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- workers
def emit(section_key: str, item: str, result: str, numbers: str = "") -> None:
    row = {"section": SECTIONS[section_key], "item": item, "result": result, "numbers": numbers}
    print(ROW_PREFIX + json.dumps(row), flush=True)


def worker_check(section_key: str, item: str, fn: Callable[[], tuple[str, str]]) -> None:
    print(f"worker: {item} ...", flush=True)
    try:
        result, numbers = fn()
    except Exception as exc:
        result, numbers = "FAIL", short_error(exc)
    emit(section_key, item, result, numbers)


COMPILE_NAMES = ["adamw", "lion", "muon", "normuon"]


def worker_compile(device: torch.device, small: bool, names: list[str]) -> None:
    import emerging_optimizers as eo

    with contextlib.suppress(Exception):
        import logging

        torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)
    shapes = [(16, 8), (4, 16)] if small else [(256, 128), (128, 256)]

    def one(name: str) -> tuple[str, str]:
        cls = eo.get_optimizer_cls(name)
        matrix_only = bool(getattr(cls, "matrix_only", False))
        init = model_init(matrix_only, small=True) if small else []
        if not small:
            gen = torch.Generator().manual_seed(0)
            for o, i in shapes:
                init.append(torch.randn(o, i, generator=gen, dtype=torch.float64) / math.sqrt(i))
                if not matrix_only:
                    init.append(torch.randn(o, generator=gen, dtype=torch.float64) * 0.1)
        grads = gradient_sequence(init, 3)
        lr = 1e-3 if name in ("adamw", "lion") else 0.02
        runs = []
        for compiled in (False, True):
            params = [torch.nn.Parameter(t.to(device=device, dtype=torch.float32, copy=True)) for t in init]
            opt = cls(params, lr=lr)
            step = torch.compile(opt.step) if compiled else opt.step
            t = time.perf_counter()
            for g_step in grads:
                for p, g in zip(params, g_step):
                    p.grad = g.to(device=device, dtype=torch.float32, copy=True)
                step()
            sync(device)
            runs.append(([p.detach().clone() for p in params], time.perf_counter() - t))
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        d = rel_diff(runs[1][0], runs[0][0])
        tol = 1e-5 if family(name) == "scalar" else 1e-2
        nums = f"compiled vs eager {d:.1e} (tol {tol:.0e}); {runs[1][1]:.1f}s compiled"
        return ("PASS" if d <= tol else "FAIL"), nums

    for name in names:
        worker_check("compile", name, lambda name=name: one(name))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_nccl(device: torch.device, small: bool) -> None:
    import torch.distributed as dist

    import emerging_optimizers as eo

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def init() -> tuple[str, str]:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
        x = torch.ones(4, device=device)
        dist.all_reduce(x)
        sync(device)
        version = ""
        if backend == "nccl":
            with contextlib.suppress(Exception):
                version = " NCCL " + ".".join(map(str, torch.cuda.nccl.version()))
        return ("PASS" if x.sum().item() == 4 else "FAIL"), f"backend {backend}{version}; all_reduce ok"

    worker_check("nccl", f"init_process_group({backend!r}, world_size=1)", init)
    if not dist.is_initialized():
        return

    def muon_pg() -> tuple[str, str]:
        init_t = model_init(matrix_only=True, small=small)
        grads = gradient_sequence(init_t, 2)
        outs = []
        for pg in (None, dist.group.WORLD):
            params = [torch.nn.Parameter(t.to(device=device, dtype=torch.float32, copy=True)) for t in init_t]
            opt = eo.Muon(params, lr=0.02, process_group=pg)
            for g_step in grads:
                for p, g in zip(params, g_step):
                    p.grad = g.to(device=device, dtype=torch.float32, copy=True)
                opt.step()
            sync(device)
            outs.append([p.detach().clone() for p in params])
        d = rel_diff(outs[1], outs[0])
        return ("PASS" if d <= 1e-6 else "FAIL"), f"pg=WORLD vs no pg {d:.1e} (tol 1e-6), 2 steps"

    worker_check("nccl", "Muon(process_group=WORLD) step", muon_pg)

    def fsdp2() -> tuple[str, str]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from emerging_optimizers.cli.models import CharTransformer

        vocab, context = 64, 16
        dim = 32 if small else 128
        torch.manual_seed(0)
        ref_model = CharTransformer(vocab, context=context, dim=dim, depth=2, num_heads=2).to(device)
        model = copy.deepcopy(ref_model)
        mesh = init_device_mesh(device.type, (1,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        gen = torch.Generator(device=device).manual_seed(3)
        idx = torch.randint(0, vocab, (4, context), generator=gen, device=device)
        tgt = torch.randint(0, vocab, (4, context), generator=gen, device=device)
        outs = []
        for m in (ref_model, model):
            opt = eo.MuonAdamW(m, lr=0.02, matrix_kwargs={"fp32_matmul_prec": "highest"})
            for _ in range(2):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), tgt.flatten())
                loss.backward()
                opt.step()
            sync(device)
            outs.append([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                         for p in m.parameters()])
        is_dtensor = any(type(p).__name__ == "DTensor" for p in model.parameters())
        d = rel_diff(outs[1], outs[0])
        return (("PASS" if d <= 1e-4 and is_dtensor else "FAIL"),
                f"FSDP2 vs unsharded {d:.1e} (tol 1e-4), 2 steps; DTensor params: {is_dtensor}")

    worker_check("nccl", "FSDP2 fully_shard + MuonAdamW step", fsdp2)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def run_worker(report: Report, kind: str, section_key: str, items: list[str], device: torch.device, small: bool,
               deadline: float, restart: bool) -> None:
    """Run ``--worker kind`` in child processes (own sessions) until ``deadline``; their rows go to the report.

    With ``restart``, each item may take an equal share of the time left when it starts; an item over its share
    (or one that crashes the worker) is a FAIL and a fresh worker runs the items after it (``--only``).
    """
    sec = SECTIONS[section_key]
    remaining = list(items)
    while remaining:
        if deadline - time.monotonic() <= 5:
            for item in remaining:
                report.add(sec, item, "skipped: budget")
            return
        seen, stuck, why = _worker_once(report, kind, sec, remaining, device, small, deadline, restart)
        rest = [i for i in remaining if i not in seen and i != stuck]
        if stuck is not None:
            report.add(sec, stuck, "FAIL", why)
        if not restart or stuck is None:
            for item in rest:
                if why.startswith("worker killed"):
                    report.add(sec, item, "skipped: budget")
                else:
                    report.add(sec, item, "FAIL", why or "the worker ended before this check")
            return
        remaining = rest


def _worker_once(report: Report, kind: str, sec: str, items: list[str], device: torch.device, small: bool,
                 deadline: float, per_item: bool) -> tuple[set[str], str | None, str]:
    """One worker process: (items reported, the item it was stuck in or crashed in, why)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--device", device.type,
           "--only", ",".join(items)]
    if small:
        cmd.append("--small")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(REPO), env=env,
                            start_new_session=True)
    report.proc = proc
    seen: set[str] = set()
    tail: list[str] = []
    current: list[Any] = [None, 0.0, math.inf]  # item running, its start, its allotment (seconds)

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(ROW_PREFIX):
                try:
                    row = json.loads(line[len(ROW_PREFIX):])
                except ValueError:
                    continue
                seen.add(row["item"])
                current[0] = None
                report.add(row["section"], row["item"], row["result"], row["numbers"])
            elif line.startswith("worker: "):
                item = line[len("worker: "):].removesuffix(" ...")
                now = time.monotonic()
                left_items = max(1, len([i for i in items if i not in seen]))
                current[:] = [item, now, (deadline - now) / left_items if per_item else math.inf]
                report.log(f"{sec}: {item} ... (up to {min(current[2], deadline - now):.0f}s)")
            elif line.strip():
                tail.append(line)
                del tail[:-20]

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    stuck, why = None, ""
    try:
        while proc.poll() is None:
            now = time.monotonic()
            item, start, allot = current
            if now >= deadline or (item is not None and now - start > allot):
                stuck = item
                why = (f"worker killed: over its {min(allot, deadline - start):.0f}s share of the budget"
                       if item is not None else "worker killed: section budget spent before its first check")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
    finally:
        report.proc = None
    thread.join(timeout=10)
    if stuck is None and proc.returncode != 0:
        last = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "")
        stuck = current[0]
        why = f"worker crashed (rc={proc.returncode}): {last.strip()[:200]}"
    return seen, stuck, why


# ---------------------------------------------------------------------------------------------- main
def watchdog(report: Report, hard_deadline: float, out: str | None) -> None:
    while time.monotonic() < hard_deadline:
        time.sleep(min(1.0, max(0.01, hard_deadline - time.monotonic())))
        if report.finished:
            return
    cur = report.current
    proc = report.proc
    if proc is not None:
        with contextlib.suppress(Exception):
            os.killpg(proc.pid, signal.SIGKILL)
    if cur is not None:
        report.add(cur[0], cur[1], "FAIL", "watchdog: still running at the hard time limit (budget + grace); "
                                           "the checks after it did not run")
    with report.lock:
        present = {r[0] for r in report.rows}
    for name in SECTION_ORDER:
        if name not in present:
            report.add(name, "(section)", "skipped: budget", "watchdog stop")
    finish(report, out, "watchdog stop")
    os._exit(0)


def finish(report: Report, out: str | None, note: str = "") -> None:
    table = report.table()
    summary = report.summary()
    with report.lock:
        report.finished = True
    text = f"\n## GPU check ({summary}{'; ' + note if note else ''})\n\n{table}\n"
    print(text, flush=True)
    if out:
        try:
            Path(out).write_text(text.lstrip("\n"))
        except OSError as exc:
            print(f"could not write {out}: {exc}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda (default; exits 0 with a note when there is none) or cpu (dry run of every section)")
    ap.add_argument("--small", action="store_true", help="tiny models and few steps (dry runs)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="time budget of all checks (default 420)")
    ap.add_argument("--grace-s", type=float, default=40.0,
                    help="the watchdog stops the script this long after the budget (default 40)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--steps", type=int, help="timed steps per speed variant (default 20, 5 with --small)")
    ap.add_argument("--warmup", type=int, help="warm-up steps per speed variant (default 3, 2 with --small)")
    ap.add_argument("--fused-limit", type=int, help="check at most this many fused cases (default: all; 3 with "
                                                    "--small on the CPU)")
    ap.add_argument("--sections", default=",".join(RUN_ORDER),
                    help=f"comma-separated subset of {','.join(RUN_ORDER)} (the others are reported skipped)")
    ap.add_argument("--worker", choices=["compile", "nccl"], help=argparse.SUPPRESS)
    ap.add_argument("--only", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.device == "cuda" and not torch.cuda.is_available():
        if args.worker:
            return 0
        print("no CUDA device: nothing to check", flush=True)
        return 0
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if args.worker == "compile":
        worker_compile(device, args.small, args.only.split(",") if args.only else COMPILE_NAMES)
        return 0
    if args.worker == "nccl":
        worker_nccl(device, args.small)
        return 0

    t0 = time.monotonic()
    clock = Clock(t0, args.budget_s)
    report = Report(t0)
    threading.Thread(target=watchdog, args=(report, clock.deadline + args.grace_s, args.out), daemon=True).start()
    wanted = {s.strip() for s in args.sections.split(",") if s.strip()}
    report.log(f"gpu_check on {device}{' (--small)' if args.small else ''}, budget {args.budget_s:.0f}s")
    try:
        import emerging_optimizers  # noqa: F401

        cases, cases_note = load_cases()
        report.log(f"{len(cases)} optimizer cases from {cases_note}")
        fused_limit = args.fused_limit
        if fused_limit is None and args.small and device.type == "cpu":
            fused_limit = 3
        for k, key in enumerate(RUN_ORDER):
            sec = SECTIONS[key]
            if key not in wanted:
                report.add(sec, "(section)", "skipped: --sections")
                continue
            # this section's share of the time left, against the sections still to run
            later = sum(SECTION_SHARE[x] for x in RUN_ORDER[k:] if x in wanted)
            deadline = min(clock.deadline, time.monotonic() + clock.left() * SECTION_SHARE[key] / later)
            if key != "env" and clock.left() <= 1:
                report.add(sec, "(section)", "skipped: budget")
                continue
            report.log(f"section {sec} (up to {deadline - time.monotonic():.0f}s)")
            try:
                if key == "env":
                    section_env(report, device, deadline)
                elif key == "correct":
                    section_correct(report, device, args.small, deadline, cases)
                elif key == "ns":
                    section_ns(report, device, args.small, deadline)
                elif key == "speed":
                    section_speed(report, device, args.small, deadline, args.steps, args.warmup)
                elif key == "nccl":
                    report.add(sec, "multi-rank", "skipped", "single GPU: NCCL multi-rank not run"
                               if device.type == "cpu" or torch.cuda.device_count() <= 1 else
                               f"{torch.cuda.device_count()} GPUs: multi-rank is out of this script's scope")
                    run_worker(report, "nccl", key, ["init_process_group("
                                                     f"{'nccl' if device.type == 'cuda' else 'gloo'!r}, world_size=1)",
                                                     "Muon(process_group=WORLD) step",
                                                     "FSDP2 fully_shard + MuonAdamW step"], device, args.small,
                               deadline, restart=False)
                elif key == "fused":
                    section_fused(report, device, args.small, deadline, cases, fused_limit)
                elif key == "compile":
                    names = COMPILE_NAMES
                    if args.small and device.type == "cpu":  # Newton-Schulz compiles take ~20 s each on 2 cores
                        names = [n for n in COMPILE_NAMES if family(n) == "scalar"]
                        for n in COMPILE_NAMES:
                            if n not in names:
                                report.add(sec, n, "skipped: --small on CPU", "compiling costs ~20 s on 2 cores")
                    run_worker(report, "compile", key, names, device, args.small, deadline, restart=True)
            except Exception as exc:  # (a section's own setup failed: record, go on)
                report.add(sec, "(section)", "FAIL", f"section aborted: {short_error(exc)}")
            with report.lock:
                present = any(r[0] == sec for r in report.rows)
            if not present:
                report.add(sec, "(section)", "skipped: budget")
        report.log(f"done in {time.monotonic() - t0:.1f}s")
        finish(report, args.out)
        return 0
    except Exception:  # the harness itself crashed: say so, print what there is, nonzero exit
        traceback.print_exc()
        finish(report, args.out, "harness crashed")
        return 2


if __name__ == "__main__":
    sys.exit(main())
