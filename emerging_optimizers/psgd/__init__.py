"""PSGD: preconditioned SGD with Kronecker-factored whitening preconditioners (:class:`PSGDPro`).

Submodules, importable as attributes as in the reference library: :mod:`.psgd` (the optimizer and its pure
update functions), :mod:`.psgd_kron_contractions`, :mod:`.psgd_utils`, :mod:`.procrustes_step` (the module; the
function of the same name lives inside it).
"""

from emerging_optimizers.psgd import procrustes_step, psgd, psgd_kron_contractions, psgd_utils
from emerging_optimizers.psgd.psgd import PSGDPro

__all__ = ["PSGDPro", "procrustes_step", "psgd", "psgd_kron_contractions", "psgd_utils"]
