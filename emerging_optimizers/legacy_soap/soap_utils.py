r"""Eigenbases of SOAP's Kronecker factors: full ``eigh``, warm-started orthogonal iteration ("QR"), or SVD.

Each function takes a list of symmetric PSD factors (``[L, R]`` for a matrix parameter) and treats them
independently. Eigenvalues and basis columns come in **descending** eigenvalue order (see
:mod:`emerging_optimizers.utils.eig`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from emerging_optimizers.utils.eig import eigh_with_fallback, orthogonal_iteration

__all__ = ["get_eigenbasis_eigh", "get_eigenbasis_qr", "get_eigenbasis_svd"]

TensorList = list[torch.Tensor]


def get_eigenbasis_eigh(kronecker_factor_list: Iterable[torch.Tensor]) -> tuple[TensorList, TensorList]:
    """Exact eigendecomposition of every factor (:func:`~emerging_optimizers.utils.eig.eigh_with_fallback`).

    Returns:
        ``(eigvals_list, eigenbasis_list)``: per factor, its eigenvalues in descending order and the orthonormal
        eigenvectors as columns in the same order (both in the factor's dtype).
    """
    eigvals_list: TensorList = []
    eigenbasis_list: TensorList = []
    for factor in kronecker_factor_list:
        eigvals, eigenbasis = eigh_with_fallback(factor)
        eigvals_list.append(eigvals)
        eigenbasis_list.append(eigenbasis)
    return eigvals_list, eigenbasis_list


def get_eigenbasis_qr(
    kronecker_factor_list: Iterable[torch.Tensor],
    eigenbasis_list: Iterable[torch.Tensor],
    power_iter_steps: int = 1,
    *,
    return_indices: bool = False,
) -> tuple[TensorList, TensorList] | tuple[TensorList, TensorList, TensorList]:
    """Refine each factor's previous eigenbasis by ``power_iter_steps`` rounds of orthogonal iteration.

    See :func:`~emerging_optimizers.utils.eig.orthogonal_iteration`: columns are re-sorted by their Rayleigh
    quotients, in descending order.

    Args:
        kronecker_factor_list: the factors.
        eigenbasis_list: the previous eigenbases (warm starts), one per factor.
        power_iter_steps: multiply-and-QR rounds per factor.
        return_indices: also return, per factor, the sort permutation ``perm`` (new column ``i`` descends from
            old column ``perm[i]``) so that moments stored per eigen-direction can follow their directions.

    Returns:
        ``(eigvals_list, eigenbasis_list)``, or ``(eigvals_list, eigenbasis_list, perm_list)``: the Rayleigh
        quotients (descending) and the refined bases with columns in the same order.
    """
    eigvals_list: TensorList = []
    new_basis_list: TensorList = []
    perm_list: TensorList = []
    for factor, basis in zip(kronecker_factor_list, eigenbasis_list, strict=True):
        eigvals, new_basis, perm = orthogonal_iteration(factor, basis, power_iter_steps, return_indices=True)
        eigvals_list.append(eigvals)
        new_basis_list.append(new_basis)
        perm_list.append(perm)
    if return_indices:
        return eigvals_list, new_basis_list, perm_list
    return eigvals_list, new_basis_list


def get_eigenbasis_svd(kronecker_factor_list: Iterable[torch.Tensor]) -> TensorList:
    r"""Eigenbases from ``torch.linalg.svd``: the left singular vectors of each factor.

    For a symmetric PSD factor the singular value decomposition is an eigendecomposition (left and right
    singular vectors coincide up to sign), and the singular values come in descending order, so the columns
    are ordered as :func:`get_eigenbasis_eigh` orders them. Slower than ``eigh``; kept for the reference's API.
    """
    return [torch.linalg.svd(factor).U for factor in kronecker_factor_list]
