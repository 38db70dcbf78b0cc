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

The modulated CUDA kernel (``modulated_deform_conv_cuda_forward``) never checks the offset and
mask shapes: for each sample ``b`` it hands ``offset[b]`` and ``mask[b]`` to im2col, which reads
the first ``2 * deformable_groups * kH * kW * H_out * W_out`` (mask: ``deformable_groups * kH *
kW * H_out * W_out``) values of that sample as if they had the output's size. DB's ResNet-50
depends on it: its ``conv2_offset`` has stride 1 while ``conv2`` has stride 2 (MhLiao/DB issue
250, pytorch/vision issue 4899), so every DB and DBNet++ ResNet-50 checkpoint was trained with
offsets that are four times larger than the output. :func:`kernel_read` reproduces that read,
forward and gradients (the values not read get zero gradient, as ``zeros_like`` in the CUDA
backward leaves them). The non-modulated kernel does check (``shape_check``), so ``DeformConv``
rejects the mismatch as the original does.
"""

import warnings

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from deformcli.families._base import (
    DeformableConvBase,
    check_offset_channels,
    split_offset_and_mask,
)
from deformcli.ops.deform_conv import deform_conv2d_mmcv_grad

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


class KernelReadWarning(UserWarning):
    """A layer was given offsets larger than its output and reads them as the CUDA kernel did."""


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
    if weight.dim() == 4:
        check_offset_channels(
            offset, weight.shape[2:], deformable_groups, f"deformable_groups={deformable_groups}"
        )
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
    """The legacy functional ``modulated_deform_conv`` (mask before weight).

    Offset and mask larger than the output are read as the CUDA kernel reads them
    (:func:`kernel_read`).
    """
    if weight.dim() == 4:
        check_offset_channels(
            offset, weight.shape[2:], deformable_groups, f"deformable_groups={deformable_groups}"
        )
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    offset, mask = kernel_read(input, offset, mask, weight, stride, padding, dilation)
    return deform_conv2d_mmcv_grad(input, offset, weight, bias, stride, padding, dilation, mask)


def output_size(
    input: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """``(H_out, W_out)`` of a convolution of ``input`` ``(N, C, H, W)`` with ``weight``."""
    sizes = []
    for dim in range(2):
        span = dilation[dim] * (weight.shape[2 + dim] - 1) + 1
        sizes.append((input.shape[2 + dim] + 2 * padding[dim] - span) // stride[dim] + 1)
    return sizes[0], sizes[1]


def kernel_read(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    layer: str = "modulated_deform_conv",
) -> tuple[Tensor, Tensor]:
    """Offset and mask as mmdetection v1's modulated CUDA kernel reads them.

    When ``offset`` ``(N, 2 * dg * kH * kW, H', W')`` or ``mask`` ``(N, dg * kH * kW, H', W')``
    has another spatial size than the output ``(H_out, W_out)``, the kernel reads the first
    ``channels * H_out * W_out`` values of each sample (in ``(C, H', W')`` order):
    ``offset.reshape(N, -1)[:, :2 * dg * kH * kW * H_out * W_out].view(N, -1, H_out, W_out)``.
    Tensors of the output's size are returned as they are. Raises RuntimeError naming ``layer``
    when a sample holds fewer values than the kernel reads (it would read past the tensor).
    """
    if input.dim() != 4 or weight.dim() != 4 or offset.dim() != 4:
        return offset, mask  # the op's own checks name the problem
    out_h, out_w = output_size(input, weight, stride, padding, dilation)
    return (
        _read_like_kernel(offset, "offset", out_h, out_w, layer),
        _read_like_kernel(mask, "mask", out_h, out_w, layer),
    )


def _read_like_kernel(tensor: Tensor, name: str, out_h: int, out_w: int, layer: str) -> Tensor:
    if tensor.dim() != 4 or tuple(tensor.shape[2:]) == (out_h, out_w):
        return tensor
    batch, channels = tensor.shape[:2]
    needed = channels * out_h * out_w
    held = channels * tensor.shape[2] * tensor.shape[3]
    if held < needed:
        raise RuntimeError(
            f"{layer}: {name} has shape {list(tensor.shape)} but the output is {out_h}x{out_w}: "
            f"the CUDA kernel reads {needed} values per sample ({channels} x {out_h} x {out_w}) "
            f"and this {name} holds {held}; is the {name} computed at a smaller stride than "
            "the layer's?"
        )
    return tensor.reshape(batch, held)[:, :needed].reshape(batch, channels, out_h, out_w)


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
        if x.dim() == 4 and offset.dim() == 4 and self.weight.dim() == 4:
            # mmdetection v1's shape_check: the non-modulated CUDA op refuses this too.
            out_h, out_w = output_size(
                x, self.weight, _pair(self.stride), _pair(self.padding), _pair(self.dilation)
            )
            if tuple(offset.shape[2:]) != (out_h, out_w):
                raise RuntimeError(
                    f"{self.layer_name}: invalid spatial size of offset {list(offset.shape)}: "
                    f"expected {out_h}x{out_w}, the output size (input {list(x.shape)}, stride "
                    f"{self.stride}); mmdetection v1's CUDA DeformConv rejects it as well"
                )
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
        self._warned_kernel_read = False

    @property
    def offset_groups(self) -> int:
        return self.deformable_groups

    def init_weights(self) -> None:
        self.uniform_weight_init()

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        read_offset, read_mask = kernel_read(
            x,
            offset,
            mask,
            self.weight,
            _pair(self.stride),
            _pair(self.padding),
            _pair(self.dilation),
            self.layer_name,
        )
        if read_offset is not offset or read_mask is not mask:
            self._warn_kernel_read(offset, mask, read_offset)
        return self.deform(x, read_offset, read_mask)

    def _warn_kernel_read(self, offset: Tensor, mask: Tensor, read_offset: Tensor) -> None:
        if self._warned_kernel_read or torch.compiler.is_compiling():
            return
        self._warned_kernel_read = True
        warnings.warn(
            f"{self.layer_name}: offset {list(offset.shape)} and mask {list(mask.shape)} are "
            f"larger than its {read_offset.shape[2]}x{read_offset.shape[3]} output; read as "
            "DB's CUDA kernel read them, unchecked (the first values of each sample; MhLiao/DB "
            "issue 250), which this checkpoint was trained with",
            KernelReadWarning,
            stacklevel=2,
        )


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
