"""BasicSR's deformable layers: the legacy ``basicsr.ops.dcn`` set plus ``DCNv2Pack``.

``DCNv2Pack`` (basicsr/archs/arch_util.py, used by EDVR and friends) is a
``ModulatedDeformConvPack`` whose forward takes ``(x, feat)`` and predicts offset and mask from
``feat``. With torchvision >= 0.9 BasicSR runs it through ``torchvision.ops.deform_conv2d``, so
ours follows torchvision's offset-gradient convention.
"""

import logging

from torch import Tensor

from deformcli.families._base import split_offset_and_mask
from deformcli.families.legacy_dcn import (
    DeformConv,
    DeformConvPack,
    ModulatedDeformConv,
    ModulatedDeformConvPack,
    deform_conv,
    modulated_deform_conv,
)

__all__ = [
    "DCNv2Pack",
    "DeformConv",
    "DeformConvPack",
    "ModulatedDeformConv",
    "ModulatedDeformConvPack",
    "deform_conv",
    "modulated_deform_conv",
]

logger = logging.getLogger(__name__)

# BasicSR warns when offsets are this large: usually a sign of divergent training.
_LARGE_OFFSET_MEAN = 50


class DCNv2Pack(ModulatedDeformConvPack):
    """``basicsr.archs.arch_util.DCNv2Pack``: forward(x ``(N, C_in, H, W)``, feat) where
    ``conv_offset(feat)`` gives offset and mask for sampling ``x``.
    """

    torchvision_offset_grad = True

    def forward(self, x: Tensor, feat: Tensor) -> Tensor:  # type: ignore[override]
        offset, mask = split_offset_and_mask(self.conv_offset(feat))
        offset_absmean = offset.abs().mean()
        if offset_absmean > _LARGE_OFFSET_MEAN:
            logger.warning("Offset abs mean is %s, larger than 50.", float(offset_absmean))
        return self.deform(x, offset, mask)
