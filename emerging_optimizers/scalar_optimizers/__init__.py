"""Element-wise optimizers: the documented update functions and their ``torch.optim.Optimizer`` classes.

:mod:`~emerging_optimizers.scalar_optimizers.update_functions` holds the same functions with the reference
library's keyword-only signatures, and :class:`SingleMomentumOptimizer` / :class:`TwoMomentsOptimizer` its way
of building an optimizer from one of them.
"""

from emerging_optimizers.scalar_optimizers.adam import Adam, AdamW, calculate_adam_update
from emerging_optimizers.scalar_optimizers.ademamix import (
    AdEMAMix,
    SimplifiedAdEMAMix,
    calculate_ademamix_update,
    calculate_sim_ademamix_update,
)
from emerging_optimizers.scalar_optimizers.base import ScalarOptimizer, SingleMomentumOptimizer, TwoMomentsOptimizer
from emerging_optimizers.scalar_optimizers.laprop import LaProp, calculate_laprop_update
from emerging_optimizers.scalar_optimizers.lion import Lion, calculate_lion_update
from emerging_optimizers.scalar_optimizers.madam import MAdam, calculate_madam_update
from emerging_optimizers.scalar_optimizers.rmsprop import RMSProp, calculate_rmsprop_update
from emerging_optimizers.scalar_optimizers.signum import Signum, calculate_signum_update

# the reference library's keyword-only update functions (after the algorithms' modules, which they wrap)
from emerging_optimizers.scalar_optimizers import update_functions  # isort: skip

__all__ = [
    "calculate_adam_update",
    "calculate_ademamix_update",
    "calculate_sim_ademamix_update",
    "calculate_laprop_update",
    "calculate_lion_update",
    "calculate_signum_update",
    "calculate_rmsprop_update",
    "calculate_madam_update",
    "ScalarOptimizer",
    "SingleMomentumOptimizer",
    "TwoMomentsOptimizer",
    "update_functions",
    "Adam",
    "AdamW",
    "AdEMAMix",
    "SimplifiedAdEMAMix",
    "LaProp",
    "Lion",
    "Signum",
    "RMSProp",
    "MAdam",
]
