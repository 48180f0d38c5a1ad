r"""Spectral clipping of a matrix with matrix-sign functions, no SVD.

For :math:`X = U \operatorname{diag}(s) V^\top` (thin SVD; :math:`m \le n` after transposing a tall input),
:math:`O = \operatorname{orth}(X) = U V^\top` and :math:`P = O X^\top = U \operatorname{diag}(s) U^\top`, the
matrix sign of a symmetric matrix applies ``sign`` to its eigenvalues, so

.. math::
    \operatorname{sign}(\sigma I - P)\,(\sigma O - X) = U\,\operatorname{diag}(|\sigma - s|)\,V^\top.

With :math:`\operatorname{clip}(s; a, b) = \tfrac12\,[a + b + |a - s| - |b - s|]` this gives

* :func:`spectral_clip` ``(X, sigma_min=-1.0, sigma_max=1.0)``
  :math:`= \tfrac12\,[(a+b)\,O + \operatorname{sign}(aI - P)(aO - X) - \operatorname{sign}(bI - P)(bO - X)]`
  :math:`= U \operatorname{diag}(\operatorname{clip}(s; a, b)) V^\top`;
* :func:`spectral_hardcap` ``(X, beta=1.0)``: with :math:`A = \beta O - X`,
  :math:`\tfrac12\,[\beta O + X - (A\,\operatorname{orth}(A)^\top)\,O] = U \operatorname{diag}(\min(s, \beta)) V^\top`
  (:math:`A\,\operatorname{orth}(A)^\top = U |\beta - s| U^\top` is only :math:`m \times m`);
* :func:`spectral_clipped_weight_decay` ``(X, beta=1.0, c=0.5)``
  :math:`= (1-c) X + c\,\operatorname{hardcap}(X, \beta)`: a weight decay that only pulls singular values
  above ``beta``.

``orth`` and ``sign`` are 8 Newton-Schulz steps with the ``polar_express`` coefficients (arXiv:2505.16932), so
the result is as accurate as that iteration: singular values much smaller than :math:`\lVert X\rVert_F`, and
values of :math:`s` very close to a threshold, converge last (an error there is bounded by the small
:math:`|\sigma - s|` it multiplies). Zero singular values of a rank-deficient ``X`` stay zero (their singular
vectors are undefined). Accepts a matrix or a batch ``[..., m, n]``; computes in float32 (float64 for float64
input) under the current fp32 matmul precision and returns ``X``'s dtype. (matrix-sign formulation:
leloykun.github.io, "Fast, numerically stable, and auto-differentiable spectral clipping".)
"""

from __future__ import annotations

import math

import torch

from emerging_optimizers.orthogonalized_optimizers.muon_utils import NSCoeffT, newton_schulz
from emerging_optimizers.utils import check_matrix

__all__ = ["spectral_clip", "spectral_clipped_weight_decay", "spectral_hardcap"]

_NS_STEPS = 8
_NS_COEFFICIENTS: NSCoeffT = "polar_express"


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number.")
    return float(value)


def _orth(x: torch.Tensor) -> torch.Tensor:
    """Polar factor (or matrix sign, for a symmetric input) by 8 polar-express Newton-Schulz steps."""
    return newton_schulz(x, _NS_STEPS, coefficient_type=_NS_COEFFICIENTS)


def _as_wide(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Upcast to float32 (float64 stays) and transpose a tall input so that rows <= cols."""
    work = x if x.dtype == torch.float64 else x.float()
    tall = work.shape[-2] > work.shape[-1]
    return (work.mT if tall else work), tall


def _back(y: torch.Tensor, tall: bool, like: torch.Tensor) -> torch.Tensor:
    return (y.mT if tall else y).to(like.dtype).contiguous()


def _shifted_sign_times(sigma: float, p: torch.Tensor, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\operatorname{sign}(\sigma I - P)(\sigma O - X) = U |\sigma - s| V^\top`."""
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    sign = _orth(sigma * eye - p)
    return sign @ (sigma * o - x)


def spectral_clip(X: torch.Tensor, sigma_min: float = -1.0, sigma_max: float = 1.0) -> torch.Tensor:
    """Clip the singular values of ``X`` to ``[sigma_min, sigma_max]`` (``sigma_min <= 0`` clips only from above)."""
    check_matrix(X, "spectral_clip", max_ndim=None)
    lo = _check_real("sigma_min", sigma_min)
    hi = _check_real("sigma_max", sigma_max)
    if lo > hi:
        raise ValueError(f"Invalid sigma_min/sigma_max: {sigma_min!r} > {sigma_max!r}; need sigma_min <= sigma_max.")
    x, tall = _as_wide(X)
    o = _orth(x)
    p = o @ x.mT
    p = 0.5 * (p + p.mT)  # U diag(s) U^T is symmetric; remove rounding asymmetry before the matrix sign
    out = (lo + hi) * o + _shifted_sign_times(lo, p, o, x) - _shifted_sign_times(hi, p, o, x)
    return _back(0.5 * out, tall, X)


def spectral_hardcap(X: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Cap the singular values of ``X`` at ``beta`` (>= 0): ``s -> min(s, beta)``."""
    check_matrix(X, "spectral_hardcap", max_ndim=None)
    b = _check_real("beta", beta)
    if b < 0:
        raise ValueError(f"Invalid beta: {beta!r}; the cap on singular values must be >= 0.")
    x, tall = _as_wide(X)
    o = _orth(x)
    a = b * o - x
    abs_part = (a @ _orth(a).mT) @ o  # U |beta - s| V^T
    return _back(0.5 * (b * o + x - abs_part), tall, X)


def spectral_clipped_weight_decay(X: torch.Tensor, beta: float = 1.0, c: float = 0.5) -> torch.Tensor:
    """``(1 - c) X + c * spectral_hardcap(X, beta)``: shrink only the singular values above ``beta``.

    ``c`` in ``[0, 1]`` is the strength (``c = 1`` caps fully, ``c = 0`` returns ``X``).
    """
    check_matrix(X, "spectral_clipped_weight_decay", max_ndim=None)
    strength = _check_real("c", c)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"Invalid c: {c!r}; the decay strength must be in [0, 1].")
    capped = spectral_hardcap(X, beta)
    work = X if X.dtype == torch.float64 else X.float()
    return torch.lerp(work, capped.to(work.dtype), strength).to(X.dtype)
