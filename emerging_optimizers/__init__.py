"""emerging_optimizers: optimizers beyond AdamW for PyTorch.

Importing the package registers every optimizer (see :mod:`emerging_optimizers.registry`).
"""

from emerging_optimizers import (
    compat,
    contrib,
    mixin,
    orthogonalized_optimizers,
    registry,
    scalar_optimizers,
    utils,
    weight_update_hooks,
)
from emerging_optimizers.mixin import WeightDecayMixin, WeightDecayT
from emerging_optimizers.orthogonalized_optimizers import Muon, MuonAdamW, OrthogonalizedOptimizer
from emerging_optimizers.package_info import __version__ as __version__
from emerging_optimizers.registry import (
    get_configured_optimizer_cls,
    get_optimizer_cls,
    get_optimizer_name_list,
    register_optimizer,
)
from emerging_optimizers.scalar_optimizers import (
    Adam,
    AdamW,
    AdEMAMix,
    LaProp,
    Lion,
    MAdam,
    RMSProp,
    Signum,
    SimplifiedAdEMAMix,
)

__all__ = [
    "compat",
    "contrib",
    "mixin",
    "orthogonalized_optimizers",
    "weight_update_hooks",
    "registry",
    "scalar_optimizers",
    "utils",
    "WeightDecayMixin",
    "WeightDecayT",
    "get_configured_optimizer_cls",
    "get_optimizer_cls",
    "get_optimizer_name_list",
    "register_optimizer",
    "Muon",
    "MuonAdamW",
    "OrthogonalizedOptimizer",
    "Adam",
    "AdamW",
    "AdEMAMix",
    "LaProp",
    "Lion",
    "MAdam",
    "RMSProp",
    "Signum",
    "SimplifiedAdEMAMix",
]
