r"""Inverse roots of symmetric positive (semi-)definite matrices: :math:`A^{-1/p}`.

* :func:`inverse_root` — the general :math:`p`-th inverse root Shampoo uses, with absolute and relative
  regularisation, by eigendecomposition (default) or by a coupled Newton iteration (matmuls only).
* :func:`inv_root_via_eigh` — :math:`A^{-1/2}` by ``eigh`` with the eigenvalues floored at ``eps``.
* :func:`mat_root_inv_via_scaled_cans` — :math:`A^{-1/2}` by the coupled Newton–Schulz iteration with
  Chebyshev-optimal (CANS) cubic polynomials, arXiv:2506.10935: ten fixed steps of matmuls, float32 only.

Every function accepts one matrix ``(n, n)`` or a batch ``(b, n, n)`` and returns the same shape. None of them
synchronises the host, except that ``eigh`` (and its float64 retry on failure) waits for its own result.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from emerging_optimizers.utils import MatrixShapeError, fp32_matmul_precision
from emerging_optimizers.utils.eig import eigh_with_fallback

__all__ = ["InverseRootMethodT", "inv_root_via_eigh", "inverse_root", "mat_root_inv_via_scaled_cans"]

InverseRootMethodT = Literal["eigh", "newton"]
INVERSE_ROOT_METHODS: tuple[str, ...] = ("eigh", "newton")


def _check_square(x: object, name: str, *, max_ndim: int | None = 3) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}.")
    ok_ndim = x.dim() >= 2 and (max_ndim is None or x.dim() <= max_ndim)
    if not ok_ndim or x.shape[-1] != x.shape[-2]:
        raise MatrixShapeError(
            f"{name}: x must be a square matrix or a batch of square matrices (2-D or 3-D), got shape "
            f"{tuple(x.shape)}."
        )
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point tensor, got {x.dtype}.")
    return x


# ---------------------------------------------------------------------------------------------- CANS
def _cans_cubic(a: float, b: float) -> tuple[float, float, float, float]:
    r"""The odd cubic :math:`q(s) = \beta s + \alpha s^3` closest to 1 in the max norm on :math:`[a, b]`.

    It equioscillates at :math:`a`, its maximum :math:`s^* = \sqrt{(a^2+ab+b^2)/3}` and :math:`b`:
    :math:`q(a) = q(b) = 1-\delta`, :math:`q(s^*) = 1+\delta`. Returns ``(beta, alpha, 1-delta, 1+delta)``,
    the last two being the interval the next step starts from.
    """
    s2 = a * a + a * b + b * b
    peak = math.sqrt(s2 / 3.0)
    alpha = -2.0 / (a * b * (a + b) + 2.0 * peak**3)
    beta = -alpha * s2
    return beta, alpha, -alpha * a * b * (a + b), -2.0 * alpha * peak**3


def _cans_coefficients(lower: float = 8.5e-4, steps: int = 9, safety: float = 1.01) -> tuple[tuple[float, float], ...]:
    r"""``(beta, alpha)`` of every step of :func:`mat_root_inv_via_scaled_cans`, derived here.

    In the coupled iteration the square roots :math:`s` of the eigenvalues of :math:`ZY` follow
    :math:`s \leftarrow q(s)`, starting from :math:`s = \sqrt{\lambda / \|A\|}` in :math:`[\text{lower}, 1]`
    (``lower = 8.5e-4`` covers eigenvalue ratios down to ~7e-7). ``steps`` Chebyshev-optimal cubics each shrink
    the interval around 1, then one classic Newton–Schulz step :math:`(3/2, -1/2)` polishes. Normalising by
    ``safety * ||A||_inf`` (room for the norm's rounding) is folded into the coefficients: ``alpha / safety``
    for the coupled steps; the last step also absorbs the output factor :math:`1/\sqrt{\text{safety}}`.
    """
    pairs: list[tuple[float, float]] = []
    a, b = lower, 1.0
    for _ in range(steps):
        beta, alpha, a, b = _cans_cubic(a, b)
        pairs.append((beta, alpha / safety))
    pairs.append((1.5 / math.sqrt(safety), -0.5 / safety**1.5))
    return tuple(pairs)


_CANS_COEFFICIENTS = _cans_coefficients()


def mat_root_inv_via_scaled_cans(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r""":math:`x^{-1/2}` of a float32 SPD matrix (or batch) by the coupled CANS Newton–Schulz iteration.

    With :math:`n = \max(\|x\|_\infty, \epsilon)` (the max row sum: a cheap upper bound of the spectral norm),
    :math:`Y_0 = x/n`, :math:`Z_0 = I`, each step :math:`P = Z Y`, :math:`Z \leftarrow \beta Z + \alpha P Z`,
    :math:`Y \leftarrow \beta Y + \alpha Y P` drives :math:`Z \to (x/n)^{-1/2}`; the result is
    :math:`Z/\sqrt{n}`, symmetrised. Ten fixed steps (:func:`_cans_coefficients`). Measured against the float64
    root (n = 24): ~2e-5 relative up to condition number 1e4; beyond, float32 rounding of ``x`` dominates, as
    for float32 ``eigh`` (~2e-4 at 1e5, ~2e-3 at 1e6). Eigenvalues below ~7e-7 of :math:`n` converge only partly
    (their inverse root comes out too small, which errs on the safe side); where rows cancel strongly, the
    infinity norm overestimates the spectrum and slows the smallest eigenvalues further.

    Args:
        x: symmetric positive-definite float32 matrix ``(n, n)`` or batch ``(b, n, n)``.
        eps: floor of the normalisation.

    Raises:
        TypeError: ``x`` is not a square 2-D/3-D matrix (``MatrixShapeError``, also a ``ValueError``) or not
            float32.
        RuntimeError: the float32 matmul precision is ``"medium"`` (bfloat16 products cannot reach the accuracy).
    """
    _check_square(x, "mat_root_inv_via_scaled_cans")
    if x.dtype != torch.float32:
        raise TypeError(f"mat_root_inv_via_scaled_cans: x must be in float32, got {x.dtype}.")
    if torch.get_float32_matmul_precision() == "medium":
        raise RuntimeError(
            "mat_root_inv_via_scaled_cans: `medium` float32 matmul precision (bfloat16 products) is insufficient "
            "for CANS; use `high` or `highest`."
        )
    norm = torch.linalg.matrix_norm(x, ord=float("inf"), keepdim=True).clamp_min(eps)
    y = x / norm
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    z = eye.expand_as(x)
    zy = y  # Z Y with Z = I
    last = len(_CANS_COEFFICIENTS) - 1
    for k, (beta, alpha) in enumerate(_CANS_COEFFICIENTS):
        z_next = beta * z + alpha * (zy @ z)
        if k < last:
            y = beta * y + alpha * (y @ zy)
            zy = z_next @ y
        z = z_next
    z = z * norm.rsqrt()
    return 0.5 * (z + z.mT)


# ---------------------------------------------------------------------------------------------- eigh
def inv_root_via_eigh(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r""":math:`x^{-1/2} = V \operatorname{diag}(\max(w, \epsilon)^{-1/2}) V^\top` of a symmetric matrix (or batch).

    Eigenvalues below ``eps`` (tiny, zero or negative from rounding) are raised to ``eps``. The decomposition
    runs in float32 (float64 for float64 input) and is retried in float64 if it fails.
    """
    _check_square(x, "inv_root_via_eigh", max_ndim=None)
    w, v = eigh_with_fallback(x)
    return (v * w.clamp_min(eps).rsqrt().unsqueeze(-2)) @ v.mT


# ---------------------------------------------------------------------------------------------- general p
def _coupled_newton_inverse_root(a: torch.Tensor, p: int, iters: int) -> torch.Tensor:
    r"""Coupled Newton iteration for :math:`a^{-1/p}` (Guo & Higham, 2006), a fixed number of steps.

    With :math:`c = (p+1) / (2\|a\|_F)`: :math:`X_0 = c^{1/p} I`, :math:`M_0 = c\,a`; each step
    :math:`T = ((p+1)I - M)/p`, :math:`X \leftarrow X T`, :math:`M \leftarrow T^p M`. The invariant
    :math:`M = X^p a` holds throughout and :math:`M \to I`, so :math:`X \to a^{-1/p}`. An eigenvalue
    :math:`\mu` of :math:`M` far below 1 grows by :math:`((p+1)/p)^p` (about 2.4 for :math:`p = 4`) per step,
    then converges quadratically: ``iters`` bounds the condition number that converges fully.
    """
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    fro = torch.linalg.matrix_norm(a, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    c = (p + 1) / (2.0 * fro)
    m = a * c
    x = eye * c.pow(1.0 / p)
    for _ in range(iters):
        t = ((p + 1) * eye - m) / p
        x = x @ t
        m = torch.linalg.matrix_power(t, p) @ m
    return x


def inverse_root(
    x: torch.Tensor,
    p: float,
    *,
    method: InverseRootMethodT = "eigh",
    epsilon: float = 1e-12,
    relative_epsilon: float = 0.0,
    newton_iters: int = 40,
) -> torch.Tensor:
    r""":math:`(x + \epsilon_{\text{tot}} I)^{-1/p}` of a symmetric PSD matrix (or batch): Shampoo's inverse root.

    The regularisation is :math:`\epsilon_{\text{tot}} = \epsilon + \epsilon_{\text{rel}}\,\lambda_{\max}`:
    ``epsilon`` is absolute (Distributed Shampoo's ``epsilon``), ``relative_epsilon`` scales with the largest
    eigenvalue (the JAX Shampoo's ridge), so it bounds the amplification of the smallest directions to
    :math:`\epsilon_{\text{rel}}^{-1/p}` whatever the gradients' scale.

    ``method``:

    * ``"eigh"`` (default): :math:`V \operatorname{diag}((\max(w, 0) + \epsilon_{\text{tot}})^{-1/p}) V^\top`;
      float32 (float64 input: float64), retried in float64 if the decomposition fails; exact up to the
      decomposition's rounding. Negative eigenvalues from rounding count as 0.
    * ``"newton"``: :func:`_coupled_newton_inverse_root` on :math:`x + \epsilon_{\text{tot}} I`, with
      :math:`\lambda_{\max}` bounded by :math:`\|x\|_F` (so the relative floor is at least as large as with
      eigh). Matmuls only (fast on accelerators); ``p`` must be an integer. After ``newton_iters`` steps (40) it
      matches eigh in float64 to ~1e-7 relative for condition numbers up to ~1e10 (measured, n = 64); in
      float32 both methods are limited by rounding (~1e-5 relative at condition 1e4, ~1e-3 at 1e6).

    Args:
        x: symmetric positive semi-definite ``(n, n)`` or ``(b, n, n)``.
        p: the root (4 for a matrix's Shampoo factor, 2 for an inverse square root); > 0.
        method: ``"eigh"`` or ``"newton"``.
        epsilon: absolute regularisation (>= 0).
        relative_epsilon: regularisation relative to the largest eigenvalue (>= 0).
        newton_iters: steps of the Newton method.

    Returns:
        A tensor like ``x`` (same dtype).
    """
    _check_square(x, "inverse_root")
    if method not in INVERSE_ROOT_METHODS:
        raise ValueError(f"Invalid method: {method!r}; choose one of {', '.join(map(repr, INVERSE_ROOT_METHODS))}.")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        raise ValueError(f"Invalid p: {p!r}; it must be a number > 0.")
    for name, value in (("epsilon", epsilon), ("relative_epsilon", relative_epsilon)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"Invalid {name}: {value!r}; it must be a number >= 0.")
    with fp32_matmul_precision("highest"):
        if method == "eigh":
            w, v = eigh_with_fallback(x)
            w = w.clamp_min(0.0)
            floor = epsilon + relative_epsilon * w[..., :1]  # descending: column 0 is the largest
            return (v * (w + floor).pow(-1.0 / p).unsqueeze(-2)) @ v.mT
        if float(p) != int(p):
            raise ValueError(f"Invalid p: {p!r}; method='newton' needs an integer root.")
        if isinstance(newton_iters, bool) or not isinstance(newton_iters, int) or newton_iters < 1:
            raise ValueError(f"Invalid newton_iters: {newton_iters!r}; it must be an integer >= 1.")
        scale = torch.linalg.matrix_norm(x, keepdim=True)
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        reg = x + (epsilon + relative_epsilon * scale) * eye
        return _coupled_newton_inverse_root(reg, int(p), newton_iters)
