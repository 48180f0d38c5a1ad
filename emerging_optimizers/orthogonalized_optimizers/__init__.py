"""Orthogonalized optimizers: momentum, then a (scaled) orthogonalization of it as the update.

:class:`OrthogonalizedOptimizer` is the base (SPEC section 3); :class:`Muon` orthogonalizes with a
Newton-Schulz iteration (:func:`newton_schulz`, coefficient sets in :mod:`.muon_utils`).
"""

from emerging_optimizers.orthogonalized_optimizers.muon import Muon, MuonScaleT, get_muon_scale_factor
from emerging_optimizers.orthogonalized_optimizers.muon_utils import (
    CoeffIterMode,
    NSCoeffT,
    get_coefficient_iterator,
    newton_schulz,
)
from emerging_optimizers.orthogonalized_optimizers.orthogonalized_optimizer import (
    NoOpWeightUpdateHook,
    OrthogonalizedOptimizer,
    WeightUpdateHook,
)

__all__ = [
    "OrthogonalizedOptimizer",
    "WeightUpdateHook",
    "NoOpWeightUpdateHook",
    "Muon",
    "MuonScaleT",
    "get_muon_scale_factor",
    "newton_schulz",
    "NSCoeffT",
    "CoeffIterMode",
    "get_coefficient_iterator",
]

# family members below (merged by the lead)
from emerging_optimizers.orthogonalized_optimizers.adaptive_muon import (
    AdaptiveMuon,
    Moment2MethodT,
    calculate_adaptive_muon_update,
    moment2_shape,
    update_namo_moment2,
)
from emerging_optimizers.orthogonalized_optimizers.mop import MOP, MOPScaleT, calculate_mop_update, polar_via_svd
from emerging_optimizers.orthogonalized_optimizers.muon_hyperball import MuonHyperball
from emerging_optimizers.orthogonalized_optimizers.normuon import NorMuon
from emerging_optimizers.orthogonalized_optimizers.polargrad import (
    OneSidedT,
    PolarGrad,
    calculate_polargrad_update,
    left_polargrad_orth_fn,
    one_sided_polargrad_orth_fn,
    right_polargrad_orth_fn,
)
from emerging_optimizers.orthogonalized_optimizers.scion import Scion
from emerging_optimizers.orthogonalized_optimizers.spectral_clipping_utils import (
    spectral_clip,
    spectral_clipped_weight_decay,
    spectral_hardcap,
)
from emerging_optimizers.orthogonalized_optimizers.spel import Spel, msign

__all__ += [
    "AdaptiveMuon", "NorMuon", "Moment2MethodT", "calculate_adaptive_muon_update", "moment2_shape",
    "update_namo_moment2",
    "MOP", "MOPScaleT", "calculate_mop_update", "polar_via_svd", "MuonHyperball", "OneSidedT", "PolarGrad",
    "calculate_polargrad_update", "left_polargrad_orth_fn", "one_sided_polargrad_orth_fn", "right_polargrad_orth_fn",
    "Scion", "spectral_clip", "spectral_clipped_weight_decay", "spectral_hardcap", "Spel", "msign",
]
from emerging_optimizers.orthogonalized_optimizers.muon_adamw import (  # noqa: E402
    MuonAdamW,
    RouteFn,
    SideT,
    default_route,
    matrix_optimizer_names,
)

__all__ += ["MuonAdamW", "SideT", "RouteFn", "default_route", "matrix_optimizer_names"]
