r"""Weight update hooks: small objects that reshape one optimizer step of a matrix parameter.

An orthogonalized optimizer calls, for every parameter ``p`` with its update ``U``::

    state = hook.pre_weight_update_inplace(p, U)   # may rescale U in place
    p <- p - lr * U
    hook.post_weight_update_inplace(p, state)      # may project p in place

``state`` is transient (a 0-dim tensor or ``None``): it never enters ``optimizer.state`` and is not
checkpointed. The optimizer always hands the hook a *fresh* update tensor, so a hook that rescales
``U`` can never touch the stored momentum (the reference library rescaled the momentum buffer itself
when the orthogonalization was the identity).

Hooks (norms are Frobenius norms reduced in float32, float64 for float64 tensors; a scale is applied in float32 and
written back in the tensor's dtype, so bf16 parameters get one rounding per step), one module each:

* :class:`HyperballHook` ``(radius, eps=1e-15)`` (:mod:`.hyperball`) keeps every weight on the sphere of radius
  ``R``: :math:`U \leftarrow R\,U/\lVert U\rVert`, then :math:`W \leftarrow R\,W/\lVert W\rVert`.
* :class:`RadialBrakeHook` ``(outward_scale=0.5, inward_scale=1.0, eps=1e-15)`` (:mod:`.radial_brake`) damps the
  radial part of a step: a weight may shrink freely but grows at ``outward_scale`` of the raw speed.
* :class:`RelativeUpdateHook` ``(eps=1e-15)`` (:mod:`.relative_update`) makes the update as large as the weight:
  :math:`U \leftarrow U\,\lVert W\rVert/\lVert U\rVert`, so ``lr`` is the relative change per step.

A norm below ``eps`` counts as zero: a zero update stays zero, a zero weight is left alone.
``WeightUpdateHook`` (the protocol), ``NoOpWeightUpdateHook`` and ``HookStateT`` live in :mod:`.base`;
:func:`scale_to_norm_` (used by ``MuonHyperball``) in :mod:`.hyperball`.
"""

from emerging_optimizers.weight_update_hooks.base import NoOpWeightUpdateHook, WeightUpdateHook
from emerging_optimizers.weight_update_hooks.hyperball import HyperballHook, scale_to_norm_
from emerging_optimizers.weight_update_hooks.radial_brake import RadialBrakeHook
from emerging_optimizers.weight_update_hooks.relative_update import RelativeUpdateHook

__all__ = [
    "HyperballHook",
    "NoOpWeightUpdateHook",
    "RadialBrakeHook",
    "RelativeUpdateHook",
    "WeightUpdateHook",
    "scale_to_norm_",
]
