"""The DB text detector's DCN (MhLiao/DB ``assets/ops/dcn``): mmdetection v1 as DB vendored it.

``DeformConv``, ``ModulatedDeformConv`` and the functional ops are the legacy layers of
:mod:`deformcli.families.legacy_dcn` (shared with BasicSR). DB's ``*Pack`` layers are an earlier
copy than BasicSR's: ``ModulatedDeformConvPack`` predicts offsets and mask with
``conv_offset_mask`` (BasicSR and later mmdetection renamed it ``conv_offset``), and neither
``*Pack`` passes the layer's dilation to its offset convolution. Checked against MhLiao/DB
``assets/ops/dcn/modules/deform_conv.py``.
"""

from torch import Tensor

from deformcli.families._base import OffsetMaskPack
from deformcli.families.legacy_dcn import (
    DeformConv,
    KernelReadWarning,
    ModulatedDeformConv,
    deform_conv,
    kernel_read,
    modulated_deform_conv,
)

__all__ = [
    "DeformConv",
    "DeformConvPack",
    "KernelReadWarning",
    "ModulatedDeformConv",
    "ModulatedDeformConvPack",
    "deform_conv",
    "kernel_read",
    "modulated_deform_conv",
]


class DeformConvPack(DeformConv):
    """DB's ``DeformConvPack``: zero-initialised ``conv_offset`` (without the layer's dilation)
    predicts the offset."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = self.make_offset_conv(2, dilated=False)
        self.init_offset()

    def init_offset(self) -> None:
        self.zero_offset_conv()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.deform(x, self.conv_offset(x))


class ModulatedDeformConvPack(OffsetMaskPack, ModulatedDeformConv):
    """DB's ``ModulatedDeformConvPack``: zero-initialised ``conv_offset_mask`` (without the
    layer's dilation) gives ``3 * deformable_groups * kH * kW`` channels, split as
    ``o1, o2, mask = chunk(3)``, offset ``cat(o1, o2)``, ``sigmoid(mask)``."""
