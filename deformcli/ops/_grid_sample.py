"""GPUs, exported graphs and autograd under TorchScript or torch.compile: bilinear sampling with
``torch.nn.functional.grid_sample``.

``grid_sample`` (zeros padding) is one fused, vectorised kernel per device with its own backward
and double backward; its zeros padding is exactly torchvision's rule that each corner outside
the image contributes zero. Each offset group is a batch entry of ``grid_sample`` and the kernel
points are stacked along the sampled height, so the result is the classic
``(C_in * K, positions)`` column matrix of im2col, contracted with the weight in one batched GEMM
per conv group. ``grid_sample`` takes normalised coordinates: the image is zero-padded on the
bottom and right to power-of-two sizes so that normalising and unnormalising only multiply by
powers of two, integer sampling points survive the round trip exactly, and with them
torchvision's one-sided offset gradient at integer coordinates.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from deformcli.ops._checks import Geometry
from deformcli.ops._chunking import chunk_rows


def grid_sample_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    geometry: Geometry,
    sample_dtype: torch.dtype,
    gemm_dtype: torch.dtype,
    offset_grad_inside_only: bool,
    exporting: bool,
) -> Tensor:
    """:func:`deformcli.deform_conv2d` on checked arguments, any device.

    Shapes are those of :func:`deformcli.deform_conv2d`; ``geometry`` is the call's checked
    stride, padding, dilation, groups and output size. Sampling runs in ``sample_dtype`` and
    the GEMM in ``gemm_dtype``; the result has the input's dtype. ``offset_grad_inside_only``
    picks mmcv's offset-gradient convention over torchvision's. ``exporting``: the graph keeps
    H and W symbolic, so coordinates are normalised with the true size (no power-of-two
    padding; values agree to float rounding).
    """
    stride, padding, dilation = geometry.stride, geometry.padding, geometry.dilation
    offset_groups, out_h, out_w = geometry.offset_groups, geometry.out_h, geometry.out_w
    batch, in_channels, height, width = input.shape
    out_channels, group_in_channels, kernel_h, kernel_w = weight.shape
    groups = geometry.groups
    kernel_points = kernel_h * kernel_w

    padded_h, padded_w = height, width
    if not exporting:
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


def _next_power_of_two(size: int) -> int:
    power = 1
    while power < size:
        power *= 2
    return power
