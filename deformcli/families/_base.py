"""Shared state and forward of the family modules (weight, optional bias, geometry)."""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair, _single

from deformcli.ops._checks import check_layer_groups
from deformcli.ops.deform_conv import deform_conv2d, deform_conv2d_mmcv_grad


def check_offset_channels(
    offset: Tensor, kernel_size: tuple[int, ...], offset_groups: int, what: str
) -> None:
    """Raise RuntimeError (as the families' own ops do) unless a 4-D ``offset`` has
    ``2 * offset_groups * kH * kW`` channels; the message starts with ``what``, in the words of
    the caller's family (``deform_groups=2``, ``deformable_groups=2``, a layer)."""
    expected = 2 * offset_groups * kernel_size[0] * kernel_size[1]
    if offset.dim() == 4 and offset.shape[1] != expected:
        raise RuntimeError(
            f"{what} expects offset with {expected} channels, got offset shape {list(offset.shape)}"
        )


class DeformableConvBase(nn.Module):
    """Base of every family module: parameters named like the original, one call into the op.

    Subclasses set ``offset_groups`` (under the family's own attribute name) and choose the
    offset-gradient convention of the kernel the family trained with.
    """

    #: True for torchvision's offset-gradient convention, False for mmcv's (see
    #: :func:`deformcli.ops.deform_conv2d_mmcv_grad`).
    torchvision_offset_grad: bool = False

    #: Set on an instance to run another kernel with the same signature as
    #: :func:`deformcli.deform_conv2d` (verification runs torchvision's compiled one).
    kernel_override: Callable[..., Tensor] | None = None

    #: The layer's path in its model (``backbone.layer2.0.conv2``) for messages, set by
    #: :func:`deformcli.model.name_layers`; the class name until then.
    layer_path: str | None = None

    @property
    def layer_name(self) -> str:
        kind = type(self).__name__
        return kind if self.layer_path is None else f"{self.layer_path} ({kind})"

    def _init_geometry(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: int | tuple[int, int],
        dilation: int | tuple[int, int],
        groups: int,
    ) -> None:
        check_layer_groups(in_channels, out_channels, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        # Both originals carry these for compatibility with nn.Conv2d.
        self.transposed = False
        self.output_padding = _single(0)
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )

    @property
    def offset_groups(self) -> int:
        raise NotImplementedError

    def make_offset_conv(self, channels_per_point: int, dilated: bool = True) -> nn.Conv2d:
        """The ``*Pack`` layers' ``conv_offset``: ``offset_groups * channels_per_point * kH * kW``
        outputs (2 for DCNv1, 3 for DCNv2), with this layer's kernel, stride, padding and
        (``dilated``; DB's copy leaves it out) dilation."""
        return nn.Conv2d(
            self.in_channels,
            self.offset_groups * channels_per_point * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=_pair(self.stride),
            padding=_pair(self.padding),
            dilation=_pair(self.dilation) if dilated else 1,
            bias=True,
        )

    def uniform_weight_init(self) -> None:
        """The originals' init: weight ``uniform(+-1/sqrt(fan_in))``, fan_in = in_channels * kH
        * kW (all input channels, not per group); bias, where there is one, zero."""
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        self.weight.data.uniform_(-bound, bound)
        bias = getattr(self, "bias", None)
        if bias is not None:
            bias.data.zero_()

    def init_bias_parameter(self, enabled: bool) -> None:
        """``bias`` as an ``(out_channels,)`` parameter, or registered as None."""
        if enabled:
            self.bias = nn.Parameter(torch.empty(self.out_channels))
        else:
            self.register_parameter("bias", None)

    def zero_offset_conv(self) -> None:
        """The ``*Pack`` layers start with zero offsets (and a mask of sigmoid(0) = 0.5)."""
        for name in ("conv_offset", "conv_offset_mask"):
            if hasattr(self, name):
                getattr(self, name).weight.data.zero_()
                getattr(self, name).bias.data.zero_()

    def deform(self, x: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        """Run the op with this layer's weight, bias and geometry.

        x ``(N, C_in, H, W)``; offset ``(N, 2 * offset_groups * kH * kW, H_out, W_out)``; mask
        ``(N, offset_groups * kH * kW, H_out, W_out)`` or None.
        """
        check_offset_channels(
            offset,
            self.kernel_size,
            self.offset_groups,
            f"{type(self).__name__} with {self.offset_groups} offset group(s) and kernel "
            f"{self.kernel_size}",
        )
        op = self.kernel_override
        if op is None:
            op = deform_conv2d if self.torchvision_offset_grad else deform_conv2d_mmcv_grad
        return op(
            x,
            offset,
            self.weight,
            getattr(self, "bias", None),
            _pair(self.stride),
            _pair(self.padding),
            _pair(self.dilation),
            mask,
        )


def split_offset_and_mask(offset_and_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The ``*Pack`` modules' convention: ``o1, o2, mask = chunk(3)``; offset ``cat(o1, o2)``.

    Returns ``(offset, sigmoid(mask))``.
    """
    o1, o2, mask = offset_and_mask.chunk(3, dim=1)
    return torch.cat((o1, o2), dim=1), mask.sigmoid()


class OffsetMaskPack(nn.Module):
    """The ``conv_offset_mask`` layout (DB's ``ModulatedDeformConvPack``, DCNv2's ``DCN``), mixed
    in before a modulated layer class: a zero-initialised convolution with the layer's kernel,
    stride and padding (no dilation, as in both originals) predicts ``3 * groups * kH * kW``
    channels, split by :func:`split_offset_and_mask`. forward(x ``(N, C_in, H, W)``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset_mask = self.make_offset_conv(3, dilated=False)
        self.init_offset()

    def init_offset(self) -> None:
        self.zero_offset_conv()

    def forward(self, x: Tensor) -> Tensor:
        offset, mask = split_offset_and_mask(self.conv_offset_mask(x))
        return self.deform(x, offset, mask)
