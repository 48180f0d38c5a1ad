"""Small helpers shared across optimizers: matmul precision, CPU bf16 capability, argument validation,
process-group size and rank."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Literal, get_args

import torch

from emerging_optimizers.utils.eig import conjugate, eigh_with_fallback, orthogonal_iteration
from emerging_optimizers.utils.validation import (
    MatrixShapeError,
    check_beta,
    check_betas,
    check_choice,
    check_matrix,
    check_nonneg,
    check_positive,
    check_positive_int,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "clip_update_rms_",
    "BF16_MATMUL_CPU_FLAGS",
    "bf16_matmul_in_cpu_flags",
    "cpu_has_bf16_matmul",
    "cpu_has_amx_bf16",
    "FP32MatmulPrecT",
    "fp32_matmul_precision",
    "MatrixShapeError",
    "check_beta",
    "check_betas",
    "check_choice",
    "check_matrix",
    "check_nonneg",
    "check_positive",
    "check_positive_int",
    "conjugate",
    "eigh_with_fallback",
    "orthogonal_iteration",
    "get_pg_rank",
    "get_pg_size",
]

FP32MatmulPrecT = Literal["highest", "high", "medium"]
FP32_MATMUL_PRECISIONS: tuple[str, ...] = get_args(FP32MatmulPrecT)


@contextlib.contextmanager
def fp32_matmul_precision(
    prec: FP32MatmulPrecT = "highest", *, precision: FP32MatmulPrecT | None = None
) -> Iterator[None]:
    """Set ``torch.set_float32_matmul_precision(prec)`` inside the block and restore the old value after.

    ``precision=`` is the reference library's name of the argument (either may be given, not both).
    """
    if precision is not None:
        if prec != "highest":
            raise TypeError("fp32_matmul_precision got both prec and precision; pass one of them.")
        prec = precision
    check_choice("fp32_matmul_prec", prec, FP32_MATMUL_PRECISIONS)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(prec)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_pg_size(group: ProcessGroup | None = None) -> int:
    """Number of processes in ``group``; 1 when ``group`` is None or torch.distributed is not initialized."""
    if group is None or not _distributed_ready():
        return 1
    return group.size()


def get_pg_rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group``; 0 when ``group`` is None or torch.distributed is not initialized."""
    if group is None or not _distributed_ready():
        return 0
    return group.rank()


def clip_update_rms_(u: torch.Tensor, max_rms: float, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``u`` in place by ``min(1, max_rms / (rms(u) + eps))`` and return it; nothing when ``max_rms == 0``.

    The RMS clip of the Kronecker-factored optimizers (SOAP family, MOSO, PSGD); computed on device.
    """
    if max_rms == 0:
        return u
    rms = u.square().mean().sqrt()
    return u.mul_((max_rms / (rms + eps)).clamp(max=1.0))


# ---------------------------------------------------------------------------------------------- CPU bf16 units
#: ``/proc/cpuinfo`` flags of CPUs whose bf16 matmuls beat float32 ones: x86 AMX-BF16 (Intel Sapphire Rapids
#: and later) and AVX512-BF16 (Cooper Lake, AMD Zen 4 and later); ``bf16`` is the Arm (Armv8.6 BF16) feature.
BF16_MATMUL_CPU_FLAGS: frozenset[str] = frozenset({"amx_bf16", "avx512_bf16", "bf16"})


def bf16_matmul_in_cpu_flags(flags: Iterable[str] | None) -> bool:
    """Whether a set of CPU feature flags (``/proc/cpuinfo`` ``flags`` or Arm ``Features``) has bf16 matmul units.

    ``None`` (flags unknown) gives False. The rule behind :func:`cpu_has_bf16_matmul`.
    """
    if flags is None:
        return False
    return not BF16_MATMUL_CPU_FLAGS.isdisjoint(f.lower() for f in flags)


def _proc_cpu_flags() -> frozenset[str] | None:
    """The ``flags`` (x86) or ``Features`` (Arm) of the first processor in ``/proc/cpuinfo``; None if unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip().lower() in ("flags", "features"):
                    return frozenset(value.lower().split())
    except OSError:
        pass
    return None


def _torch_bf16_probe() -> bool:
    """torch's own CPU probes (cpuinfo/cpuid, also where ``/proc/cpuinfo`` is missing); False where absent.

    ``_is_amx_tile_supported`` also asks the OS for AMX state (Linux ``arch_prctl``), so it is False where the
    kernel does not let programs use the tiles even if the CPU has them.
    """
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(getattr(torch, "cpu", None), name, None)
        if probe is None:
            continue
        try:
            if probe():
                return True
        except Exception:  # a private API: any failure means "not known to be there"
            continue
    return False


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix-multiply units (AMX-BF16 or AVX512-BF16 on x86, BF16 on Arm).

    True when torch's probes (``torch.cpu._is_amx_tile_supported`` / ``_is_avx512_bf16_supported``) say so or
    ``/proc/cpuinfo`` lists ``amx_bf16``, ``avx512_bf16`` or (Arm) ``bf16``. Computed once (``cache_clear()``
    to redo). On such CPUs a bf16 matmul is faster than a float32 one (AMD EPYC with AVX512-BF16, one thread,
    256 x 256: 337 vs 92 GFLOP/s; ~10x on Intel AMX); without them (AVX2 only) torch emulates bf16 and it is
    several times slower than float32. It decides what Newton-Schulz runs in under ``"medium"``
    (:func:`~emerging_optimizers.orthogonalized_optimizers.muon_utils.ns_compute_dtype`).
    """
    return _torch_bf16_probe() or bf16_matmul_in_cpu_flags(_proc_cpu_flags())


@functools.lru_cache(maxsize=1)
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has usable AMX-BF16 tile units (Intel Sapphire Rapids and later).

    ``/proc/cpuinfo`` must list ``amx_bf16`` where it can be read, and torch's probe
    (``torch.cpu._is_amx_tile_supported``, which also asks the OS for the tile state) must agree where it exists.
    Computed once (``cache_clear()`` to redo). Informational (``emopt bench`` prints it): Newton-Schulz's
    precision follows the broader :func:`cpu_has_bf16_matmul`.
    """
    flags = _proc_cpu_flags()
    if flags is not None and "amx_bf16" not in flags:
        return False
    probe = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except Exception:  # a private API: any failure means "not known to be there"
            return False
    return flags is not None
