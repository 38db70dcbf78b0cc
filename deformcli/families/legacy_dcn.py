"""mmdetection v1's DCN layers, as vendored by the DB text detector and by BasicSR.

DB ships them as ``assets.ops.dcn`` and BasicSR as ``basicsr.ops.dcn``; both export
``DeformConv``, ``DeformConvPack``, ``ModulatedDeformConv``, ``ModulatedDeformConvPack``,
``deform_conv`` and ``modulated_deform_conv``. Checked against MhLiao/DB
assets/ops/dcn/__init__.py and functions/deform_conv.py, backbones/resnet.py (which builds
``DeformConv``/``ModulatedDeformConv`` with ``deformable_groups=`` and ``bias=False`` beside a
separate ``conv2_offset``), and XPixelGroup/BasicSR basicsr/ops/dcn/deform_conv.py.

Differences from mmcv's layers that matter for checkpoints: the keyword is
``deformable_groups``; ``ModulatedDeformConv`` keeps ``stride``/``padding``/``dilation`` as
given (ints in practice) and has ``with_bias``; no checkpoint-key renaming. Their CUDA kernel is
mmcv's ancestor, so the offset gradient follows mmcv's convention.
"""

from torch import Tensor
from torch.nn.modules.utils import _pair

from deformcli.families._base import DeformableConvBase, split_offset_and_mask
from deformcli.ops.deform_conv import deform_conv2d_mmcv_grad

__all__ = [
    "DeformConv",
    "DeformConvPack",
    "ModulatedDeformConv",
    "ModulatedDeformConvPack",
    "deform_conv",
    "modulated_deform_conv",
]


def deform_conv(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    deformable_groups: int = 1,
    im2col_step: int = 64,
) -> Tensor:
    """The legacy functional ``deform_conv`` (``im2col_step`` accepted and ignored)."""
    _check_offset_groups(offset, weight, deformable_groups)
    return deform_conv2d_mmcv_grad(
        input, offset, weight, None, _pair(stride), _pair(padding), _pair(dilation)
    )


def modulated_deform_conv(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    deformable_groups: int = 1,
) -> Tensor:
    """The legacy functional ``modulated_deform_conv`` (mask before weight)."""
    _check_offset_groups(offset, weight, deformable_groups)
    return deform_conv2d_mmcv_grad(
        input, offset, weight, bias, _pair(stride), _pair(padding), _pair(dilation), mask
    )


def _check_offset_groups(offset: Tensor, weight: Tensor, deformable_groups: int) -> None:
    if offset.dim() == 4 and weight.dim() == 4:
        expected = 2 * deformable_groups * weight.shape[2] * weight.shape[3]
        if offset.shape[1] != expected:
            raise RuntimeError(
                f"deformable_groups={deformable_groups} expects offset with {expected} channels, "
                f"got offset shape {list(offset.shape)}"
            )


class DeformConv(DeformableConvBase):
    """Legacy ``DeformConv``: DCNv1, weight only.

    forward(x ``(N, C_in, H, W)``, offset ``(N, 2 * deformable_groups * kH * kW, H_out, W_out)``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if bias:
            raise ValueError("bias=True is not supported in DeformConv (the original asserts it)")
        self._init_geometry(
            in_channels,
            out_channels,
            kernel_size,
            _pair(stride),
            _pair(padding),
            _pair(dilation),
            groups,
        )
        self.deformable_groups = deformable_groups
        self.reset_parameters()

    @property
    def offset_groups(self) -> int:
        return self.deformable_groups

    def reset_parameters(self) -> None:
        self.uniform_weight_init()

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        return self.deform(x, offset)


class DeformConvPack(DeformConv):
    """Legacy ``DeformConvPack``: zero-initialised ``conv_offset`` predicts the offset."""

    _version = 2

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = self.make_offset_conv(2)
        self.init_offset()

    def init_offset(self) -> None:
        self.zero_offset_conv()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.deform(x, self.conv_offset(x))


class ModulatedDeformConv(DeformableConvBase):
    """Legacy ``ModulatedDeformConv``: DCNv2 with ``weight`` and optional ``bias``.

    forward(x, offset ``(N, 2 * deformable_groups * kH * kW, H_out, W_out)``,
    mask ``(N, deformable_groups * kH * kW, H_out, W_out)``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        deformable_groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        # The original keeps stride/padding/dilation exactly as given.
        self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        )
        self.deformable_groups = deformable_groups
        self.with_bias = bias
        self.init_bias_parameter(bool(bias))
        self.init_weights()

    @property
    def offset_groups(self) -> int:
        return self.deformable_groups

    def init_weights(self) -> None:
        self.uniform_weight_init()

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return self.deform(x, offset, mask)


class ModulatedDeformConvPack(ModulatedDeformConv):
    """Legacy ``ModulatedDeformConvPack``: ``conv_offset`` gives ``3 * deformable_groups * kH * kW``
    channels, split as ``o1, o2, mask = chunk(3)``, offset ``cat(o1, o2)``, ``sigmoid(mask)``.
    """

    _version = 2

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = self.make_offset_conv(3)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        self.zero_offset_conv()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        offset, mask = split_offset_and_mask(self.conv_offset(x))
        return self.deform(x, offset, mask)
