"""The scalar update functions with the reference library's keyword-only signatures.

Each ``calculate_<algo>_update(grad, *state, *, <hyperparameters>, step)`` here computes exactly what the
documented function of the same name in :mod:`emerging_optimizers.scalar_optimizers` computes (same numbers,
same state afterwards): both call the algorithm's element-wise ``<algo>_kernel`` with the numbers of its
``<algo>_scalars``. Only the calling convention differs: the state tensors are positional, every
hyperparameter is keyword-only and ``step`` is always accepted, so that one optimizer class
(:class:`~emerging_optimizers.scalar_optimizers.SingleMomentumOptimizer`,
:class:`~emerging_optimizers.scalar_optimizers.TwoMomentsOptimizer`) can call any of them.

They run under ``torch.no_grad()`` and are not compiled; compile at the call site if needed.
"""

# ``_schedulers`` is an attribute of the package, as in the reference
from emerging_optimizers.scalar_optimizers.update_functions import _schedulers as _schedulers
from emerging_optimizers.scalar_optimizers.update_functions.adam import calculate_adam_update
from emerging_optimizers.scalar_optimizers.update_functions.ademamix import (
    calculate_ademamix_update,
    calculate_sim_ademamix_update,
)
from emerging_optimizers.scalar_optimizers.update_functions.laprop import calculate_laprop_update
from emerging_optimizers.scalar_optimizers.update_functions.lion import calculate_lion_update
from emerging_optimizers.scalar_optimizers.update_functions.madam import calculate_madam_update
from emerging_optimizers.scalar_optimizers.update_functions.rmsprop import calculate_rmsprop_update
from emerging_optimizers.scalar_optimizers.update_functions.signum import calculate_signum_update

__all__ = [
    "calculate_adam_update",
    "calculate_ademamix_update",
    "calculate_laprop_update",
    "calculate_lion_update",
    "calculate_madam_update",
    "calculate_rmsprop_update",
    "calculate_signum_update",
    "calculate_sim_ademamix_update",
]
