"""Stand-ins for the foreign deformable layers, written from their public source.

Each has the original's constructor, attribute and parameter names and forward math, runs
torchvision's compiled op, and claims the original's module name, so surgery sees it exactly as
it would see the real class. Sources (read, not copied):
  mmcv: mmcv/ops/deform_conv.py, mmcv/ops/modulated_deform_conv.py (open-mmlab/mmcv 2.x)
  DB: assets/ops/dcn/__init__.py, functions/ and modules/deform_conv.py, backbones/resnet.py
      (MhLiao/DB)
  BasicSR: basicsr/ops/dcn/deform_conv.py, basicsr/archs/arch_util.py (XPixelGroup/BasicSR)
"""

import math

import torch
import torchvision
from torch import nn
from torch.nn.modules.utils import _pair


class _StandIn(nn.Module):
    def _deform(self, x, offset, mask=None):
        return torchvision.ops.deform_conv2d(
            x,
            offset,
            self.weight,
            getattr(self, "bias", None),
            _pair(self.stride),
            _pair(self.padding),
            _pair(self.dilation),
            mask,
        )

    def _offset_conv(
        self, points_per_kernel_point: int, groups: int, dilated: bool = True
    ) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            groups * points_per_kernel_point * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=_pair(self.stride),
            padding=_pair(self.padding),
            dilation=_pair(self.dilation) if dilated else 1,
            bias=True,
        )


def _split(out):
    o1, o2, mask = torch.chunk(out, 3, dim=1)
    return torch.cat((o1, o2), dim=1), torch.sigmoid(mask)


# ---------------------------------------------------------------- mmcv.ops
class MmcvDeformConv2d(_StandIn):
    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
        bias=False,
        im2col_step=32,
    ):
        super().__init__()
        assert not bias
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups, self.deform_groups, self.im2col_step = groups, deform_groups, im2col_step
        self.transposed, self.output_padding = False, (0,)
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x, offset):
        return self._deform(x, offset)


class MmcvDeformConv2dPack(MmcvDeformConv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = self._offset_conv(2, self.deform_groups)

    def forward(self, x):
        return self._deform(x, self.conv_offset(x))


class MmcvModulatedDeformConv2d(_StandIn):
    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
        bias=True,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups, self.deform_groups = groups, deform_groups
        self.transposed, self.output_padding = False, (0,)
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        stdv = 1.0 / math.sqrt(in_channels * self.kernel_size[0] * self.kernel_size[1])
        self.weight.data.uniform_(-stdv, stdv)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)

    def forward(self, x, offset, mask):
        return self._deform(x, offset, mask)


class MmcvModulatedDeformConv2dPack(MmcvModulatedDeformConv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = self._offset_conv(3, self.deform_groups)

    def forward(self, x):
        offset, mask = _split(self.conv_offset(x))
        return self._deform(x, offset, mask)


# ------------------------------------------- mmdetection v1 DCN, as DB and BasicSR vendor it
class LegacyDeformConv(_StandIn):
    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deformable_groups=1,
        bias=False,
    ):
        super().__init__()
        assert not bias
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups, self.deformable_groups = groups, deformable_groups
        self.transposed, self.output_padding = False, (0,)
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        nn.init.uniform_(self.weight, -0.1, 0.1)

    def forward(self, x, offset):
        return self._deform(x, offset)


class LegacyDeformConvPack(LegacyDeformConv):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = self._offset_conv(2, self.deformable_groups)

    def forward(self, x):
        return self._deform(x, self.conv_offset(x))


class LegacyModulatedDeformConv(_StandIn):
    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deformable_groups=1,
        bias=True,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.deformable_groups, self.with_bias = groups, deformable_groups, bias
        self.transposed, self.output_padding = False, (0,)
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        nn.init.uniform_(self.weight, -0.1, 0.1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)

    def forward(self, x, offset, mask):
        return self._deform(x, offset, mask)


class LegacyModulatedDeformConvPack(LegacyModulatedDeformConv):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = self._offset_conv(3, self.deformable_groups)

    def forward(self, x):
        offset, mask = _split(self.conv_offset(x))
        return self._deform(x, offset, mask)


class DbDeformConvPack(LegacyDeformConv):
    """DB's copy: its conv_offset leaves out the layer's dilation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = self._offset_conv(2, self.deformable_groups, dilated=False)

    def forward(self, x):
        return self._deform(x, self.conv_offset(x))


class DbModulatedDeformConvPack(LegacyModulatedDeformConv):
    """DB's copy: ``conv_offset_mask`` (BasicSR renamed it), without the layer's dilation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset_mask = self._offset_conv(3, self.deformable_groups, dilated=False)

    def forward(self, x):
        offset, mask = _split(self.conv_offset_mask(x))
        return self._deform(x, offset, mask)


class BasicsrDCNv2Pack(LegacyModulatedDeformConvPack):
    def forward(self, x, feat):
        offset, mask = _split(self.conv_offset(feat))
        return self._deform(x, offset, mask)


def _claim(cls, module: str, name: str):
    """A copy of ``cls`` that says it is ``module.name``, as surgery will see the original."""
    return type(name, (cls,), {"__module__": module, "__qualname__": name})


MMCV = {
    "DeformConv2d": _claim(MmcvDeformConv2d, "mmcv.ops.deform_conv", "DeformConv2d"),
    "DeformConv2dPack": _claim(MmcvDeformConv2dPack, "mmcv.ops.deform_conv", "DeformConv2dPack"),
    "ModulatedDeformConv2d": _claim(
        MmcvModulatedDeformConv2d, "mmcv.ops.modulated_deform_conv", "ModulatedDeformConv2d"
    ),
    "ModulatedDeformConv2dPack": _claim(
        MmcvModulatedDeformConv2dPack, "mmcv.ops.modulated_deform_conv", "ModulatedDeformConv2dPack"
    ),
}
_LEGACY = {
    "DeformConv": LegacyDeformConv,
    "DeformConvPack": LegacyDeformConvPack,
    "ModulatedDeformConv": LegacyModulatedDeformConv,
    "ModulatedDeformConvPack": LegacyModulatedDeformConvPack,
}
_DB = {
    **_LEGACY,
    "DeformConvPack": DbDeformConvPack,
    "ModulatedDeformConvPack": DbModulatedDeformConvPack,
}
DB = {name: _claim(cls, "assets.ops.dcn.modules.deform_conv", name) for name, cls in _DB.items()}
BASICSR = {name: _claim(cls, "basicsr.ops.dcn.deform_conv", name) for name, cls in _LEGACY.items()}
BASICSR["DCNv2Pack"] = _claim(BasicsrDCNv2Pack, "basicsr.archs.arch_util", "DCNv2Pack")
