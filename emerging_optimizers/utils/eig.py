r"""Symmetric eigendecompositions for the SOAP family: a robust ``eigh``, warm-started orthogonal iteration and
the similarity transform :math:`P^\top A P`.

All three accept one matrix ``(n, n)`` or a batch ``(*, n, n)``. Eigenvalues are returned in **descending**
order, with the eigenvectors as the columns of the second tensor in the same order, so column ``i`` of ``Q``
belongs to eigenvalue ``i``. Nothing here synchronises the host except the ``try``/``except`` around
``torch.linalg.eigh`` (which is where the decomposition itself waits on the device anyway).
"""

from __future__ import annotations

import logging

import torch

from emerging_optimizers import utils as _utils

__all__ = ["eigh_with_fallback", "conjugate", "orthogonal_iteration"]

_LOG = logging.getLogger(__name__)

_EIGH_ERRORS = (torch.linalg.LinAlgError, RuntimeError)


def _nonfinite_result(a: torch.Tensor, eigvals: torch.Tensor, eigvecs: torch.Tensor) -> bool:
    """Whether a CPU float32 ``eigh`` returned NaN/Inf for a finite input: LAPACK's ``ssyevd`` (MKL, on an Intel
    AVX-512 CPU) does so for tiny rank-1 matrices with many repeated zero eigenvalues (a 14x14 constant matrix of
    5e-7, met by ReklsV3 on near-zero gradients), without raising. Checked on CPU only (there the result is on the
    host already; elsewhere it would cost a sync), never while torch.compile traces (data-dependent)."""
    if a.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return not bool(torch.isfinite(eigvals).all() and torch.isfinite(eigvecs).all()) and bool(torch.isfinite(a).all())


def eigh_with_fallback(
    x: torch.Tensor,
    force_double: bool = False,
    eps: float | None = None,
    output_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``torch.linalg.eigh`` of a symmetric matrix (or batch), in float32, retried in float64 only on failure.

    The matrix is decomposed in float32 (bfloat16/float16 inputs are up-cast first; float64 inputs stay
    float64). If that raises (``torch.linalg.LinAlgError`` or ``RuntimeError``: no convergence, ill-conditioned
    input), or returns NaN/Inf for a finite input on CPU (:func:`_nonfinite_result`), the decomposition is
    repeated once in float64 and a warning is logged. With ``force_double`` the
    float64 decomposition is the first and only attempt, and its error propagates.

    Args:
        x: symmetric matrix ``(n, n)`` or batch ``(*, n, n)``; only its lower triangle is read (``UPLO='L'``).
        force_double: decompose in float64 from the start.
        eps: optional regularisation: decompose :math:`x + \epsilon I` instead of :math:`x` (same eigenvectors in
            exact arithmetic, eigenvalues shifted by ``eps``). ``None`` or 0 adds nothing.
        output_dtype: dtype of both outputs; defaults to ``x.dtype``.

    Returns:
        ``(eigenvalues, eigenvectors)``: eigenvalues ``(*, n)`` in **descending** order, eigenvectors ``(*, n, n)``
        with column ``i`` the unit eigenvector of eigenvalue ``i``.
    """
    if x.dim() < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"eigh_with_fallback: x must be a square matrix or a batch of them, got shape {tuple(x.shape)}."
        )
    if eps is not None and eps < 0:
        raise ValueError(f"eigh_with_fallback: eps must be non-negative, got {eps}.")
    out_dtype = x.dtype if output_dtype is None else output_dtype
    work_dtype = torch.float64 if (force_double or x.dtype == torch.float64) else torch.float32
    a = x.to(work_dtype)
    if eps:
        a = a + eps * torch.eye(a.shape[-1], dtype=work_dtype, device=a.device)
    try:
        eigvals, eigvecs = torch.linalg.eigh(a)
        if work_dtype != torch.float64 and _nonfinite_result(a, eigvals, eigvecs):
            raise torch.linalg.LinAlgError("linalg.eigh returned non-finite values for a finite input")
    except _EIGH_ERRORS as err:
        if work_dtype == torch.float64:
            raise
        _LOG.warning("eigh_with_fallback: float32 eigh failed (%s); retrying in float64.", err)
        eigvals, eigvecs = torch.linalg.eigh(a.to(torch.float64))
    # torch returns ascending eigenvalues: flip to descending, columns along with them.
    eigvals = eigvals.flip(-1).to(out_dtype)
    eigvecs = eigvecs.flip(-1).to(out_dtype)
    return eigvals, eigvecs


def orthogonal_iteration(
    kronecker_factor: torch.Tensor,
    eigenbasis: torch.Tensor,
    power_iter_steps: int,
    *,
    return_indices: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Refine an approximate eigenbasis of a symmetric PSD matrix by orthogonal (subspace) iteration.

    Starting from ``eigenbasis`` (orthonormal columns, e.g. the previous step's basis), runs ``power_iter_steps``
    rounds of :math:`Q \leftarrow \mathrm{qr}(A Q).Q`, estimates each column's eigenvalue by its Rayleigh quotient
    :math:`\lambda_i = q_i^\top A q_i` (computed under "highest" fp32 matmul precision), and sorts the columns by
    it in descending order. The sort is stable, so columns with equal quotients keep their order (an identity
    factor, for instance, is not permuted).

    The sort permutation: with ``return_indices=True`` a third tensor ``perm`` (``(*, n)``, int64) is returned
    such that ``Q_new[..., :, i]`` is column ``perm[..., i]`` of the refined (unsorted) basis, i.e. new direction
    ``i`` descends from old direction ``perm[i]``. A moment stored per eigen-direction along this factor's axis
    ``d`` follows its direction with ``moment.index_select(d, perm)`` (2-D ``perm``). Without it the two-tuple
    of the reference library is returned.

    Args:
        kronecker_factor: symmetric PSD matrix ``A`` of shape ``(n, n)`` or ``(*, n, n)``.
        eigenbasis: starting orthonormal basis, same shape as ``kronecker_factor``.
        power_iter_steps: number of multiply-and-QR rounds (0: only re-estimate and sort).
        return_indices: also return the sort permutation (see above).

    Returns:
        ``(eigvals, Q)`` or ``(eigvals, Q, perm)``: Rayleigh quotients in descending order and the basis with its
        columns in the same order.
    """
    if isinstance(power_iter_steps, bool) or not isinstance(power_iter_steps, int) or power_iter_steps < 0:
        raise ValueError(f"orthogonal_iteration: power_iter_steps must be an int >= 0, got {power_iter_steps!r}.")
    if kronecker_factor.shape != eigenbasis.shape:
        raise ValueError(
            "orthogonal_iteration: kronecker_factor and eigenbasis must have the same shape, got "
            f"{tuple(kronecker_factor.shape)} and {tuple(eigenbasis.shape)}."
        )
    Q = eigenbasis
    for _ in range(power_iter_steps):
        Q = torch.linalg.qr(kronecker_factor @ Q).Q
    with _utils.fp32_matmul_precision("highest"):
        eigvals = conjugate(kronecker_factor, Q, diag=True)
    eigvals, perm = torch.sort(eigvals, dim=-1, descending=True, stable=True)
    Q = Q.gather(-1, perm.unsqueeze(-2).expand_as(Q))
    if return_indices:
        return eigvals, Q, perm
    return eigvals, Q


def conjugate(a: torch.Tensor, p: torch.Tensor, diag: bool = False) -> torch.Tensor:
    r"""Similarity transform :math:`B = P^\top A P` for an orthogonal ``P`` (one matrix or a batch).

    Args:
        a: matrix ``(m, m)`` or batch ``(b, m, m)``.
        p: matrix ``(m, k)`` or batch ``(b, m, k)``; orthogonal (so :math:`P^{-1} = P^\top`) when ``B`` should be
            similar to ``A``.
        diag: return only the diagonal of ``B`` (``(k,)`` or ``(b, k)``), without forming ``B``.

    Raises:
        TypeError: ``a`` or ``p`` is neither 2-D nor 3-D.
        ValueError: ``a`` and ``p`` differ in rank or in batch size.
    """
    if a.dim() not in (2, 3) or p.dim() not in (2, 3):
        raise TypeError(
            f"conjugate: a and p must be 2D matrices or 3D batched matrices, got {a.dim()}D and {p.dim()}D."
        )
    if a.dim() != p.dim():
        raise ValueError(f"conjugate: a and p must have the same number of dimensions, got {a.dim()} and {p.dim()}.")
    if a.dim() == 3 and a.shape[0] != p.shape[0]:
        raise ValueError(f"conjugate: a and p must have the same batch dimension, got {a.shape[0]} and {p.shape[0]}.")
    pta = p.mT @ a
    if diag:
        return (pta * p.mT).sum(dim=-1)
    return pta @ p
