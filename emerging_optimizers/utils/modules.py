r"""Layers whose parameters are reshaped so that matrix optimizers (Muon and family) can train them.

:class:`Conv1dFlatWeights` is a :class:`torch.nn.Conv1d` (as in Mamba's mixer) whose kernel
:math:`K \in \mathbb{R}^{C_{out} \times C_{in}/g \times k}` and bias :math:`b \in \mathbb{R}^{C_{out}}` are kept
as one matrix

.. math::
    W = [\,\mathrm{reshape}(K, C_{out}, C_{in} k / g) \;|\; b\,] \in \mathbb{R}^{C_{out} \times (C_{in} k / g + 1)}

(no bias column without a bias). A convolution is a matrix product with the unfolded input (im2col), and
the bias is the coefficient of a constant input of one, so :math:`W` is the matrix the layer really applies
and an orthogonalizing optimizer can take it as it takes a ``Linear`` weight. The forward pass slices
:math:`W` back into kernel and bias views, so outputs and gradients equal those of the ``Conv1d`` it replaces.
"""

from __future__ import annotations

import math
from typing import Literal, Self

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv1dFlatWeights"]


def _flatten(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[weight.reshape(out, -1) | bias]``: a new ``(out, in/groups * k (+1))`` tensor."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    if bias is None:
        return flat.clone()
    return torch.cat([flat, bias.detach().reshape(-1, 1).to(flat.dtype)], dim=1)


class Conv1dFlatWeights(nn.Conv1d):
    """A :class:`torch.nn.Conv1d` whose kernel and bias are one 2-D parameter ``weight`` (module docstring).

    The arguments are those of :class:`torch.nn.Conv1d`; only ``padding_mode="zeros"`` is supported.
    ``weight`` has shape ``(out_channels, in_channels // groups * kernel_size + has_bias)``, the bias in the
    last column; ``bias`` is ``None`` (the bias lives in ``weight``) and :attr:`has_bias` says whether there is
    one. :attr:`weight_shape` is the shape of the kernel. Initialisation (and :meth:`reset_parameters`) draws
    the kernel and bias exactly as ``nn.Conv1d`` does, so the same seed gives the same layer.

    Note: a state dict of this layer has the flat ``weight`` and no ``bias``; it does not load into a plain
    ``nn.Conv1d`` (or the reverse). Use :meth:`from_conv1d` to convert a layer.

    Raises:
        ValueError: ``padding_mode`` is not ``"zeros"``.
    """

    weight: nn.Parameter
    has_bias: bool

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int],
        stride: int | tuple[int] = 1,
        padding: int | tuple[int] | Literal["same", "valid"] = 0,
        dilation: int | tuple[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if padding_mode != "zeros":
            raise ValueError(
                f"Invalid padding_mode: {padding_mode!r}; Conv1dFlatWeights supports only padding_mode='zeros'."
            )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        # nn.Conv1d has built and initialised the 3-D kernel and the bias; fold them into one matrix.
        flat = _flatten(self.weight, self.bias)
        self.has_bias = self.bias is not None
        del self.weight, self.bias
        self.register_parameter("bias", None)
        self.weight = nn.Parameter(flat)

    @classmethod
    def from_conv1d(cls, conv1d: nn.Conv1d) -> Self:
        """A ``Conv1dFlatWeights`` with the configuration, device, dtype and exact values of ``conv1d``."""
        if not isinstance(conv1d, nn.Conv1d):
            raise TypeError(f"from_conv1d expects an nn.Conv1d, got {type(conv1d).__name__}.")
        flat_source = isinstance(conv1d, Conv1dFlatWeights)
        new = cls(
            conv1d.in_channels,
            conv1d.out_channels,
            conv1d.kernel_size,
            stride=conv1d.stride,
            padding=conv1d.padding,
            dilation=conv1d.dilation,
            groups=conv1d.groups,
            bias=conv1d.has_bias if flat_source else conv1d.bias is not None,
            padding_mode=conv1d.padding_mode,
            device=conv1d.weight.device,
            dtype=conv1d.weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(conv1d.weight if flat_source else _flatten(conv1d.weight, conv1d.bias))
        return new

    @property
    def weight_shape(self) -> tuple[int, int, int]:
        """Shape of the convolution kernel, ``(out_channels, in_channels // groups, kernel_size)``."""
        return (self.out_channels, self.in_channels // self.groups, self.kernel_size[0])

    def reset_parameters(self) -> None:
        """Re-draw kernel and bias with ``nn.Conv1d``'s initialisation (Kaiming-uniform, bias U(-1/sqrt(fan_in), .))."""
        if self.weight.ndim != 2:  # called by nn.Conv1d.__init__, before the parameters are flattened
            super().reset_parameters()
            return
        kernel = torch.empty(self.weight_shape, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))
        bias = None
        if self.has_bias:
            bound = 1.0 / math.sqrt(math.prod(self.weight_shape[1:]))
            bias = nn.init.uniform_(torch.empty_like(kernel[:, 0, 0]), -bound, bound)
        with torch.no_grad():
            self.weight.copy_(_flatten(kernel, bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_bias:
            kernel = self.weight[:, :-1].view(self.weight_shape)
            bias = self.weight[:, -1]
        else:
            kernel, bias = self.weight.view(self.weight_shape), None
        return F.conv1d(x, kernel, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * len(self.padding):
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else f", padding={self.padding}"
        if self.dilation != (1,) * len(self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        s += f", bias={self.has_bias}, weight_shape={self.weight_shape}, flat_weight_shape={tuple(self.weight.shape)}"
        return s
