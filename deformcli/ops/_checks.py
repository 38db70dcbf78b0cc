"""Argument checks for deform_conv2d: clear errors instead of failures deep inside torch.

Shape and tensor problems raise ``RuntimeError`` (as torchvision's op does); bad stride,
padding or dilation values raise ``ValueError``. Every message names the tensor, what was
expected and what was given.
"""

from typing import NamedTuple

from torch import Tensor


class Geometry(NamedTuple):
    """One call's checked geometry: what the formulations need besides the tensors.

    ``groups``: conv groups (``C_in // weight.shape[1]``); ``offset_groups``:
    ``offset.shape[1] // (2 * kH * kW)``; ``out_h``, ``out_w``: the output size.
    """

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    offset_groups: int
    out_h: int
    out_w: int


def check_deform_conv2d_arguments(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Tensor | None,
) -> Geometry:
    """Validate the op's arguments; returns the call's :class:`Geometry`."""
    if stride[0] <= 0 or stride[1] <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if padding[0] < 0 or padding[1] < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    if dilation[0] <= 0 or dilation[1] <= 0:
        raise ValueError(f"dilation must be positive, got {dilation}")

    _check_dims("input", input, "(batch, in_channels, height, width)")
    _check_dims("offset", offset, "(batch, 2 * offset_groups * kH * kW, out_h, out_w)")
    _check_dims("weight", weight, "(out_channels, in_channels // groups, kH, kW)")
    _check_tensor_like("offset", offset, input)
    _check_tensor_like("weight", weight, input)
    if not input.is_floating_point():
        raise RuntimeError(f"input must be a floating point tensor, got dtype {input.dtype}")

    batch, in_channels, height, width = input.shape
    out_channels, group_in_channels, kernel_h, kernel_w = weight.shape
    kernel_points = kernel_h * kernel_w
    if group_in_channels == 0 or kernel_points == 0:
        raise RuntimeError(
            f"weight must have non-empty channel and kernel dims, got shape {list(weight.shape)}"
        )
    if in_channels % group_in_channels != 0:
        raise RuntimeError(
            f"input has {in_channels} channels, which is not a multiple of weight.shape[1]="
            f"{group_in_channels} (in_channels // groups); weight shape {list(weight.shape)}"
        )
    groups = in_channels // group_in_channels
    if out_channels % groups != 0:
        raise RuntimeError(
            f"weight.shape[0]={out_channels} (out_channels) must be divisible by groups={groups} "
            f"(in_channels {in_channels} // weight.shape[1] {group_in_channels})"
        )

    offset_channels = offset.shape[1]
    if offset_channels == 0 or offset_channels % (2 * kernel_points) != 0:
        raise RuntimeError(
            f"offset.shape[1] must be a positive multiple of 2 * kH * kW = {2 * kernel_points}, "
            f"got offset shape {list(offset.shape)}"
        )
    offset_groups = offset_channels // (2 * kernel_points)
    if in_channels % offset_groups != 0:
        raise RuntimeError(
            f"input channels ({in_channels}) must be divisible by offset_groups ({offset_groups}, "
            f"from offset.shape[1]={offset_channels} // (2 * {kernel_points}))"
        )

    out_h = (height + 2 * padding[0] - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1
    if out_h <= 0 or out_w <= 0:
        raise RuntimeError(
            f"computed output size ({out_h}, {out_w}) is too small: input {height}x{width}, "
            f"kernel {kernel_h}x{kernel_w}, padding {padding}, dilation {dilation}, stride {stride}"
        )

    expected_offset = [batch, 2 * offset_groups * kernel_points, out_h, out_w]
    if list(offset.shape) != expected_offset:
        raise RuntimeError(
            f"offset has shape {list(offset.shape)}, expected {expected_offset} "
            f"(batch, 2 * offset_groups * kH * kW, out_h, out_w)"
        )
    if mask is not None:
        _check_tensor_like("mask", mask, input)
        expected_mask = [batch, offset_groups * kernel_points, out_h, out_w]
        if list(mask.shape) != expected_mask:
            raise RuntimeError(
                f"mask has shape {list(mask.shape)}, expected {expected_mask} "
                f"(batch, offset_groups * kH * kW, out_h, out_w)"
            )
    if bias is not None:
        _check_tensor_like("bias", bias, input)
        if list(bias.shape) != [out_channels]:
            raise RuntimeError(
                f"bias has shape {list(bias.shape)}, expected [{out_channels}] (out_channels)"
            )
    return Geometry(stride, padding, dilation, groups, offset_groups, out_h, out_w)


def _check_dims(name: str, tensor: Tensor, layout: str) -> None:
    if tensor.dim() != 4:
        raise RuntimeError(f"{name} must be a 4-D tensor {layout}, got shape {list(tensor.shape)}")


def _check_tensor_like(name: str, tensor: Tensor, input: Tensor) -> None:
    if tensor.dtype != input.dtype:
        raise RuntimeError(
            f"{name} has dtype {tensor.dtype} but input has dtype {input.dtype}; they must match"
        )
    if tensor.device != input.device:
        raise RuntimeError(
            f"{name} is on device {tensor.device} but input is on {input.device}; they must match"
        )


def check_layer_groups(in_channels: int, out_channels: int, groups: int) -> None:
    """A layer constructor's check: channels divisible by conv groups (ValueError otherwise)."""
    if in_channels % groups != 0:
        raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
    if out_channels % groups != 0:
        raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
