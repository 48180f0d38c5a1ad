r"""Newton-Schulz orthogonalization: map :math:`X = U \Sigma V^\top` to about :math:`U V^\top`.

Each step applies an odd polynomial to the singular values of :math:`X` (a, b, c from a coefficient set)::

    A <- X X^T ;  X <- a X + (b A + c A^2) X        (c == 0: the cubic step X <- a X + b A X)

after normalising :math:`X_0 = X / \max(\lVert X\rVert_F, \epsilon)` so every singular value is <= 1. A wide
shape is iterated (``m <= n``), a tall input is transposed first and back at the end.

Coefficient sets (:data:`COEFFICIENT_SETS`, each with how it is iterated past its last tuple):
``simple`` (Keller Jordan's single tuple), ``quintic`` (five tuples, cycled), ``polar_express``
(arXiv:2505.16932, with its 1.01 safety factor, the last tuple repeated), ``cans`` (arXiv:2506.10935,
last repeated), ``aol`` (cycled), ``deepseekv4`` (8 simple steps then 2 of (2, -1.5, 0.5), last repeated),
``cubic5`` (five cubic steps, exactly 5 steps) and ``custom`` (yours, ``custom_coefficient_sets``, cycled
unless ``iter_mode`` says otherwise).

Three ways to compute the *same* iteration (``method``); ``"auto"`` (the default) picks the cheapest
for the shape with a FLOP model (:func:`ns_flop_model`):

* ``"plain"``: the textbook step above, three GEMMs per step (the reference for the others).
* ``"symmetric"``: the same step, but ``X X^T`` and ``A^2`` are symmetric, so only their upper block
  triangle is multiplied and mirrored (measured ~0.75 of the time of those two products at m = 512; the
  whole 512 x 512 iteration ~0.82 of ``"plain"``). ``a`` is folded into the diagonal of the polynomial.
* ``"gram"``: for a wide :math:`m \times n` input, :math:`X_k = Q_k X_0` where :math:`Q_k` is a polynomial
  in :math:`G = X_0 X_0^\top`, and :math:`A_k = Q_k^2 G`. With :math:`P_k = a I + b A_k + c A_k^2`:
  :math:`Q_{k+1} = P_k Q_k` and :math:`A_{k+1} = P_k (P_k A_k)`, all symmetric :math:`m \times m` products;
  only ``G`` and :math:`Q X_0` touch the :math:`m \times n` matrix. Rounding errors of that recursion grow
  with the product of the steps' polynomials (an unbroken 10-step ``deepseekv4`` run diverges on a low-rank
  input), so it restarts from :math:`X_k = Q_k X_0` once the product of the segment's ``|a|`` would pass
  :data:`GRAM_GROWTH` (:data:`GRAM_FIRST_GROWTH` for the first segment; quintic runs as 3 + 2 steps). A
  segment of L >= 2 steps costs :math:`2 m^2 n + (4L - 3) m^3` multiply-adds (before the symmetric saving)
  instead of :math:`L (4 m^2 n + 2 m^3)`. ``"auto"`` uses it for wide enough shapes (about ``n >= 1.3 m``)
  and only with true float32/float64 products (512 x 2048: ~0.5 of ``"plain"``, measured). The symmetric and
  Gram forms also fold the normalisation into their small matrices, and a tall input's result is produced
  in its own (contiguous) layout.

Compute precision (:func:`ns_compute_dtype`): float64 for float64 input. Under
``torch.get_float32_matmul_precision() == "medium"`` (the default ``fp32_matmul_prec`` of Muon and most of the
orthogonalized family, set around the orthogonalization) bfloat16 where bf16 matmuls are faster: on a CUDA
device with bf16 support, and on a CPU with bf16 matrix units, AMX-BF16 or AVX512-BF16 on x86, BF16 on Arm
(:func:`emerging_optimizers.utils.cpu_has_bf16_matmul`; on CPU only for matrices at least
:data:`CPU_BF16_MIN_DIM` on their short side) -- the precision torch.optim.Muon and GPU users run.
float32 everywhere else: under ``"high"``/``"highest"``, and on CPUs without bf16 units (AVX2 only), where torch
emulates bf16 and a bf16 matmul is several times *slower* than a float32 one (the reference library casts to
bf16 under ``"medium"`` on every device). The gain, quintic x 5 on a gradient-like input (rank 16 + 30% noise),
float32 with ``method="auto"`` vs bf16, one thread (``benchmarks/ns_bf16_quality.py``): ~10x per matmul with
AMX; 1.65 / 3.3 / 2.2 / 1.9x at 128 x 512 / 512 x 512 / 512 x 2048 / 1024 x 4096 on an AMD EPYC with
AVX512-BF16 (0.9 / 11.0 / 30.6 / 286 ms against 1.5 / 36.1 / 67.9 / 537 ms), 1.05-1.8x on an earlier one
(float32 takes the Gram form on wide shapes, about half the work, which bf16 cannot use). Quality: the bf16
result differs from the float32 one by ~1% (relative Frobenius norm; up to ~3% for rank-4 inputs), its singular
values stay in float32's band (extremes within 0.006, at most 1.146 for quintic), and Muon on
``charlm-shakespeare`` (3 seeds) reaches val loss 2.131 +- 0.008 vs 2.124 +- 0.006 in float32
(``docs/compare-ns-bf16``). float32 products on CPU are made exact (``"highest"`` inside the iteration: with
``"medium"`` oneDNN silently rounds float32 matmul inputs to bf16 on CPUs with AMX), and only true
float32/float64 products may take the Gram form. ``compute_dtype=`` overrides the choice (``torch.float32`` for
results that do not depend on the machine, ``torch.bfloat16`` to force bf16).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal, get_args

import torch

from emerging_optimizers import utils as _eo_utils
from emerging_optimizers.utils import check_matrix, fp32_matmul_precision

__all__ = [
    "COEFFICIENT_SETS",
    "CPU_BF16_MIN_DIM",
    "CoeffIterMode",
    "NSCoeffT",
    "NSMethodT",
    "batched_newton_schulz_step",
    "check_ns_options",
    "batched_newton_schulz_step_tsyrk",
    "get_coefficient_iterator",
    "get_coefficients",
    "newton_schulz",
    "newton_schulz_step",
    "newton_schulz_step_tsyrk",
    "newton_schulz_tp",
    "distributed_normalize_p2",
    "ns_compute_dtype",
    "ns_flop_model",
    "prefers_batching",
]

_LOG = logging.getLogger(__name__)

NSCoeffT = Literal["simple", "quintic", "polar_express", "cans", "aol", "deepseekv4", "custom", "cubic5"]
CoeffIterMode = Literal["cycle", "repeat_last"]
NSMethodT = Literal["auto", "plain", "symmetric", "gram"]
CoeffT = tuple[float, float, float]

_SIMPLE: CoeffT = (3.4445, -4.7750, 2.0315)

#: name -> (tuples, how they continue past the last tuple)
COEFFICIENT_SETS: dict[str, tuple[tuple[CoeffT, ...], CoeffIterMode]] = {
    "simple": ((_SIMPLE,), "cycle"),
    "quintic": (
        (
            (4.0848, -6.8946, 2.9270),
            (3.9505, -6.3029, 2.6377),
            (3.7418, -5.5913, 2.3037),
            (2.8769, -3.1427, 1.2046),
            (2.8366, -3.0525, 1.2012),
        ),
        "cycle",
    ),
    "polar_express": (
        (
            (8.2051, -22.9019, 16.4607),
            (4.0664, -2.8612, 0.5184),
            (3.9096, -2.8234, 0.5250),
            (3.2856, -2.4153, 0.4853),
            (2.2779, -1.6198, 0.3985),
            (1.8726, -1.2307, 0.3585),
            (1.8564, -1.2132, 0.3568),
            (1.8750, -1.2500, 0.3750),
        ),
        "repeat_last",
    ),
    "cans": (
        (
            (8.4703, -25.1081, 18.6293),
            (4.1828, -3.1087, 0.5806),
            (3.9619, -2.9541, 0.5630),
            (3.2866, -2.4647, 0.5074),
            (2.2737, -1.6447, 0.4162),
        ),
        "repeat_last",
    ),
    "aol": (
        (
            (4.0098, -7.0585, 2.4635),
            (3.4585, -5.5479, 2.5959),
            (2.7573, -3.2939, 1.4254),
            (2.7215, -3.0494, 1.3169),
        ),
        "cycle",
    ),
    "deepseekv4": ((_SIMPLE,) * 8 + ((2.0, -1.5, 0.5),) * 2, "repeat_last"),
    "cubic5": (
        (
            (3.3656576, -3.3420992, 0.0),
            (2.5744352, -1.4957376, 0.0),
            (2.5368962, -1.4312570, 0.0),
            (2.4418906, -1.2764040, 0.0),
            (2.2230472, -0.9630650, 0.0),
        ),
        "cycle",
    ),
}
#: The same table in the reference library's shape: name -> list of (a, b, c) tuples (no iteration mode;
#: ``polar_express``, ``cans`` and ``deepseekv4`` repeat their last tuple, the others cycle).
_COEFFICIENT_SETS: dict[str, list[CoeffT]] = {name: list(tuples) for name, (tuples, _) in COEFFICIENT_SETS.items()}
_COEFF_TYPES: tuple[str, ...] = get_args(NSCoeffT)
_ITER_MODES: tuple[str, ...] = get_args(CoeffIterMode)
_METHODS: tuple[str, ...] = get_args(NSMethodT)
_FIXED_STEPS = {"cubic5": 5}
# Gram segments (module docstring). Inside a segment rounding errors grow with the product of the steps'
# ``|a|`` (the slope of the step polynomials at 0, the largest eigenvalue of Q); a new segment restarts from
# X_k = Q_k X_0. The first segment acts on X_0 (||X_0||_F = 1) and may grow by GRAM_FIRST_GROWTH, later ones
# act on nearly orthogonal matrices and may grow by GRAM_GROWTH. Measured against float64 on low-rank,
# fast-decaying and square inputs, every coefficient set then stays within ~3x of the plain float32 error;
# one unbroken segment reaches 4e-3 (quintic, rank 8) and diverges for polar_express and deepseekv4
# (negative rounding eigenvalues of G grow without bound).
GRAM_FIRST_GROWTH = 64.0
GRAM_GROWTH = 16.0
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------- coefficients
def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"Invalid steps: {steps!r}; the number of Newton-Schulz steps must be an integer >= 0.")
    return steps


def _check_coefficient_sets(sets: object, name: str = "custom_coefficient_sets") -> tuple[CoeffT, ...]:
    if isinstance(sets, (str, bytes)) or not isinstance(sets, Sequence) or len(sets) == 0:
        raise ValueError(f"Invalid {name}: {sets!r}; {name} must be non-empty: pass a sequence of (a, b, c) tuples.")
    out = []
    for i, t in enumerate(sets):
        if isinstance(t, (str, bytes)) or not isinstance(t, Sequence) or len(t) != 3:
            raise ValueError(f"Invalid {name}[{i}]: {t!r}; each entry must be an (a, b, c) tuple of 3 numbers.")
        for v in t:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"Invalid {name}[{i}]: {t!r}; a, b and c must be finite numbers.")
        out.append((float(t[0]), float(t[1]), float(t[2])))
    return tuple(out)


def get_coefficient_iterator(
    steps: int, coefficient_sets: Sequence[CoeffT], mode: CoeffIterMode = "cycle"
) -> Iterator[CoeffT]:
    """The ``steps`` (a, b, c) tuples to use: ``cycle`` wraps around, ``repeat_last`` repeats the last one."""
    _check_steps(steps)
    sets = _check_coefficient_sets(coefficient_sets, "coefficient_sets")
    if mode == "cycle":
        return itertools.islice(itertools.cycle(sets), steps)
    if mode == "repeat_last":
        return itertools.islice(itertools.chain(sets, itertools.repeat(sets[-1])), steps)
    raise ValueError(f"Invalid mode: {mode!r}; choose one of {', '.join(map(repr, _ITER_MODES))}.")


def get_coefficients(
    steps: int,
    coefficient_type: NSCoeffT = "quintic",
    custom_coefficient_sets: Sequence[CoeffT] | None = None,
    iter_mode: CoeffIterMode | None = None,
) -> list[CoeffT]:
    """Validate a coefficient choice and return the list of ``steps`` (a, b, c) tuples it means.

    ``iter_mode`` overrides how the set continues past its last tuple (``None``: the set's own mode;
    ``"cycle"`` for custom sets).
    """
    _check_steps(steps)
    if coefficient_type not in _COEFF_TYPES:
        raise ValueError(
            f"Invalid coefficient type: {coefficient_type!r}; coefficient_type must be one of "
            f"{', '.join(map(repr, _COEFF_TYPES))}."
        )
    if iter_mode is not None and iter_mode not in _ITER_MODES:
        raise ValueError(
            f"Invalid iter_mode: {iter_mode!r}; choose one of {', '.join(map(repr, _ITER_MODES))} or None."
        )
    if coefficient_type == "custom":
        if custom_coefficient_sets is None:
            raise ValueError(
                "custom_coefficient_sets must be provided when coefficient_type is 'custom', "
                "e.g. custom_coefficient_sets=[(3.4445, -4.7750, 2.0315)]."
            )
        sets, mode = _check_coefficient_sets(custom_coefficient_sets), "cycle"
    else:
        if custom_coefficient_sets is not None:
            raise ValueError(
                f"custom_coefficient_sets is only used with coefficient_type='custom' (got {coefficient_type!r}); "
                "pass coefficient_type='custom' or drop custom_coefficient_sets."
            )
        sets, mode = COEFFICIENT_SETS[coefficient_type]
        fixed = _FIXED_STEPS.get(coefficient_type)
        if fixed is not None and steps != fixed:
            raise ValueError(
                f"{coefficient_type} is a fixed {fixed}-step schedule (exactly {fixed} steps); got steps={steps}. "
                f"Use steps={fixed}, or "
                "coefficient_type='custom' with explicit custom_coefficient_sets."
            )
    return list(get_coefficient_iterator(steps, sets, iter_mode or mode))  # type: ignore[arg-type]


def check_ns_options(
    num_ns_steps: Any,
    coefficient_type: Any,
    custom_coefficient_sets: Any = None,
    *,
    min_steps: int = 1,
) -> None:
    """Validate an optimizer's Newton-Schulz options (the one check the whole family uses).

    ``num_ns_steps`` must be an integer ``>= min_steps``; the coefficient set must exist (``"custom"`` with
    valid ``custom_coefficient_sets``, fixed-length sets with their length). Raises ``ValueError``.
    """
    if isinstance(num_ns_steps, bool) or not isinstance(num_ns_steps, int) or num_ns_steps < min_steps:
        bound = f"at least {min_steps}" if min_steps else "positive or 0"
        raise ValueError(f"Invalid num_ns_steps: {num_ns_steps!r}; num_ns_steps must be {bound} (an integer).")
    get_coefficients(num_ns_steps, coefficient_type, custom_coefficient_sets)


# ---------------------------------------------------------------------------------------------- products
def _sym_blocks(m: int) -> int:
    """Row blocks of a symmetric product of size ``m`` (measured on CPU: no gain below ~384)."""
    return 1 if m < 384 else min(8, m // 128)


def _sym_factor(m: int) -> float:
    """Work of a blocked symmetric product relative to a full one, with a 10% allowance for the mirroring."""
    k = _sym_blocks(m)
    return 1.0 if k == 1 else min(1.0, (k + 1) / (2 * k) + 0.1)


def _sym_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched ``[B, m, k] @ [B, k, m]``) for a product known to be symmetric.

    Valid for ``b = a^T`` and for commuting symmetric ``a``, ``b`` (polynomials in one matrix). Only the
    upper block triangle is multiplied; the lower one is its mirror, so the result is exactly symmetric.
    """
    m = a.shape[-2]
    k = _sym_blocks(m)
    if k == 1:
        return torch.bmm(a, b)
    out = a.new_empty(a.shape[0], m, m)
    bounds = [(i * m) // k for i in range(k + 1)]
    for r0, r1 in itertools.pairwise(bounds):
        torch.bmm(a[:, r0:r1], b[:, :, r0:], out=out[:, r0:r1, r0:])
    for r0, r1 in itertools.pairwise(bounds[:-1]):
        out[:, r1:, r0:r1] = out[:, r0:r1, r1:].mT
    return out


def _sym_left_mul(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``p @ x`` for a symmetric ``p``, laid out like ``x``: a transposed view ``x`` gives ``(x^T p)^T``.

    Keeps a tall input iterated as its transpose contiguous in its own orientation (no strided updates).
    """
    if not x.is_contiguous() and x.mT.is_contiguous():
        return torch.bmm(x.mT, p).mT
    return torch.bmm(p, x)


# ---------------------------------------------------------------------------------------------- single steps
def _all_reduce_(t: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """Sum ``t`` in place over ``tp_group`` (no-op without a group): the Gram matrix of a column-sharded X."""
    if tp_group is not None:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=tp_group)
    return t


def _check_step_input(X: torch.Tensor, ndim: int, name: str) -> None:
    if not isinstance(X, torch.Tensor) or X.ndim != ndim:
        shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
        want = "a 2-D matrix (m, n)" if ndim == 2 else "a 3-D batch (B, m, n)"
        raise ValueError(f"{name} expects {want}, got {shape}.")


def newton_schulz_step(
    X: torch.Tensor, a: float, b: float, c: float, tp_group: torch.distributed.ProcessGroup | None = None
) -> torch.Tensor:
    """One Newton-Schulz step on a matrix ``X`` (m x n), with plain GEMMs::

        A = X X^T ;  X <- a X + (b A + c A^2) X        (c == 0: X <- a X + b A X)

    With ``tp_group``, ``X`` is one shard of a matrix split along its columns (the long side) and ``A`` is
    summed over the group, so every rank gets its own shard of the step's result. Returns a new tensor.
    """
    _check_step_input(X, 2, "newton_schulz_step")
    A = _all_reduce_(X @ X.mT, tp_group)
    if c != 0:
        return torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return torch.addmm(X, A, X, beta=a, alpha=b)


def batched_newton_schulz_step(
    X: torch.Tensor, a: float, b: float, c: float, tp_group: torch.distributed.ProcessGroup | None = None
) -> torch.Tensor:
    """:func:`newton_schulz_step` on every matrix of a batch ``X`` of shape ``(B, m, n)`` (``baddbmm``)."""
    _check_step_input(X, 3, "batched_newton_schulz_step")
    A = _all_reduce_(torch.bmm(X, X.mT), tp_group)
    if c != 0:
        return torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return torch.baddbmm(X, A, X, beta=a, alpha=b)


def _sym_step(
    x: torch.Tensor, a: float, b: float, c: float, scale: torch.Tensor | None = None, tp_group: Any = None
) -> torch.Tensor:
    """The same step on ``[B, m, n]``, multiplying only the upper block triangle of ``X X^T`` and ``A^2``.

    ``scale`` (``[B, 1, 1]``) is folded into the ``m x m`` matrices: the step of ``scale * x`` without
    forming it. ``a`` is added to the diagonal of the polynomial (no copy of ``X`` for the ``a X`` term).
    """
    gram = _sym_matmul(x, x.mT)
    if scale is not None:
        gram.mul_(scale * scale)
    _all_reduce_(gram, tp_group)
    poly = _sym_matmul(gram, gram).mul_(c).add_(gram, alpha=b) if c != 0 else gram.mul_(b)
    poly.diagonal(dim1=-2, dim2=-1).add_(a)
    if scale is not None:
        poly.mul_(scale)
    return _sym_left_mul(poly, x)


def newton_schulz_step_tsyrk(
    X: torch.Tensor, a: float, b: float, c: float, tp_group: torch.distributed.ProcessGroup | None = None
) -> torch.Tensor:
    """:func:`newton_schulz_step` with symmetric ("SYRK") products for ``X X^T`` and ``A^2``.

    The reference library runs this step with a Triton kernel on some NVIDIA GPUs only; here the symmetric
    products are blocked matmuls (only the upper block triangle is computed, then mirrored), so it runs on
    every device and dtype. Equal to :func:`newton_schulz_step` up to rounding.
    """
    _check_step_input(X, 2, "newton_schulz_step_tsyrk")
    return _sym_step(X.unsqueeze(0), a, b, c, tp_group=tp_group).squeeze(0)


def batched_newton_schulz_step_tsyrk(
    X: torch.Tensor, a: float, b: float, c: float, tp_group: torch.distributed.ProcessGroup | None = None
) -> torch.Tensor:
    """:func:`newton_schulz_step_tsyrk` on every matrix of a batch ``(B, m, n)``."""
    _check_step_input(X, 3, "batched_newton_schulz_step_tsyrk")
    return _sym_step(X, a, b, c, tp_group=tp_group)


# ---------------------------------------------------------------------------------------------- iterations
# Each takes the *unnormalised* x of shape [B, m, n] and scale = 1 / max(||x||_F, eps) of shape [B, 1, 1]
# (or None when x is already normalised). The fast variants fold the scale into their m x m matrices.
def _ns_plain(x: torch.Tensor, coeffs: Sequence[CoeffT], scale: torch.Tensor | None = None) -> torch.Tensor:
    """Reference iteration: :func:`batched_newton_schulz_step`, three GEMMs per step."""
    if scale is not None:
        x = x * scale
    for a, b, c in coeffs:
        x = batched_newton_schulz_step(x, a, b, c)
    return x


def _ns_symmetric(x: torch.Tensor, coeffs: Sequence[CoeffT], scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same iteration with symmetric products (:func:`_sym_step`); the scale is folded into the first step."""
    if not coeffs:
        return x if scale is None else x * scale
    for i, (a, b, c) in enumerate(coeffs):
        x = _sym_step(x, a, b, c, scale if i == 0 else None)
    return x


def _ns_gram_segment(x: torch.Tensor, coeffs: Sequence[CoeffT], scale: torch.Tensor | None = None) -> torch.Tensor:
    """A few steps through ``X_k = Q_k X_0``: only ``m x m`` products inside (module docstring)."""
    gram = _sym_matmul(x, x.mT)  # A_0 = G
    if scale is not None:
        gram.mul_(scale * scale)
    q: torch.Tensor | None = None
    last = len(coeffs) - 1
    for i, (a, b, c) in enumerate(coeffs):
        if c != 0:
            p = _sym_matmul(gram, gram).mul_(c).add_(gram, alpha=b)
        else:
            p = gram.mul(b)
        p.diagonal(dim1=-2, dim2=-1).add_(a)
        q = p if q is None else _sym_matmul(p, q)
        if i != last:
            gram = _sym_matmul(p, _sym_matmul(p, gram))  # A_{k+1} = P_k A_k P_k
    assert q is not None
    if scale is not None:
        q.mul_(scale)
    return _sym_left_mul(q, x)


def _gram_segments(coeffs: Sequence[Any]) -> list[Sequence[Any]]:
    """Split the steps into Gram segments (see :data:`GRAM_GROWTH`); every segment has >= 1 step."""
    if isinstance(coeffs, tuple):
        return list(_gram_segments_cached(coeffs))
    return _split_gram_segments(coeffs)


@functools.lru_cache(maxsize=64)
def _gram_segments_cached(coeffs: tuple[CoeffT, ...]) -> tuple[Sequence[Any], ...]:
    return tuple(_split_gram_segments(coeffs))


def _split_gram_segments(coeffs: Sequence[Any]) -> list[Sequence[Any]]:
    segments: list[Sequence[Any]] = []
    start, growth, limit = 0, 1.0, GRAM_FIRST_GROWTH
    for i, (a, _, _) in enumerate(coeffs):
        if i > start and growth * abs(a) > limit:
            segments.append(coeffs[start:i])
            start, growth, limit = i, 1.0, GRAM_GROWTH
        growth *= abs(a)
    if start < len(coeffs):
        segments.append(coeffs[start:])
    return segments


def _ns_gram(x: torch.Tensor, coeffs: Sequence[CoeffT], scale: torch.Tensor | None = None) -> torch.Tensor:
    """The iteration in Gram form, restarted from ``X_k = Q_k X_0`` at every segment (:func:`_gram_segments`)."""
    if not coeffs:
        return x if scale is None else x * scale
    for segment in _gram_segments(coeffs):
        x = _ns_gram_segment(x, segment, scale)
        scale = None
    return x


_IMPLS = {"plain": _ns_plain, "symmetric": _ns_symmetric, "gram": _ns_gram}

_CPU_BATCH_MAX_NUMEL = 1 << 16
# Fixed cost of one product call, in multiply-adds (~5 us of Python and dispatch at ~50 GMAC/s).
_CALL_OVERHEAD = 2.5e5


def ns_flop_model(method: str, m: int, n: int, coeffs: Sequence[CoeffT]) -> float:
    """Multiply-adds (plus a per-call overhead) of one ``m x n`` iteration (``m <= n``) with ``method``."""
    s = _sym_factor(m)
    calls = _sym_blocks(m)
    quintic = [c != 0 for _, _, c in coeffs]
    if method == "plain":
        return sum(2 * m * m * n + (m**3 if q else 0) + (3 if q else 2) * _CALL_OVERHEAD for q in quintic)
    if method == "symmetric":
        per = [
            s * m * m * n + m * m * n + (s * m**3 if q else 0) + (1 + calls * (2 if q else 1)) * _CALL_OVERHEAD
            for q in quintic
        ]
        return sum(per)
    if method == "gram":
        total = 0.0
        for seg in _gram_segments(coeffs):
            last = len(seg) - 1
            products = sum(int(c != 0) + int(i > 0) + 2 * int(i < last) for i, (_, _, c) in enumerate(seg))
            total += s * m * m * n + m * m * n + products * (s * m**3 + calls * _CALL_OVERHEAD) + 2 * _CALL_OVERHEAD
        return total
    raise ValueError(f"Invalid method: {method!r}; choose one of {', '.join(map(repr, _METHODS))}.")


def _choose_method(m: int, n: int, coeffs: Sequence[CoeffT], allow_gram: bool, allow_symmetric: bool = True) -> str:
    return _choose_method_cached(m, n, tuple(coeffs), allow_gram, allow_symmetric)


@functools.lru_cache(maxsize=256)
def _choose_method_cached(m: int, n: int, coeffs: tuple[CoeffT, ...], allow_gram: bool, allow_symmetric: bool) -> str:
    """:func:`_choose_method`, remembered: the FLOP model costs more than a small matrix's iteration."""
    candidates = ["plain"] + ["symmetric"] * allow_symmetric + ["gram"] * allow_gram
    return min(candidates, key=lambda meth: ns_flop_model(meth, m, n, coeffs))


@functools.lru_cache(maxsize=64, typed=True)
def _cached_coefficients(steps: int, coefficient_type: str, custom: tuple[CoeffT, ...] | None,
                         iter_mode: CoeffIterMode | None) -> tuple[CoeffT, ...]:
    return tuple(get_coefficients(steps, coefficient_type, custom, iter_mode))  # type: ignore[arg-type]


def _coefficients(steps: Any, coefficient_type: Any, custom: Any, iter_mode: Any) -> tuple[CoeffT, ...]:
    """:func:`get_coefficients` as a tuple, validated once per choice (custom sets given as tuples of tuples
    of numbers are remembered too; anything else is validated on every call)."""
    if custom is not None and not (
        isinstance(custom, tuple) and all(isinstance(t, tuple) and all(type(v) in (int, float) for v in t)
                                          for t in custom)
    ):
        return tuple(get_coefficients(steps, coefficient_type, custom, iter_mode))
    try:
        return _cached_coefficients(steps, coefficient_type, custom, iter_mode)
    except TypeError:  # unhashable arguments: let get_coefficients say what is wrong
        return tuple(get_coefficients(steps, coefficient_type, custom, iter_mode))


def prefers_batching(device: torch.device, m: int, n: int) -> bool:
    """Whether a stack of ``m x n`` matrices is faster as one batch than one matrix at a time.

    On CPU a large matrix is faster alone: its iterates stay in cache (measured: 8 x 512 x 512 plain
    iteration 8% slower batched, 4 x 512 x 2048 22% slower); small ones gain from fewer calls.
    """
    return device.type != "cpu" or m * n < _CPU_BATCH_MAX_NUMEL


#: On CPU, matrices whose short side is below this keep float32 under ``"medium"`` even with bf16 units: a bf16
#: product there has a fixed cost of ~20 us (quintic x 5 on a 32 x 32 matrix: 0.31 ms in bf16, 0.075 in
#: float32) that small matrices do not pay back. Measured, AMD EPYC with AVX512-BF16, one thread, float32 time
#: over bf16 time: 64 x 64 0.47, 64 x 128 0.66, 64 x 512 0.89, 96 x 96 0.91; 128 x 128 1.59, 128 x 256 1.88,
#: 256 x 256 3.43.
CPU_BF16_MIN_DIM = 128


def ns_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the iteration runs in for ``x`` (module docstring, "Compute precision").

    float64 for float64 input. Under ``torch.get_float32_matmul_precision() == "medium"``: bfloat16 on a CUDA
    device with bf16 support, and on a CPU with bf16 matrix units (AMX-BF16, AVX512-BF16, Arm BF16:
    :func:`~emerging_optimizers.utils.cpu_has_bf16_matmul`) for matrices whose short side is at least
    :data:`CPU_BF16_MIN_DIM` (smaller ones are faster in float32 there), where it is 1.6-10x faster than
    float32; float32 otherwise (other devices, CPUs without bf16 units, ``"high"``/``"highest"``).
    """
    return _ns_dtype(x, min(x.shape[-2:], default=0))


def _ns_dtype(x: torch.Tensor, short_side: int) -> torch.dtype:
    """:func:`ns_compute_dtype` with the matrix's short side given (for a tensor-parallel shard, the whole
    matrix's: every rank, and a single process orthogonalizing the whole matrix, pick the same dtype)."""
    if x.dtype == torch.float64:
        return torch.float64
    if torch.get_float32_matmul_precision() == "medium":
        if x.device.type == "cpu":
            if short_side >= CPU_BF16_MIN_DIM and _eo_utils.cpu_has_bf16_matmul():
                return torch.bfloat16  # (units looked up per call: tests patch them)
        elif x.is_cuda and torch.cuda.is_bf16_supported():
            return torch.bfloat16
    return torch.float32


def _exact_matmul_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """True float32 products on CPU: ``"high"``/``"medium"`` let oneDNN use bf16 on CPUs with AMX."""
    if dtype == torch.float32 and device.type == "cpu" and torch.get_float32_matmul_precision() != "highest":
        return fp32_matmul_precision("highest")
    return contextlib.nullcontext()


def _gram_is_safe(device: torch.device, dtype: torch.dtype) -> bool:
    """The Gram form needs true float32/float64 products (TF32/bf16 rounding breaks its recursion)."""
    if dtype == torch.float64:
        return True
    return dtype == torch.float32 and (device.type == "cpu" or torch.get_float32_matmul_precision() == "highest")


# ---------------------------------------------------------------------------------------------- public entry
#: How often a ``use_syrk`` fallback is logged (as the reference does).
_SYRK_SKIP_LOG_LIMIT = 8
_syrk_skips = 0


def _log_syrk_skip(shape: tuple[int, ...]) -> None:
    global _syrk_skips
    if _syrk_skips < _SYRK_SKIP_LOG_LIMIT:
        _syrk_skips += 1
        _LOG.error(
            "[SYRK-SKIP] skipping SYRK for shape %s because GEMM M or N is not a multiple of 8 (16-byte aligned); "
            "using GEMM.",
            shape,
        )


def distributed_normalize_p2(
    x: torch.Tensor, eps: float, group: torch.distributed.ProcessGroup, normalize_in_double: bool = False
) -> torch.Tensor:
    """``x`` divided by the Frobenius norm of the whole matrix it is a shard of (squares summed over ``group``).

    Each matrix of a batch ``[..., m, n]`` gets its own norm, its squares summed in float64 (no overflow for
    huge entries, no underflow for tiny ones). The norm is floored at ``eps``, except with
    ``normalize_in_double``: as in the reference library it is then not floored (an all-zero matrix gives NaN).
    """
    acc = torch.float64  # a float32 sum of squares overflows for norms above ~1.8e19
    sq = x.to(acc).square().sum(dim=(-2, -1), keepdim=True)
    _all_reduce_(sq, group)
    norm = sq.sqrt()
    if not normalize_in_double:
        norm = norm.clamp_min(eps)
    return (x.to(acc) / norm).to(x.dtype)


def newton_schulz(
    x: torch.Tensor,
    steps: int,
    coefficient_type: NSCoeffT = "quintic",
    custom_coefficient_sets: Sequence[CoeffT] | None = None,
    eps: float = 1e-15,
    transpose: bool | None = None,
    tp_group: torch.distributed.ProcessGroup | None = None,
    use_syrk: bool = False,
    normalize_in_double: bool = False,
    *,
    method: NSMethodT = "auto",
    iter_mode: CoeffIterMode | None = None,
    compute_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximately orthogonalize ``x`` (2-D, or a batch ``[..., m, n]`` of matrices) with Newton-Schulz.

    The positional arguments are the reference library's, in its order; ``method`` and the rest are ours.

    Args:
        x: float32, bfloat16, float16 or float64 tensor with ``ndim >= 2``; leading dims are a batch.
        steps: number of iterations (>= 0; 0 returns the normalised input; ``cubic5`` needs exactly 5).
        coefficient_type: a name in :data:`COEFFICIENT_SETS` or ``"custom"``.
        custom_coefficient_sets: the (a, b, c) tuples for ``coefficient_type="custom"``.
        eps: floor of the Frobenius norm used to normalise (an all-zero input gives zeros).
        transpose: iterate on ``x^T``; ``None`` transposes tall inputs (rows > cols) so the work is on the
            short side.
        tp_group: ``x`` is one shard of a matrix split along its long side (after ``transpose``) over this
            process group: the norm and every Gram matrix are summed over the group (plain products) and the
            result is this rank's shard. See :func:`newton_schulz_tp`.
        use_syrk: under ``torch.get_float32_matmul_precision() == "medium"`` (the reference's bf16 mode),
            compute the two symmetric products of each step with :func:`newton_schulz_step_tsyrk` when both
            matrix dims are multiples of 8; other shapes fall back to the GEMM step with a logged
            ``[SYRK-SKIP]`` error, as in the reference. No effect at other precisions (``method="auto"``
            already picks symmetric products where they pay). Needs ``method="auto"``.
        normalize_in_double: reduce the Frobenius norm in float64 and, as the reference, do not floor it at
            ``eps`` (an input of norm 1e-28 is normalised exactly; an all-zero input gives NaN).
        method: ``"auto"``, ``"plain"``, ``"symmetric"`` or ``"gram"`` (module docstring).
        iter_mode: override how the coefficient set continues past its last tuple.
        compute_dtype: force the compute dtype (default: :func:`ns_compute_dtype`).
        out_dtype: dtype of the result (default: ``x.dtype``).

    Returns:
        A tensor of ``x``'s shape whose singular values are the iterated polynomial of the normalised ones.
    """
    if isinstance(x, torch.Tensor) and x.ndim >= 2 and x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"newton_schulz supports float32, bfloat16, float16 and float64 input, got {x.dtype}; "
            "convert with x.float()."
        )
    check_matrix(x, "newton_schulz", max_ndim=None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"Invalid eps: {eps!r}; it must be a finite number > 0.")
    if transpose is not None and not isinstance(transpose, bool):
        raise ValueError(f"Invalid transpose: {transpose!r}; use True, False or None (transpose tall inputs).")
    if not isinstance(use_syrk, bool):
        raise TypeError(f"Invalid use_syrk: {use_syrk!r}; it must be True or False.")
    if method not in _METHODS:
        raise ValueError(f"Invalid method: {method!r}; choose one of {', '.join(map(repr, _METHODS))}.")
    if use_syrk and method != "auto":
        raise ValueError(f"use_syrk=True chooses the products itself; leave method='auto' (got {method!r}).")
    if tp_group is not None and method not in ("auto", "plain"):
        raise ValueError(f"tp_group runs the plain (or use_syrk) products; leave method='auto' (got {method!r}).")
    if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"Invalid compute_dtype: {compute_dtype!r}; use a floating dtype.")
    coeffs = _coefficients(steps, coefficient_type, custom_coefficient_sets, iter_mode)
    out_dtype = x.dtype if out_dtype is None else out_dtype

    shape = x.shape
    rows, cols = shape[-2], shape[-1]
    if transpose is None:
        transpose = rows > cols
    if x.numel() == 0:
        return torch.empty(shape, dtype=out_dtype, device=x.device)
    y = x.reshape(-1, rows, cols)
    if transpose:
        y = y.mT
    m, n = y.shape[-2], y.shape[-1]
    if compute_dtype is not None:
        cdtype = compute_dtype
    else:  # a tensor-parallel shard is split along n: the whole matrix's short side decides, as on one process
        world = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
        cdtype = _ns_dtype(x, min(m, n * world))

    # Which step functions: the public single-step functions (looked up at call time) for the reference's
    # paths (use_syrk under "medium", tp_group, method="plain"); a whole-iteration form otherwise.
    stepwise: str | None = None
    if use_syrk and torch.get_float32_matmul_precision() == "medium":
        if m % 8 == 0 and n % 8 == 0:
            stepwise = "tsyrk"
        else:
            _log_syrk_skip(tuple(y.shape[1:]) if x.ndim > 2 else (m, n))
            stepwise = "gemm"
    elif tp_group is not None or method == "plain":
        stepwise = "gemm"

    # X_0 = x * scale with scale = 1 / max(||x||_F, eps), per matrix
    if tp_group is not None:
        y = distributed_normalize_p2(y, eps, tp_group, normalize_in_double).to(cdtype)
        scale: torch.Tensor | None = None
    else:
        # The norm is reduced in float64: a float32 sum of squares overflows for ||x|| above ~1.8e19.
        norm = torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True, dtype=torch.float64)
        if not normalize_in_double:
            norm = norm.clamp_min(eps)
        inv_norm = norm.reciprocal()
        scale = None
        if normalize_in_double or cdtype == torch.float16 or stepwise is not None:
            # fp16: normalise first, x x^T could overflow; step functions take the normalised matrix
            y = (y.to(torch.float64) * inv_norm).to(cdtype)
        else:
            # The fast forms fold the scale into x x^T, formed from the unscaled x: first bring ||x|| into
            # [0.5, 1) by a power of two (exact), so x x^T cannot overflow; the result is unchanged.
            # e = floor(log2 ||x||) + 1 as a float64 integer (frexp's exponent, or one more when log2 rounds up:
            # either way a power of two, exact); clamped so 2**-e stays a normal number in every compute dtype.
            # Not torch.frexp: torch.compile's CPU code generator fails on its int32 exponent.
            # (torch.ldexp(v, e) is v * 2.0**e: written out, with 2**-e as the exact reciprocal of 2**e.)
            pow2 = torch.pow(2.0, torch.log2(norm).floor_().add_(1).clamp_(-126, 126))
            y = y.to(cdtype) * pow2.reciprocal().to(cdtype)
            scale = inv_norm.mul_(pow2).to(cdtype)

    if stepwise is None and method == "auto":
        # bf16/fp16 products are fast enough that the blocked symmetric ones lose to one plain GEMM (measured).
        # Custom coefficients run the plain form: the other forms were validated for the built-in sets only,
        # and a user's polynomial may grow the iterates (the plain form then rounds as the textbook step does).
        exact = cdtype in (torch.float32, torch.float64) and coefficient_type != "custom"
        allow_gram = _gram_is_safe(y.device, cdtype) and coefficient_type != "custom"
        method = _choose_method(min(m, n), max(m, n), coeffs, allow_gram, exact)  # type: ignore[assignment]

    def run_steps(z: torch.Tensor) -> torch.Tensor:
        two_d = x.ndim == 2
        names = {"gemm": ("newton_schulz_step", "batched_newton_schulz_step"),
                 "tsyrk": ("newton_schulz_step_tsyrk", "batched_newton_schulz_step_tsyrk")}[stepwise]  # type: ignore[index]
        step_fn = globals()[names[0] if two_d else names[1]]  # resolved per call: patched functions are honoured
        if two_d:
            z = z[0]
        for a, b, c in coeffs:
            z = step_fn(z, a, b, c, tp_group=tp_group)
        return z.unsqueeze(0) if two_d else z

    def run(z: torch.Tensor, sc: torch.Tensor | None) -> torch.Tensor:
        if stepwise is not None:
            z = run_steps(z)
        elif method == "gram" and m > n:  # Q_k would be m x m: iterate on z^T (same result: odd polynomial)
            z = _ns_gram(z.mT, coeffs, sc).mT
        else:
            z = _IMPLS[method](z, coeffs, sc)
        return (z.mT if transpose else z).to(out_dtype).contiguous()

    with _exact_matmul_context(y.device, cdtype):
        if y.shape[0] > 1 and stepwise is None and not prefers_batching(y.device, m, n):
            out = torch.cat([run(y[i : i + 1], None if scale is None else scale[i : i + 1]) for i in range(y.shape[0])])
        else:
            out = run(y, scale)
    return out.reshape(shape)


def newton_schulz_tp(
    x: torch.Tensor,
    steps: int,
    coefficient_type: NSCoeffT,
    tp_group: torch.distributed.ProcessGroup,
    partition_dim: int | None = None,
    tp_mode: Literal["duplicated", "distributed"] = "duplicated",
    use_syrk: bool = False,
    *,
    mode: Literal["duplicated", "distributed"] | None = None,
) -> torch.Tensor:
    """Newton-Schulz of a matrix sharded over a tensor-parallel group; returns this rank's shard.

    ``mode`` is a keyword-only alias of ``tp_mode`` (the reference library's name is ``tp_mode``).

    ``x`` is this rank's shard, split along ``partition_dim`` (``None``: not sharded, plain
    :func:`newton_schulz`). ``tp_mode``:

    * ``"duplicated"``: all-gather the shards, orthogonalize the whole matrix on every rank, keep this
      rank's chunk (communication: one all-gather of the matrix; compute: the whole iteration per rank);
    * ``"distributed"``: iterate on the shards, all-reducing the Gram matrix of every step (``m x m`` floats
      per step over the short side; sharding along the short side would make the Gram the long side's).

    Shards must be equal (``torch.chunk`` layout).
    """
    if mode is not None:
        if tp_mode != "duplicated" and tp_mode != mode:
            raise ValueError(f"newton_schulz_tp got tp_mode={tp_mode!r} and mode={mode!r}; give one of them.")
        tp_mode = mode
    if partition_dim is None:
        return newton_schulz(x, steps, coefficient_type, use_syrk=use_syrk)
    if tp_mode not in ("duplicated", "distributed"):
        raise ValueError(f"Invalid tp_mode: {tp_mode!r}; use 'duplicated' or 'distributed'.")
    if x.ndim != 2:
        raise ValueError(f"newton_schulz_tp expects a 2-D shard, got shape {tuple(x.shape)}.")
    if partition_dim not in (0, 1, -1, -2):
        raise ValueError(f"Invalid partition_dim: {partition_dim!r}; a 2-D shard is split along 0 or 1.")
    if tp_group is None:
        raise ValueError("newton_schulz_tp needs a tp_group when partition_dim is set.")
    partition_dim %= 2
    world = torch.distributed.get_world_size(tp_group)
    if tp_mode == "duplicated":
        shards = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(shards, x.contiguous(), group=tp_group)
        full = newton_schulz(torch.cat(shards, dim=partition_dim), steps, coefficient_type, use_syrk=use_syrk)
        return full.chunk(world, dim=partition_dim)[torch.distributed.get_rank(tp_group)].contiguous()
    return newton_schulz(x, steps, coefficient_type, transpose=partition_dim == 0, tp_group=tp_group, use_syrk=use_syrk)
