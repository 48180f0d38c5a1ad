"""Optimizers on matrix manifolds: the oblique manifold (unit-norm columns or rows) and isospectral updates.

* :class:`ObliqueSGD`, :class:`ObliqueAdam` (registry ``oblique_sgd``, ``oblique_adam``;
  :mod:`~emerging_optimizers.riemannian_optimizers.normalized_optimizer`): Riemannian SGD with heavy-ball
  momentum and Riemannian Adam, retracting by renormalisation.
* :class:`Iso` (registry ``iso``; :mod:`~emerging_optimizers.riemannian_optimizers.isospectral`): moves the
  singular vectors of ``W = U diag(S) V^T`` with ``S`` fixed (arXiv:2607.19331); :data:`RetractionT` names its
  retractions.

Each module keeps its math in small pure functions (tangent projection, retractions, directions) next to the class.
"""

from emerging_optimizers.riemannian_optimizers.isospectral import Iso, RetractionT
from emerging_optimizers.riemannian_optimizers.normalized_optimizer import ObliqueAdam, ObliqueSGD

__all__ = ["Iso", "ObliqueAdam", "ObliqueSGD", "RetractionT"]
