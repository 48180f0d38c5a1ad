"""Kronecker-factored preconditioners: the preconditioner protocols, the Shampoo optimizer and the SOAP v3
framework (:mod:`.soap_v3`: ``KlSoapV3``, ``ReklsV3``, ``KlMSoap``)."""

from emerging_optimizers.shampoo import shampoo_base, soap_v3
from emerging_optimizers.shampoo.shampoo import Shampoo, ShampooPreconditioner
from emerging_optimizers.shampoo.shampoo_base import (
    ShampooPreconditionerProtocol,
    SoapPreconditionerProtocol,
    TensorPair,
)
from emerging_optimizers.shampoo.soap_v3 import (
    KlMSoap,
    KlSoapPreconditioner,
    KlSoapV3,
    ReklsPreconditioner,
    ReklsV3,
    SoapBase,
)

__all__ = [
    "KlMSoap",
    "KlSoapPreconditioner",
    "KlSoapV3",
    "ReklsPreconditioner",
    "ReklsV3",
    "Shampoo",
    "ShampooPreconditioner",
    "ShampooPreconditionerProtocol",
    "SoapBase",
    "SoapPreconditionerProtocol",
    "TensorPair",
    "shampoo_base",
    "soap_v3",
]
