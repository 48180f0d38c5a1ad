r"""Kronecker-factored products of PSGD: factors applied along the dimensions of a tensor.

For a tensor :math:`X` of shape :math:`(d_0, \ldots, d_{n-1})` and factors :math:`Q_i`, either dense
:math:`(d_i, d_i)` or diagonal (a vector of length :math:`d_i`, applied element-wise along dimension :math:`i`):

* :func:`apply_kronecker_factors`: :math:`(Q_0 \otimes \cdots \otimes Q_{n-1})\,\mathrm{vec}(X)`, i.e. every
  :math:`Q_i` once along its dimension (2-D: :math:`Q_0 X Q_1^\top`);
* :func:`apply_preconditioner`: :math:`P X` with :math:`P = Q^\top Q`, i.e. every :math:`Q_i` and then every
  :math:`Q_i^\top` (2-D: :math:`Q_0^\top Q_0 X Q_1^\top Q_1`);
* :func:`partial_contraction`: :math:`G_1` and :math:`G_2` contracted over every dimension but one, the
  :math:`(d_i, d_i)` "covariance along dimension :math:`i`".

Plain eager functions (no compile decorator): compile a caller if the shapes are static.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["apply_kronecker_factors", "apply_preconditioner", "partial_contraction"]


def partial_contraction(G1: torch.Tensor, G2: torch.Tensor, axis: int) -> torch.Tensor:
    """``G1`` and ``G2`` (same shape) contracted over every dimension except ``axis``: a ``(d_axis, d_axis)``
    matrix with entries ``sum_{other indices} G1[..., a, ...] * G2[..., b, ...]``.

    For a 1-D input this is the outer product ``G1 G2^T``.
    """
    others = [d for d in range(G1.dim()) if d != axis]
    return torch.tensordot(G1, G2, dims=(others, others))


def _dim_n_mul_and_permute(X: torch.Tensor, M: torch.Tensor, contract_dim: int) -> torch.Tensor:
    """``M`` (shape ``(d_out, d_in)``) applied along dimension ``contract_dim`` of ``X`` (size ``d_in`` there).

    Returns a tensor of ``X``'s rank whose dimension ``contract_dim`` has size ``d_out``.
    """
    if X.shape[contract_dim] != M.shape[1]:
        raise ValueError(
            f"Shape mismatch: X.shape[{contract_dim}] = {X.shape[contract_dim]} but the factor applied along it "
            f"has M.shape[1] = {M.shape[1]}."
        )
    # tensordot puts M's output dimension first; move it back to where the contracted one was.
    return torch.movedim(torch.tensordot(M, X, dims=([1], [contract_dim])), 0, contract_dim)


def _apply_factor(Q: torch.Tensor, X: torch.Tensor, axis: int) -> torch.Tensor:
    """One factor along ``axis``: element-wise for a diagonal (1-D) ``Q``, a matrix product for a dense one."""
    if Q.dim() == 1:
        shape = [1] * X.dim()
        shape[axis] = Q.shape[0]
        return X * Q.view(shape)
    return _dim_n_mul_and_permute(X, Q, axis)


def apply_kronecker_factors(Q_list: Sequence[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """Every factor ``Q_list[i]`` once along dimension ``i`` of ``X`` (2-D: ``Q_0 X Q_1^T``).

    ``len(Q_list)`` must equal ``X.dim()`` (``ValueError`` otherwise); 1-D factors are diagonal.
    """
    if len(Q_list) != X.dim():
        raise ValueError(
            f"Number of Kronecker factors {len(Q_list)} must match the number of dimensions of X {X.dim()}."
        )
    Y = X
    for axis, Q in enumerate(Q_list):
        Y = _apply_factor(Q, Y, axis)
    return Y


def apply_preconditioner(Q_list: Sequence[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """PSGD's preconditioner ``P = Q^T Q`` (``Q`` the Kronecker product of ``Q_list``) applied to ``X``.

    Applies every ``Q_i`` and then every ``Q_i^T`` (2-D: ``(Q_0^T Q_0) X (Q_1^T Q_1)``); 1-D factors are
    diagonal, so for them this multiplies by ``q_i**2`` along dimension ``i``.
    """
    Y = apply_kronecker_factors(Q_list, X)
    return apply_kronecker_factors([Q if Q.dim() == 1 else Q.T for Q in Q_list], Y)
