"""emerging_optimizers: optimizers beyond AdamW for PyTorch.

Importing the package registers every optimizer (see :mod:`emerging_optimizers.registry`).
"""

from emerging_optimizers import (
    compat,
    contrib,
    legacy_soap,
    mixin,
    orthogonalized_optimizers,
    package_info,
    psgd,
    registry,
    riemannian_optimizers,
    scalar_optimizers,
    shampoo,
    utils,
    weight_update_hooks,
)
from emerging_optimizers.legacy_soap import MOSO, REKLS, SOAP, StackedSoap
from emerging_optimizers.mixin import WeightDecayMixin, WeightDecayT
from emerging_optimizers.orthogonalized_optimizers import Muon, MuonAdamW, NorMuon, OrthogonalizedOptimizer
from emerging_optimizers.psgd import PSGDPro
from emerging_optimizers.registry import (
    get_configured_optimizer_cls,
    get_optimizer_cls,
    get_optimizer_name_list,
    register_optimizer,
)
from emerging_optimizers.riemannian_optimizers import Iso, ObliqueAdam, ObliqueSGD
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
from emerging_optimizers.shampoo import KlMSoap, KlSoapV3, ReklsV3, Shampoo

# package metadata at the top level, as the reference library exposes it
__contact_emails__ = package_info.__contact_emails__
__contact_names__ = package_info.__contact_names__
__description__ = package_info.__description__
__download_url__ = package_info.__download_url__
__homepage__ = package_info.__homepage__
__keywords__ = package_info.__keywords__
__license__ = package_info.__license__
__package_name__ = package_info.__package_name__
__repository_url__ = package_info.__repository_url__
__shortversion__ = package_info.__shortversion__
__version__ = package_info.__version__

__all__ = [
    "compat",
    "contrib",
    "legacy_soap",
    "mixin",
    "orthogonalized_optimizers",
    "package_info",
    "psgd",
    "riemannian_optimizers",
    "weight_update_hooks",
    "registry",
    "scalar_optimizers",
    "shampoo",
    "utils",
    "WeightDecayMixin",
    "WeightDecayT",
    "get_configured_optimizer_cls",
    "get_optimizer_cls",
    "get_optimizer_name_list",
    "register_optimizer",
    "Muon",
    "NorMuon",
    "MuonAdamW",
    "OrthogonalizedOptimizer",
    "PSGDPro",
    "SOAP",
    "REKLS",
    "StackedSoap",
    "MOSO",
    "Shampoo",
    "KlSoapV3",
    "ReklsV3",
    "KlMSoap",
    "ObliqueSGD",
    "ObliqueAdam",
    "Iso",
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
