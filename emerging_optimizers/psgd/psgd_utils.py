r"""Small tensor helpers of PSGD: factor balancing and cheap spectral-norm lower bounds (after Xi-Lin Li).

Everything stays on the tensors' device (no ``.item()``); the random probes of the norm bounds come from the
``generator`` given (the optimizer passes its own, so the global RNG is never touched) or, without one, from
torch's global RNG. Plain eager functions: compile a caller if wanted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["norm_lower_bound_skew", "norm_lower_bound_spd", "uniformize_q_in_place"]


def uniformize_q_in_place(Q_list: Sequence[torch.Tensor]) -> None:
    r"""Rescale the factors in place so that each has the same largest magnitude.

    With :math:`n_i = \max|Q_i|` and :math:`g = (\prod_i n_i)^{1/k}` (:math:`k` factors), every
    :math:`Q_i \leftarrow Q_i\,g/n_i`. The Kronecker product (and so the preconditioner) is unchanged, while no
    factor drifts towards under- or overflow. One factor: nothing to do. An empty list raises ``TypeError``.
    """
    if not Q_list:
        raise TypeError("Q_list cannot be empty: uniformize_q_in_place needs at least one factor.")
    if len(Q_list) == 1:
        return
    maxima = torch.stack([Q.abs().amax() for Q in Q_list])
    gmean = maxima.prod().pow(1.0 / len(Q_list))
    for Q, m in zip(Q_list, maxima):
        Q.mul_(gmean / m)


def _subspace_iteration_bound(
    A: torch.Tensor, k: int, half_iters: int, eps: float, generator: torch.Generator | None
) -> torch.Tensor:
    r"""``max_j ||v_j A||`` over ``k`` unit-ish vectors after ``half_iters`` rounds of ``V <- normalize(V A) A``.

    The ``k`` random start vectors are shifted towards the row of ``A`` with the largest norm (each with the
    sign that agrees with it), which helps for matrices of very low rank. Each final row is ``u A`` with
    ``||u|| < 1``, so the result never exceeds ``||A||_2``.
    """
    V = torch.randn(k, A.shape[1], dtype=A.dtype, device=A.device, generator=generator)
    # index_select with a device index: no host synchronization (plain indexing by a tensor may sync).
    row = A.index_select(0, torch.linalg.vector_norm(A, dim=1).argmax().reshape(1))
    V = row + torch.sign((row * V).sum(dim=1, keepdim=True)) * V
    for _ in range(half_iters):
        V = V @ A
        V = V / (torch.linalg.vector_norm(V, dim=1, keepdim=True) + eps)
        V = V @ A
    return torch.linalg.vector_norm(V, dim=1).amax()


def norm_lower_bound_spd(
    A: torch.Tensor, k: int = 32, half_iters: int = 2, eps: float = 1e-8, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""A cheap lower bound of :math:`\|A\|_2` for a symmetric positive (semi-)definite ``A`` (a 0-dim tensor).

    ``A`` is scaled by its largest diagonal entry (at least ``eps``) against overflow, then bounded by subspace
    iteration with ``k`` random vectors and ``2 * half_iters`` products with ``A``.
    """
    scale = A.diagonal().amax().clamp(min=eps)
    return scale * _subspace_iteration_bound(A / scale, k, half_iters, eps, generator)


def norm_lower_bound_skew(
    A: torch.Tensor, k: int = 32, half_iters: int = 2, eps: float = 1e-8, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""A cheap lower bound of :math:`\|A\|_2` for a skew-symmetric ``A`` (:math:`A^\top = -A`), a 0-dim tensor.

    As :func:`norm_lower_bound_spd` but scaled by :math:`\max|A_{ij}|` (the diagonal of a skew matrix is zero).
    Xi-Lin Li suggests ``k`` of about 128 for bfloat16, 32 for float32 and 4 for float64.
    """
    scale = A.abs().amax().clamp(min=eps)
    return scale * _subspace_iteration_bound(A / scale, k, half_iters, eps, generator)
