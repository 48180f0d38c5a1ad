"""Exact ports of other frameworks' optimizer semantics."""

from emerging_optimizers.compat import mxnet

__all__ = ["mxnet"]
