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
from emerging_optimizers.package_info import (  # the reference library exposes its metadata at the top level
    __contact_emails__ as __contact_emails__,
)
from emerging_optimizers.package_info import (
    __contact_names__ as __contact_names__,
)
from emerging_optimizers.package_info import (
    __description__ as __description__,
)
from emerging_optimizers.package_info import (
    __download_url__ as __download_url__,
)
from emerging_optimizers.package_info import (
    __homepage__ as __homepage__,
)
from emerging_optimizers.package_info import (
    __keywords__ as __keywords__,
)
from emerging_optimizers.package_info import (
    __license__ as __license__,
)
from emerging_optimizers.package_info import (
    __package_name__ as __package_name__,
)
from emerging_optimizers.package_info import (
    __repository_url__ as __repository_url__,
)
from emerging_optimizers.package_info import (
    __shortversion__ as __shortversion__,
)
from emerging_optimizers.package_info import (
    __version__ as __version__,
)
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
