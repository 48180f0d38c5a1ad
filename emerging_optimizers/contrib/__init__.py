"""Contributed optimizers: less established methods, kept apart from the main families.

* :class:`Muown` (registered as ``"muown"``): Muon on the direction of each row and Adam on its length.
* :func:`row_norm_fn`: row-wise normalisation, usable as an ``OrthogonalizedOptimizer`` ``scaled_orthogonalize_fn``.
"""

from emerging_optimizers.contrib.muown import Muown
from emerging_optimizers.contrib.row_norm import row_norm_fn

__all__ = ["Muown", "row_norm_fn"]
