"""Deformable convolution (DCNv1, modulated DCNv2) written only with PyTorch tensor operations.

The op samples the input bilinearly at ``kernel position + learned offset`` for every output
pixel, multiplies by an optional modulation mask, and contracts the sampled columns with the
weight in one matrix multiply. Every step is an ordinary differentiable tensor op, so autograd
(double backward included), ``torch.compile``, ``torch.export``, ONNX export and TorchScript
all see through it, and it runs on any device torch runs on.

There are two formulations with the same numbers and gradients:

* On CPU (eager; and compiled or scripted without autograd), sampling is a weighted gather of
  channels-last pixels, :mod:`deformcli.ops._gather`, several times faster than the one below.
* Elsewhere (GPUs, exported graphs, autograd under TorchScript or torch.compile), bilinear
  sampling is ``torch.nn.functional.grid_sample``, :mod:`deformcli.ops._grid_sample`.

This module holds the public API, the argument checks' entry and the dispatcher between the
two.

Output rows are processed in chunks so the temporary columns stay below a cap
(:func:`set_max_column_bytes`), which bounds memory on large images.
"""

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.modules.utils import _pair

from deformcli.ops._checks import check_deform_conv2d_arguments, check_layer_groups
from deformcli.ops._chunking import get_max_column_bytes, set_max_column_bytes
from deformcli.ops._gather import gather_deform_conv2d, is_channels_last
from deformcli.ops._grid_sample import grid_sample_deform_conv2d

__all__ = [
    "DeformConv2d",
    "deform_conv2d",
    "deform_conv2d_mmcv_grad",
    "get_max_column_bytes",
    "set_max_column_bytes",
]


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable 2-D convolution, a drop-in for :func:`torchvision.ops.deform_conv2d`.

    Performs Deformable Convolution v2 (https://arxiv.org/abs/1811.11168) if ``mask`` is given,
    else Deformable Convolution (https://arxiv.org/abs/1703.06211). Numbers and all five
    gradients (input, offset, mask, weight, bias) equal torchvision's, including its one-sided
    offset gradient at integer sampling coordinates.

    Args:
        input: ``(N, C_in, H, W)``.
        offset: ``(N, 2 * offset_groups * kH * kW, H_out, W_out)``; for offset group ``g`` and
            kernel point ``k = i * kW + j`` channel ``2 * (g * kH * kW + k)`` is the y (row)
            displacement and the next channel the x (column) displacement.
        weight: ``(C_out, C_in // groups, kH, kW)``; ``groups = C_in // weight.shape[1]``.
        bias: ``(C_out,)`` or None.
        stride, padding, dilation: an int or a pair ``(h, w)``.
        mask: ``(N, offset_groups * kH * kW, H_out, W_out)`` modulation, or None.

    Returns:
        ``(N, C_out, H_out, W_out)`` with
        ``H_out = (H + 2 * padding_h - dilation_h * (kH - 1) - 1) // stride_h + 1`` (same for W),
        channels-last for a channels-last ``input`` (as from torch's convolutions; on CPU the
        faster layout), contiguous otherwise.

    Sampling is bilinear; each of the four corners that falls outside the image contributes
    zero. Conv groups and offset groups are independent of each other.

    Example::

        >>> input = torch.rand(4, 3, 10, 10)
        >>> kh, kw = 3, 3
        >>> weight = torch.rand(5, 3, kh, kw)
        >>> # offset and mask should have the same spatial size as the output of the
        >>> # convolution: here, with no padding, that is (8, 8)
        >>> offset = torch.rand(4, 2 * kh * kw, 8, 8)
        >>> mask = torch.rand(4, kh * kw, 8, 8)
        >>> out = deform_conv2d(input, offset, weight, mask=mask)
        >>> out.shape
        torch.Size([4, 5, 8, 8])
    """
    return _deform_conv2d(
        input,
        offset,
        weight,
        bias,
        _as_pair(stride),
        _as_pair(padding),
        _as_pair(dilation),
        mask,
        False,
    )


def deform_conv2d_mmcv_grad(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    mask: Tensor | None = None,
) -> Tensor:
    """:func:`deform_conv2d` with the offset gradient of mmcv's (and the DB detector's) kernels.

    Same arguments, shapes and forward values as :func:`deform_conv2d`, and the same input,
    mask, weight and bias gradients. The offset gradient differs only where a sampling point
    lies at or beyond ``y = -1`` or ``x = -1`` (or at or beyond ``H``, ``W``): mmcv's CUDA kernel
    gives such a point no offset gradient at all, while torchvision's one-sided derivative at
    exactly ``y == -1`` or ``x == -1`` sees row or column 0 of the image. With zero-initialised
    offsets (mmcv's ``*Pack`` modules) and padding 1, every border sample sits exactly there.
    """
    return _deform_conv2d(
        input,
        offset,
        weight,
        bias,
        _as_pair(stride),
        _as_pair(padding),
        _as_pair(dilation),
        mask,
        True,
    )


def _deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Tensor | None,
    offset_grad_inside_only: bool,
) -> Tensor:
    """The op, with the choice of offset-gradient convention.

    ``offset_grad_inside_only=False`` is torchvision's convention. ``True`` is mmcv's (and the
    DB detector's): a sampling point with ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W``
    passes no gradient to its offset. The forward values are identical; the two differ only
    for points exactly on ``y == -1`` or ``x == -1``, where torchvision's one-sided derivative
    sees row or column 0.
    """
    geometry = check_deform_conv2d_arguments(
        input, offset, weight, bias, stride, padding, dilation, mask
    )

    sample_dtype, gemm_dtype = _compute_dtypes(input)
    needs_grad = _needs_autograd(input, offset, weight, bias, mask)
    exporting = _exporting()
    if input.device.type == "cpu" and not exporting and not _grid_sample_for_autograd(needs_grad):
        out = gather_deform_conv2d(
            input,
            offset,
            weight,
            bias,
            mask,
            geometry,
            sample_dtype=sample_dtype,
            gemm_dtype=gemm_dtype,
            needs_grad=needs_grad,
            offset_grad_inside_only=offset_grad_inside_only,
        )
    else:
        out = grid_sample_deform_conv2d(
            input,
            offset,
            weight,
            bias,
            mask,
            geometry,
            sample_dtype=sample_dtype,
            gemm_dtype=gemm_dtype,
            offset_grad_inside_only=offset_grad_inside_only,
            needs_grad=needs_grad,
            exporting=exporting,
        )
    if exporting:
        return out
    # The output takes the input's layout, as from torch's convolutions: a no-op for the CPU
    # kernel, which writes it so directly.
    if is_channels_last(input):
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def _compute_dtypes(input: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes that sampling and the GEMM run in for ``input``."""
    # Sampling runs in at least float32: half-precision coordinates would be off by pixels.
    # On CPU the float16 GEMM runs in float32 too: CPUs have no fast float16 matrix product (it
    # is ~40x slower than float32 here), while bfloat16 ones use oneDNN's bf16 kernels.
    sample_dtype = input.dtype
    if sample_dtype == torch.float16 or sample_dtype == torch.bfloat16:
        sample_dtype = torch.float32
    gemm_dtype = input.dtype
    if input.device.type == "cpu" and input.dtype == torch.float16:
        gemm_dtype = torch.float32
    return sample_dtype, gemm_dtype


def _as_pair(value: tuple[int, int]) -> tuple[int, int]:
    """An int or a pair as a pair (typed for TorchScript, which needs a fixed-size tuple)."""
    if isinstance(value, int):  # the common case, without _pair's slower Iterable check
        return (value, value)
    first, second = _pair(value)
    return (first, second)


def _needs_autograd(
    input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None
) -> bool:
    """Whether the call records a graph: grad mode on and some argument requires grad."""
    if not torch.is_grad_enabled():
        return False
    if input.requires_grad or offset.requires_grad or weight.requires_grad:
        return True
    if bias is not None and bias.requires_grad:
        return True
    return mask is not None and mask.requires_grad


def _grid_sample_for_autograd(needs_grad: bool) -> bool:
    """Whether a CPU call needs gradients where only the grid_sample formulation has them:
    TorchScript and torch.compile cannot trace the gather kernel's custom autograd.Function."""
    return needs_grad and (torch.jit.is_scripting() or torch.compiler.is_compiling())


def _exporting() -> bool:
    """True under torch.export, ONNX export and jit tracing (graphs with symbolic shapes)."""
    if torch.jit.is_scripting():
        return False
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


class DeformConv2d(nn.Module):
    """Deformable convolution layer, a drop-in for :class:`torchvision.ops.DeformConv2d`.

    Same constructor, parameter names (``weight``, ``bias``), shapes and initialisation, so a
    state_dict moves between torchvision's module and this one with ``strict=True``.

    Shapes:
        input ``(N, in_channels, H, W)``; offset ``(N, 2 * offset_groups * kH * kW, H_out, W_out)``;
        mask ``(N, offset_groups * kH * kW, H_out, W_out)`` or None; output
        ``(N, out_channels, H_out, W_out)``. ``offset_groups`` is read from the offset's shape.
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
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_layer_groups(in_channels, out_channels, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups

        self.weight = nn.Parameter(
            torch.empty(
                out_channels, in_channels // groups, self.kernel_size[0], self.kernel_size[1]
            )
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torchvision's initialisation: Kaiming-uniform weight, bias uniform in +-1/sqrt(fan_in).
        init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / fan_in**0.5
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        """input ``(N, C_in, H, W)``, offset ``(N, 2*G*kH*kW, H_out, W_out)``, mask or None."""
        return deform_conv2d(
            input,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s
