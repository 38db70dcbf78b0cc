"""CharlesShang's ``DCNv2`` extension (``dcn_v2.py``), as CenterNet, FairMOT, CenterTrack, SMOKE
and YOLACT++ vendor or install it.

Checked against CharlesShang/DCNv2 ``dcn_v2.py`` (the PyTorch 1.x branch: ``import _ext as
_backend``, ``dcn_v2_conv = _DCNv2.apply``) and the copy CenterNet vendors
(``src/lib/models/networks/DCNv2/dcn_v2.py``):

- ``DCNv2(in_channels, out_channels, kernel_size, stride, padding, dilation=1,
  deformable_groups=1)``: ``weight (C_out, C_in, kH, kW)`` (no conv groups) and an always
  present ``bias (C_out,)``, initialised ``uniform(+-1/sqrt(C_in * kH * kW))`` and zero;
  stride, padding and dilation are kept as given. ``forward(input, offset, mask)``.
- ``DCN(DCNv2)`` adds ``conv_offset_mask = Conv2d(C_in, dg * 3 * kH * kW, kernel_size, stride,
  padding, bias=True)`` (zero-initialised; the layer's dilation is not passed to it) and in
  ``forward`` splits its output ``o1, o2, mask = chunk(3)``, offset ``cat(o1, o2)``, mask
  ``sigmoid``.
- ``dcn_v2_conv(input, offset, mask, weight, bias, stride, padding, dilation,
  deformable_groups)``.
- The offset gradient: the CUDA kernel's ``dmcn_get_coordinate_weight`` returns 0 for any point
  with ``h <= -1``, ``h >= H``, ``w <= -1`` or ``w >= W``: mmcv's convention (both descend from
  the same MSRA code), not torchvision's.

The deformable RoI pooling classes (``DCNv2Pooling``, ``DCNPooling``, ``dcn_v2_pooling``) import,
so model files load, and raise a clear error when used.
"""

from torch import Tensor
from torch.nn.modules.utils import _pair

from deformcli.families._base import DeformableConvBase, OffsetMaskPack
from deformcli.mmcv_ops import unavailable
from deformcli.ops.deform_conv import deform_conv2d_mmcv_grad

__all__ = [
    "DCN",
    "DCNPooling",
    "DCNv2",
    "DCNv2Pooling",
    "dcn_v2_conv",
    "dcn_v2_pooling",
]


def dcn_v2_conv(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    dilation: int | tuple[int, int],
    deformable_groups: int,
) -> Tensor:
    """The functional op: input ``(N, C_in, H, W)``, offset ``(N, 2 * dg * kH * kW, H_out,
    W_out)``, mask ``(N, dg * kH * kW, H_out, W_out)`` (already through the sigmoid)."""
    expected = 2 * deformable_groups * weight.shape[2] * weight.shape[3]
    if offset.dim() == 4 and offset.shape[1] != expected:
        raise RuntimeError(
            f"deformable_groups={deformable_groups} expects offset with {expected} channels, "
            f"got offset shape {list(offset.shape)}"
        )
    return deform_conv2d_mmcv_grad(
        input, offset, weight, bias, _pair(stride), _pair(padding), _pair(dilation), mask
    )


class DCNv2(DeformableConvBase):
    """``dcn_v2.DCNv2``: forward(input ``(N, C_in, H, W)``, offset, mask)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: int | tuple[int, int],
        dilation: int | tuple[int, int] = 1,
        deformable_groups: int = 1,
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, 1)
        self.deformable_groups = deformable_groups
        self.init_bias_parameter(True)
        self.reset_parameters()

    @property
    def offset_groups(self) -> int:
        return self.deformable_groups

    def reset_parameters(self) -> None:
        self.uniform_weight_init()

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return self.deform(input, offset, mask)


class DCN(OffsetMaskPack, DCNv2):
    """``dcn_v2.DCN``: predicts offset and mask with ``conv_offset_mask``; forward(input)."""


_PROVIDED = ["DCNv2", "DCN", "dcn_v2_conv"]
DCNv2Pooling = unavailable("dcn_v2", "DCNv2Pooling", _PROVIDED)
DCNPooling = unavailable("dcn_v2", "DCNPooling", _PROVIDED)
dcn_v2_pooling = unavailable("dcn_v2", "dcn_v2_pooling", _PROVIDED)
