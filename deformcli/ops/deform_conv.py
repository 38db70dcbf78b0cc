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
  sampling is ``torch.nn.functional.grid_sample`` (zeros padding), one fused, vectorised
  kernel per device with its own backward and double backward. Its zeros padding is exactly
  torchvision's rule that each corner outside the image contributes zero. Each offset group
  is a batch entry of ``grid_sample`` and the kernel points are stacked along the sampled
  height, so the result is the classic ``(C_in * K, positions)`` column matrix of im2col,
  contracted with the weight in a single batched GEMM per conv group. ``grid_sample`` takes
  normalised coordinates: the image is zero-padded on the bottom and right to power-of-two
  sizes so that normalising and unnormalising only multiply by powers of two, integer
  sampling points survive the round trip exactly, and with them torchvision's one-sided
  offset gradient at integer coordinates.

Output rows are processed in chunks so the temporary columns stay below a cap
(:func:`set_max_column_bytes`), which bounds memory on large images.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init
from torch.nn.modules.utils import _pair

from deformcli.ops._checks import check_deform_conv2d_arguments, check_layer_groups
from deformcli.ops._chunking import chunk_rows, get_max_column_bytes, set_max_column_bytes
from deformcli.ops._gather import gather_deform_conv2d

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
        ``H_out = (H + 2 * padding_h - dilation_h * (kH - 1) - 1) // stride_h + 1`` (same for W).

    Sampling is bilinear; each of the four corners that falls outside the image contributes
    zero. Conv groups and offset groups are independent of each other.
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
    groups, offset_groups, out_h, out_w = check_deform_conv2d_arguments(
        input, offset, weight, bias, stride, padding, dilation, mask
    )
    batch, in_channels, height, width = input.shape
    out_channels, group_in_channels, kernel_h, kernel_w = weight.shape
    kernel_points = kernel_h * kernel_w

    # Sampling runs in at least float32: half-precision coordinates would be off by pixels.
    # On CPU the float16 GEMM runs in float32 too: CPUs have no fast float16 matrix product (it
    # is ~40x slower than float32 here), while bfloat16 ones use oneDNN's bf16 kernels.
    sample_dtype = input.dtype
    if sample_dtype == torch.float16 or sample_dtype == torch.bfloat16:
        sample_dtype = torch.float32
    gemm_dtype = input.dtype
    if input.device.type == "cpu" and input.dtype == torch.float16:
        gemm_dtype = torch.float32

    needs_grad = _needs_autograd(input, offset, weight, bias, mask)
    if (
        input.device.type == "cpu"
        and not _exporting()
        and not _grid_sample_for_autograd(needs_grad)
    ):
        return gather_deform_conv2d(
            input,
            offset,
            weight,
            bias,
            stride,
            padding,
            dilation,
            mask,
            offset_groups,
            out_h,
            out_w,
            sample_dtype,
            gemm_dtype,
            needs_grad,
            offset_grad_inside_only,
        )

    padded_h, padded_w = height, width
    if not _exporting():
        # Exact integer sampling points (see the module docstring). Exported graphs keep H, W
        # symbolic, so they normalise with the true size: values agree to float rounding.
        padded_h = _next_power_of_two(height)
        padded_w = _next_power_of_two(width)
    # grid_sample (align_corners=False) reads pixel p at u = (p + 0.5) * scale - 1.
    scale_y = 2.0 / padded_h
    scale_x = 2.0 / padded_w
    base_y, base_x = _normalised_kernel_grid(
        kernel_h,
        kernel_w,
        out_h,
        out_w,
        stride,
        padding,
        dilation,
        scale_y,
        scale_x,
        sample_dtype,
        input.device,
    )
    # u = base + scale * offset: one rounding of the exact ((p + offset) + 0.5) * scale - 1,
    # since scaling by a power of two is exact. (N, offset_groups, kH, kW, H_out, W_out, 2),
    # with the offsets viewed as (N, offset_groups, kH, kW, 2, H_out, W_out).
    offset = offset.to(sample_dtype).reshape(
        batch, offset_groups, kernel_h, kernel_w, 2, out_h, out_w
    )
    grid = torch.stack(
        [
            torch.add(base_x, offset[:, :, :, :, 1], alpha=scale_x),
            torch.add(base_y, offset[:, :, :, :, 0], alpha=scale_y),
        ],
        dim=-1,
    )
    # Points beyond about -2 or H + 1 (W + 1), infinite or NaN ones included, sample nothing
    # and pass no gradient, as in torchvision; clamped there, grid_sample's coordinates stay
    # finite. (|u| = 4 is at least two pixels outside for any size.)
    grid = grid.nan_to_num(-4.0, 4.0, -4.0).clamp(-4.0, 4.0)
    if offset_grad_inside_only:
        # Strictly inside (-1, H) x (-1, W), in normalised units.
        x = grid[..., 0]
        y = grid[..., 1]
        inside = (
            (y > -0.5 * scale_y - 1)
            & (y < (height + 0.5) * scale_y - 1)
            & (x > -0.5 * scale_x - 1)
            & (x < (width + 0.5) * scale_x - 1)
        )
        grid = torch.where(inside.unsqueeze(-1), grid, grid.detach())
    grid = grid.view(batch * offset_groups, kernel_points, out_h, out_w, 2)

    # (N * offset_groups, C_in / offset_groups, padded_h, padded_w)
    image = input.to(sample_dtype)
    if padded_h != height or padded_w != width:
        image = F.pad(image, (0, padded_w - width, 0, padded_h - height))
    image = image.reshape(batch * offset_groups, in_channels // offset_groups, padded_h, padded_w)
    modulation: Tensor | None = None
    if mask is not None:
        modulation = mask.reshape(batch, offset_groups, 1, kernel_points, out_h, out_w)

    weight_matrix = weight.to(gemm_dtype).reshape(
        groups, out_channels // groups, group_in_channels * kernel_points
    )
    rows_per_chunk = chunk_rows(
        out_h,
        out_w,
        batch * in_channels * kernel_points * out_w * weight_matrix.element_size(),
        torch.is_grad_enabled() and image.requires_grad,
        input.device.type,
    )
    # out[n, group] = weight_matrix[group] @ columns[n, group]: (C_out/groups, positions)
    if rows_per_chunk >= out_h:
        out = torch.matmul(
            weight_matrix,
            _sample_columns(
                image, grid, modulation, 0, out_h, batch, offset_groups, groups, gemm_dtype
            ),
        )
    else:
        out = weight_matrix.new_empty(batch, groups, out_channels // groups, out_h * out_w)
        for row_start in range(0, out_h, rows_per_chunk):
            row_stop = min(row_start + rows_per_chunk, out_h)
            columns = _sample_columns(
                image,
                grid,
                modulation,
                row_start,
                row_stop,
                batch,
                offset_groups,
                groups,
                gemm_dtype,
            )
            out[..., row_start * out_w : row_stop * out_w] = torch.matmul(weight_matrix, columns)
    out = out.reshape(batch, out_channels, out_h, out_w).to(input.dtype)
    if bias is not None:
        out = out + bias.view(1, out_channels, 1, 1)
    return out


def _sample_columns(
    image: Tensor,
    grid: Tensor,
    modulation: Tensor | None,
    row_start: int,
    row_stop: int,
    batch: int,
    offset_groups: int,
    groups: int,
    dtype: torch.dtype,
) -> Tensor:
    """Modulated im2col columns of output rows ``row_start:row_stop``.

    Args:
        image: ``(N * offset_groups, C_in / offset_groups, padded_h, padded_w)``.
        grid: ``(N * offset_groups, K, H_out, W_out, 2)`` normalised (x, y) sampling points.
        modulation: ``(N, offset_groups, 1, K, H_out, W_out)`` or None.

    Returns:
        ``(N, groups, C_in / groups * K, rows * W_out)`` columns in ``dtype``.
    """
    batch_offset_groups, group_channels, _, _ = image.shape
    _, kernel_points, _, out_w, _ = grid.shape
    rows = row_stop - row_start
    # (N * offset_groups, C_in / offset_groups, K * rows, W_out)
    columns = F.grid_sample(
        image,
        grid[:, :, row_start:row_stop].reshape(batch_offset_groups, kernel_points * rows, out_w, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    ).to(dtype)
    if modulation is not None:
        columns = columns.reshape(batch, offset_groups, group_channels, kernel_points, rows, out_w)
        chunk_mask = modulation[..., row_start:row_stop, :]
        if torch.is_grad_enabled() and (columns.requires_grad or chunk_mask.requires_grad):
            columns = columns * chunk_mask
        else:
            # Saves allocating a second column buffer at inference.
            columns = columns.mul_(chunk_mask)
    in_channels = offset_groups * group_channels
    return columns.reshape(batch, groups, in_channels // groups * kernel_points, rows * out_w)


def _as_pair(value: tuple[int, int]) -> tuple[int, int]:
    """An int or a pair as a pair (typed for TorchScript, which needs a fixed-size tuple)."""
    first, second = _pair(value)
    return (first, second)


def _normalised_kernel_grid(
    kernel_h: int,
    kernel_w: int,
    out_h: int,
    out_w: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    scale_y: float,
    scale_x: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Undeformed sampling points ``u = (p + 0.5) * scale - 1``: y ``(kH, 1, H_out, 1)`` and x
    ``(1, kW, 1, W_out)``, broadcasting against ``(kH, kW, H_out, W_out)``."""
    rows = torch.arange(-padding[0], out_h * stride[0] - padding[0], stride[0], device=device)
    cols = torch.arange(-padding[1], out_w * stride[1] - padding[1], stride[1], device=device)
    kernel_rows = torch.arange(0, kernel_h * dilation[0], dilation[0], device=device)
    kernel_cols = torch.arange(0, kernel_w * dilation[1], dilation[1], device=device)
    pixel_y = (kernel_rows.view(kernel_h, 1, 1, 1) + rows.view(1, 1, out_h, 1)).to(dtype)
    pixel_x = (kernel_cols.view(1, kernel_w, 1, 1) + cols.view(1, 1, 1, out_w)).to(dtype)
    return pixel_y * scale_y + (0.5 * scale_y - 1), pixel_x * scale_x + (0.5 * scale_x - 1)


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


def _next_power_of_two(size: int) -> int:
    power = 1
    while power < size:
        power *= 2
    return power


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
