"""The SOAP family (Shampoo's eigenbasis + Adam): :class:`SOAP`, :class:`REKLS`, :class:`StackedSoap`, :class:`MOSO`.

Submodules, importable as attributes as in the reference library: :mod:`.soap` (the optimizer and its pure
update functions), :mod:`.soap_utils` (eigenbasis computations), :mod:`.rekls`, :mod:`.stacked_soap`,
:mod:`.moso`, :mod:`.matrix_root_inverse_utils` (inverse matrix roots, used by Shampoo).
"""

from emerging_optimizers.legacy_soap import matrix_root_inverse_utils, moso, rekls, soap, soap_utils, stacked_soap
from emerging_optimizers.legacy_soap.moso import MOSO
from emerging_optimizers.legacy_soap.rekls import REKLS
from emerging_optimizers.legacy_soap.soap import SOAP
from emerging_optimizers.legacy_soap.stacked_soap import StackedSoap

__all__ = ["MOSO", "REKLS", "SOAP", "StackedSoap", "matrix_root_inverse_utils", "moso", "rekls", "soap", "soap_utils",
           "stacked_soap"]
