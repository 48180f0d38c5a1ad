"""``emopt bench``: the cost of ``optimizer.step()`` on a GPT-like parameter set, against torch.optim.

Parameters: :class:`~emerging_optimizers.cli.models.CharTransformer` with ``--layers`` blocks of width
``--dim`` and a ``--vocab`` embedding and untied head (defaults 6 x 512 and 8192: 27M parameters), with
fixed random gradients (shared by all variants; optimizers never modify gradients). Every variant owns
its own copy of the parameters and its own state.

Which parameters a variant updates: scalar, PSGD and whole-model optimizers get all of them; matrix-only
optimizers (orthogonalized, manifold) and ``torch.optim.Muon`` get the hidden 2-D matrices (attention and MLP
weights), as they would in a hybrid setup. The ``params`` column says how many each one steps.

Timing: ``--warmup`` steps per variant that do not enter the results (state allocation; a fused step that a
scalar optimizer compiles in the background is waited for, stepped once untimed, then once more), then
``--rounds`` rounds; each round times ``--steps`` consecutive steps of every variant (by default as many as take
about :data:`AUTO_ROUND_S`), in an order rotated every round so no variant always runs first. Reported: the
median over rounds of the mean ms per step, and its ratio to torch's ``AdamW(fused=True)`` (and, for
matrix-only variants, to ``torch.optim.Muon``).

Time cap (``--cap-s``): every step is timed, warm-up included, and a variant whose steps so far plus the
steps it has left would exceed the cap (at its latest ms/step) is dropped and reported as ``over cap (X s
for N steps)``. A step cannot be interrupted, so the first one is the only one that can overrun the cap; for
``torch.optim.Muon``, whose Newton-Schulz runs in bf16 (very slow on CPUs without bf16 matmul units), a
matmul probe estimates the step first, and a variant the estimate puts over the cap is not run at all. A
variant whose step raises is reported as ``failed (...)``; the others go on.

Progress goes to stderr, one line per variant warmed up and per round; the report (CPU, settings, table,
total time) to stdout.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from emerging_optimizers import registry
from emerging_optimizers import utils as eo_utils
from emerging_optimizers.cli import specs
from emerging_optimizers.cli.models import CharTransformer
from emerging_optimizers.orthogonalized_optimizers import muon_utils

__all__ = ["Variant", "gpt_like_model", "hidden_matrices", "time_variants", "run", "cpu_description",
           "cpu_has_bf16_matmul", "cpu_model", "cpu_flags", "matmul_gflops", "torch_muon_step_s"]

#: Default ``--cap-s``: seconds of optimizer steps one variant may take (warm-up included).
DEFAULT_CAP_S = 30.0
#: With ``--steps`` unset, a round times as many steps of a variant as take about this long (1 to 50).
AUTO_ROUND_S = 0.2
#: The capabilities :func:`cpu_description` looks for, as (``/proc/cpuinfo`` flag, name printed).
X86_FEATURES = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
TORCH_MUON = "torch Muon (bf16 NS)"


# ---------------------------------------------------------------------------------------------- the CPU
def _cpuinfo() -> dict[str, str]:
    """``key: value`` of the first processor of ``/proc/cpuinfo`` (empty where there is none: not Linux)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    info.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else :func:`platform.processor`), or ``"unknown CPU"``."""
    info = _cpuinfo()
    name = info.get("model name") or info.get("hardware") or info.get("cpu model") or platform.processor()
    return name.strip() or platform.machine() or "unknown CPU"


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (``flags``, or ``Features`` on Arm, of ``/proc/cpuinfo``); None where unknown."""
    info = _cpuinfo()
    text = info.get("flags", info.get("features"))
    return None if text is None else frozenset(text.lower().split())


def cpu_has_bf16_matmul() -> bool:
    """Whether the CPU has bf16 matrix-multiply units (AMX-BF16 or AVX512-BF16 on x86, BF16 on Arm).

    The flags of :func:`cpu_flags` judged by the rule of :func:`emerging_optimizers.utils.cpu_has_bf16_matmul`
    (the answer that picks bf16 Newton-Schulz): on Linux both read the same ``/proc/cpuinfo`` flags. Where the
    flags cannot be read (not Linux) it is that function's answer (torch's own CPU probes), and
    :func:`cpu_description` says the capability is unknown.
    """
    flags = cpu_flags()
    if flags is None:
        return eo_utils.cpu_has_bf16_matmul()
    return eo_utils.bf16_matmul_in_cpu_flags(flags)


def _logical_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_description() -> str:
    """One line: CPU model, its vector/matrix capability, logical CPUs, torch's threads and version."""
    flags = cpu_flags()
    if flags is None:
        caps = "capability unknown"
    else:
        found = [name for flag, name in X86_FEATURES if flag in flags]
        if "bf16" in flags and not found:  # Arm
            found = ["BF16"]
        caps = ", ".join(found) if found else "none of AMX-BF16/AVX512-BF16/AVX-512/AVX2"
        caps += f"; bf16 matmul units: {'yes' if cpu_has_bf16_matmul() else 'no'}"
    try:
        kernels = f"; torch kernels {torch.backends.cpu.get_cpu_capability()}"
    except Exception:  # older torch
        kernels = ""
    return (f"CPU: {cpu_model()} ({caps}{kernels}); {_logical_cpus()} logical CPU(s), torch threads "
            f"{torch.get_num_threads()}; torch {torch.__version__}")


def matmul_gflops(dtype: torch.dtype, n: int = 256, min_s: float = 0.05) -> float:
    """GFLOP/s of an ``n x n`` matmul in ``dtype`` at torch's current thread count (timed for ``min_s``)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    a @ b
    count, t0 = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return 2 * n ** 3 * count / elapsed / 1e9


def torch_muon_step_s(shapes: list[torch.Size], bf16_gflops: float, ns_steps: int = 5) -> float:
    """Seconds of a ``torch.optim.Muon`` step's bf16 Newton-Schulz on matrices of ``shapes``, at ``bf16_gflops``.

    Per iteration on an ``m x n`` matrix (``m <= n``): ``X X^T`` and ``(bA + cA^2) X`` (``2 m^2 n`` each) and
    ``A^2`` (``2 m^3``). The rest of the step is element-wise and ignored: a lower bound, good to ~20%.
    """
    flops = 0.0
    for shape in shapes:
        m, n = sorted(shape)
        flops += ns_steps * (4 * m * m * n + 2 * m ** 3)
    return flops / (bf16_gflops * 1e9)


# ---------------------------------------------------------------------------------------------- the model
def gpt_like_model(layers: int, dim: int, vocab: int, seed: int = 0) -> nn.Module:
    """A :class:`CharTransformer` of the given size (context 64, heads of width 64 where possible)."""
    torch.manual_seed(seed)
    heads = max(1, dim // 64) if dim % 64 == 0 else 1
    return CharTransformer(vocab, context=64, dim=dim, depth=layers, num_heads=heads)


def hidden_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named 2-D parameters inside the transformer blocks (not the embedding or the head)."""
    return [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")]


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Variant:
    """One timed optimizer. ``ms``: mean ms/step of each completed round. ``used_s``/``done``: seconds and
    count of all its steps (warm-up included). ``step_s``: its latest seconds per step (before it ran: an
    estimate, if any). ``over_cap``: dropped by the time cap. ``notes``: said under the table."""

    label: str
    opt: torch.optim.Optimizer | None
    numel: int
    matrix_only: bool
    ms: list[float] = field(default_factory=list)
    used_s: float = 0.0
    done: int = 0
    step_s: float | None = None
    over_cap: bool = False
    failed: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> bool:
        return self.over_cap or bool(self.failed)

    def result(self) -> str:
        """``over cap (...)`` or ``failed (...)`` for a dropped variant, else empty."""
        if self.failed:
            return f"failed ({self.failed.split(':')[0]})"
        if not self.over_cap:
            return ""
        if self.done == 0:
            return f"over cap (est. {_secs(self.step_s or 0.0)} s/step, not run)"
        return f"over cap ({_secs(self.used_s)} s for {self.done} step{'s' if self.done != 1 else ''})"


def _secs(x: float) -> str:
    """Seconds for people: ``0.00123``, ``4.56``, ``78``."""
    return f"{x:.3g}" if x < 10 else f"{x:.0f}"


def _log(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


class _Clock:
    """``[  12.3 s]``: seconds since ``t0`` (default: now), the prefix of progress lines."""

    def __init__(self, t0: float | None = None) -> None:
        self.t0 = time.perf_counter() if t0 is None else t0

    def __call__(self) -> str:
        return f"[{time.perf_counter() - self.t0:6.1f} s]"


def _round_steps(v: Variant, steps: int | None) -> int:
    if steps is not None:
        return steps
    if not v.step_s:
        return 1
    return max(1, min(50, math.ceil(AUTO_ROUND_S / v.step_s)))


def _drop_if_over(v: Variant, steps_left: int, cap_s: float | None, log: Callable[[str], None] | None) -> bool:
    """Drop ``v`` (True) when its time so far plus ``steps_left`` steps at its latest rate exceeds ``cap_s``."""
    if cap_s is None or v.dropped:
        return v.dropped
    need = v.used_s + (v.step_s or 0.0) * steps_left
    if need <= cap_s:
        return False
    v.over_cap = True
    v.opt = None  # free its state
    if v.done == 0:
        why = (f"estimated {_secs(v.step_s or 0.0)} s/step, {steps_left} steps ~{_secs(need)} s > cap {cap_s:g} s: "
               "not run")
    else:
        why = f"{v.done} step(s) took {_secs(v.used_s)} s ({_secs(v.used_s / v.done)} s/step)"
        if steps_left:
            why += f", with {steps_left} more ~{_secs(need)} s"
        why += f" > cap {cap_s:g} s"
    v.notes.append(f"over cap: {why}")
    if log is not None:
        log(f"{v.label}: over cap ({why}), dropped")
    return True


class _StepFailed(Exception):
    pass


def _step(v: Variant) -> float:
    """One step of ``v``; its seconds. A step that raises drops ``v`` (:class:`_StepFailed`), noted."""
    assert v.opt is not None
    t0 = time.perf_counter()
    try:
        v.opt.step()
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        v.failed = f"{type(exc).__name__}: {first_line}"
        v.opt = None
        v.notes.append(f"failed in step {v.done + 1}: {v.failed}")
        raise _StepFailed(v.failed) from exc
    return time.perf_counter() - t0


def _timed_step(v: Variant) -> float:
    dt = _step(v)
    v.used_s += dt
    v.done += 1
    v.step_s = dt
    return dt


def _pending_compilation() -> object | None:
    """The scalar optimizers' background compiler when it has compilations in progress, else None."""
    try:
        from emerging_optimizers.scalar_optimizers import base as scalar_base
    except ImportError:
        return None
    return scalar_base._COMPILED if scalar_base._COMPILED.compiling() else None


def _wait_for_compilation(v: Variant | None, cap_s: float | None, log: Callable[[str], None] | None) -> float:
    """Wait (at most ``cap_s``) for the background compilations in progress; returns the seconds waited."""
    compiler = _pending_compilation()
    if compiler is None:
        return 0.0
    if log is not None:
        log(f"{v.label + ': ' if v else ''}waiting for {'its' if v else 'a'} fused step to compile"
            f"{f' (up to {cap_s:g} s)' if cap_s is not None else ''}")
    t0 = time.perf_counter()
    compiler.wait(cap_s)  # type: ignore[attr-defined]
    return time.perf_counter() - t0


def _settle_compiled(v: Variant, cap_s: float | None, log: Callable[[str], None] | None) -> None:
    """``v``'s warm-up started compiling a fused step in the background: wait for it, then step once on it.

    Neither counts against the cap (compilation is what warm-up is for; the first step on freshly compiled
    code may compile again, synchronously); both are said in the notes.
    """
    waited = _wait_for_compilation(v, cap_s, log)
    late = _pending_compilation() is not None
    first = _step(v)
    v.notes.append(f"its fused step compiled in the background: waited {waited:.1f} s, then its first step on the "
                   f"compiled code took {first:.1f} s (neither timed nor counted against the cap)"
                   + ("; still compiling after the wait: its times may include eager steps" if late else ""))
    if log is not None:
        log(f"{v.label}: first step after compilation {first:.2f} s")


def time_variants(variants: list[Variant], steps: int | None, rounds: int, warmup: int, *,
                  cap_s: float | None = None, progress: bool = False, t0: float | None = None) -> None:
    """Fill ``v.ms`` with one mean ms/step per round for each variant, interleaved; drop those over ``cap_s``
    (``v.over_cap``) or whose step raised (``v.failed``).

    ``steps`` None: as many per round as take about :data:`AUTO_ROUND_S`, from the variant's latest step time.
    ``progress``: a line on stderr per variant warmed up and per round, stamped with the seconds since ``t0``
    (default: the call).
    """
    clock = _Clock(t0)
    log: Callable[[str], None] | None = (lambda text: _log(f"{clock()} {text}")) if progress else None

    def steps_left_after_warmup(v: Variant) -> int:
        return rounds * _round_steps(v, steps)

    for v in variants:
        if v.dropped or _drop_if_over(v, warmup + steps_left_after_warmup(v), cap_s, log):
            continue
        try:
            for i in range(warmup):
                _timed_step(v)
                if _pending_compilation() is not None:  # its own compilation competes with it: judge it later
                    continue
                if _drop_if_over(v, warmup - i - 1 + steps_left_after_warmup(v), cap_s, log):
                    break
            if not v.over_cap and _pending_compilation() is not None:
                _settle_compiled(v, cap_s, log)
                _timed_step(v)  # a warm-up step on the compiled code: the rate the cap and --steps go by
                _drop_if_over(v, steps_left_after_warmup(v), cap_s, log)
        except _StepFailed:
            if log is not None:
                log(f"{v.label}: {v.notes[-1]}; dropped")
            continue
        if log is not None and not v.over_cap and v.step_s is not None:
            log(f"{v.label}: warmed up, {v.done} step(s) in {v.used_s:.2f} s (last {v.step_s * 1e3:.1f} ms)")

    if _pending_compilation() is not None:  # left by a variant dropped while it compiled: not during timing
        _wait_for_compilation(None, cap_s, log)
    for r in range(rounds):
        if all(v.dropped for v in variants):
            if log is not None:
                log(f"every variant dropped: {rounds - r} round(s) not run")
            break
        k = r % len(variants)
        texts: list[str] = []
        if log is not None:
            _log(f"{clock()} round {r + 1}/{rounds}:", end="")
        for v in variants[k:] + variants[:k]:
            if v.dropped:
                continue
            n = _round_steps(v, steps)
            if not _drop_if_over(v, n * (rounds - r), cap_s, None):
                start = time.perf_counter()
                try:
                    for _ in range(n):
                        _timed_step(v)
                        if cap_s is not None and v.used_s > cap_s:  # slower than it was: the round is lost
                            _drop_if_over(v, 0, cap_s, None)
                            break
                except _StepFailed:
                    pass
                if not v.dropped:
                    v.ms.append((time.perf_counter() - start) * 1e3 / n)
                    v.step_s = v.ms[-1] / 1e3
            text = v.result() or f"{v.ms[-1]:.1f} ms" + (f" ({n} steps)" if n > 1 else "")
            if log is not None:
                _log(("," if texts else "") + f" {v.label} {text}", end="")
            texts.append(text)
        if log is not None:
            _log("")


# ---------------------------------------------------------------------------------------------- the command
def run(args: argparse.Namespace) -> int:
    names = specs.load_registry()
    tokens = args.optimizers or [n for n in ("adamw", "muon", specs.WHOLE_MODEL) if n in names]
    spec_list = specs.parse_specs(tokens)
    for s in spec_list:
        if specs.is_baseline(s.name):
            raise specs.UsageError(f"{s.label!r} is a torch.optim baseline of `emopt compare`; `emopt bench` times "
                                   "torch.optim.AdamW and torch.optim.Muon itself (unless --no-torch): give our "
                                   "optimizers only.")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, spec_list)
    finally:
        torch.set_num_threads(old_threads)


def _run(args: argparse.Namespace, spec_list: list[specs.OptimizerSpec]) -> int:
    t_start = time.perf_counter()
    clock = _Clock(t_start)
    steps: int | None = getattr(args, "steps", None)
    cap_s: float | None = getattr(args, "cap_s", DEFAULT_CAP_S)
    print(cpu_description(), flush=True)
    template = gpt_like_model(args.layers, args.dim, args.vocab)
    gen = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in template.named_parameters()}
    total = sum(p.numel() for p in template.parameters())
    hidden = hidden_matrices(template)
    hidden_numel = sum(p.numel() for _, p in hidden)
    steps_text = f"{steps} steps" if steps is not None else f"auto steps (~{AUTO_ROUND_S:g} s)"
    print(f"GPT-like parameter set: {args.layers} blocks x d_model {args.dim}, vocab {args.vocab}: "
          f"{total / 1e6:.1f}M params ({hidden_numel / 1e6:.1f}M in hidden matrices); {args.rounds} rounds x "
          f"{steps_text} after {args.warmup} warm-up step(s); cap {cap_s:g} s of steps per variant", flush=True)

    def copy_model() -> nn.Module:
        model = copy.deepcopy(template)
        for n, p in model.named_parameters():
            p.grad = grads[n]
        return model

    builders: list[tuple[str, Callable[[], Variant]]] = []
    muon_estimate: float | None = None
    if not args.no_torch:
        builders.append(("torch AdamW fused", lambda: Variant(
            "torch AdamW fused", torch.optim.AdamW(list(copy_model().parameters()), fused=True), total, False)))
        builders.append(("torch AdamW foreach", lambda: Variant(
            "torch AdamW foreach", torch.optim.AdamW(list(copy_model().parameters()), foreach=True), total, False)))
        if hasattr(torch.optim, "Muon"):
            builders.append((TORCH_MUON, lambda: Variant(
                TORCH_MUON, torch.optim.Muon([p for _, p in hidden_matrices(copy_model())]), hidden_numel, True)))
            fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
            muon_estimate = torch_muon_step_s([p.shape for _, p in hidden], bf16)
            units = "has" if cpu_has_bf16_matmul() else ("has no" if cpu_flags() is not None else "may lack")
            ours = (f"bf16 on this CPU for matrices at least {muon_utils.CPU_BF16_MIN_DIM} on their short side"
                    if eo_utils.cpu_has_bf16_matmul() else "fp32 here (bf16 only with bf16 matmul units)")
            print(f"torch.optim.Muon runs its Newton-Schulz in bf16 (fixed by torch; ours under 'medium': {ours}): "
                  f"this CPU {units} bf16 matmul units; probe (256x256 matmul): bf16 {bf16:.1f} GFLOP/s, fp32 "
                  f"{fp32:.1f} GFLOP/s; a torch Muon step estimated at {_secs(muon_estimate)} s", flush=True)
    for s in spec_list:
        cls = registry.get_optimizer_cls(s.name)
        matrix_only = bool(getattr(cls, "matrix_only", False)) and not specs.is_whole_model(s.name)

        def build(s: specs.OptimizerSpec = s, cls: type = cls, matrix_only: bool = matrix_only) -> Variant:
            model = copy_model()
            params = hidden_matrices(model) if matrix_only else list(model.named_parameters())
            try:
                opt = cls(params, **s.overrides)
            except (TypeError, ValueError) as exc:
                raise specs.UsageError(f"Cannot build optimizer {s.label!r} ({cls.__name__}): {exc}") from exc
            return Variant(s.label, opt, hidden_numel if matrix_only else total, matrix_only)

        builders.append((s.label, build))

    variants: list[Variant] = []
    for label, b in builders:
        t0 = time.perf_counter()
        v = b()
        if label == TORCH_MUON and muon_estimate is not None:
            v.step_s = muon_estimate
        variants.append(v)
        _log(f"{clock()} built {label} in {time.perf_counter() - t0:.2f} s")
    time_variants(variants, steps, args.rounds, args.warmup, cap_s=cap_s, progress=True, t0=t_start)
    _print_table(variants)
    print(f"total {time.perf_counter() - t_start:.1f} s", flush=True)
    return 0


def _print_table(variants: list[Variant]) -> None:
    med = {v.label: statistics.median(v.ms) for v in variants if v.ms and not v.dropped}
    base = med.get("torch AdamW fused")
    muon = med.get(TORCH_MUON)
    w = max(len(v.label) for v in variants)
    cols = f"{'ms/step':>9}  {'min':>9}  {'x AdamW fused':>13}  {'x torch Muon':>12}"
    print(f"{'optimizer':<{w}}  {'params':>8}  {cols}")
    for v in variants:
        if v.label in med:
            r1 = f"{med[v.label] / base:.2f}" if base else "-"
            r2 = f"{med[v.label] / muon:.2f}" if (muon and v.matrix_only) else "-"
            cells = f"{med[v.label]:>9.2f}  {min(v.ms):>9.2f}  {r1:>13}  {r2:>12}"
        else:
            cells = f"{v.result() or 'no result':<{len(cols)}}"
        print(f"{v.label:<{w}}  {v.numel / 1e6:>7.1f}M  {cells}".rstrip())
    for v in variants:
        for note in v.notes:
            print(f"  {v.label}: {note}")
    sys.stdout.flush()
