"""GPUs, exported graphs and autograd under TorchScript or torch.compile: bilinear sampling with
``torch.nn.functional.grid_sample``.

``grid_sample`` (zeros padding) is one fused, vectorised kernel per device with its own backward
and double backward; its zeros padding is exactly torchvision's rule that each corner outside
the image contributes zero. Each offset group is a batch entry of ``grid_sample`` and the kernel
points are stacked along the sampled height, so the result is the classic
``(C_in * K, positions)`` column matrix of im2col, contracted with the weight (and the bias) in
one batched GEMM.

On a GPU the kernels cost about what torchvision's kernel costs; eager time is the host's time
to launch them. So an eager call launches few: the undeformed sampling points are built once
per layer shape and kept (:func:`_kernel_points`), one ``addcmul`` turns offsets into grid
coordinates, the image is sampled transposed (which lets those coordinates keep the offsets'
(y, x) order instead of being swapped into grid_sample's (x, y)), and the bias rides in the
GEMM. grid_sample's CUDA kernel runs one thread per sampled point and loops over channels, so
channels are split across more threads where the points alone would leave the GPU idle
(:func:`_channel_splits`).

``grid_sample`` takes normalised coordinates. Where autograd records, the image is zero-padded
on the bottom and right to power-of-two sizes so that normalising and unnormalising only
multiply by powers of two: integer sampling points survive the round trip exactly, and with
them torchvision's one-sided offset gradient at integer coordinates. At inference the values
agree to float rounding without it, and the padded copy of the image is skipped.
"""

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from deformcli.ops._checks import Geometry
from deformcli.ops._chunking import chunk_rows

# Sampling points are kept for layer shapes whose points take at most this many bytes (the
# points of a 3x3 layer with a 160x160 output in float32). Bigger layers spend far longer
# computing than building their points, so they build them per call and nothing large stays
# allocated on the device.
_MAX_CACHED_POINTS_BYTES = 2 * 2**20

# Channel splitting for grid_sample's GPU kernel (see _channel_splits).
_TARGET_SAMPLING_THREADS = 2**18
_MIN_CHANNELS_PER_THREAD = 8


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
    needs_grad: bool,
    exporting: bool,
) -> Tensor:
    """:func:`deformcli.deform_conv2d` on checked arguments, any device.

    Shapes are those of :func:`deformcli.deform_conv2d`; ``geometry`` is the call's checked
    stride, padding, dilation, groups and output size. Sampling runs in ``sample_dtype`` and
    the GEMM in ``gemm_dtype``; the result has the input's dtype. ``offset_grad_inside_only``
    picks mmcv's offset-gradient convention over torchvision's. ``needs_grad``: autograd records
    this call. ``exporting``: the graph keeps H and W symbolic.
    """
    offset_groups, out_h, out_w = geometry.offset_groups, geometry.out_h, geometry.out_w
    symbolic = exporting or torch.jit.is_scripting() or torch.compiler.is_compiling()
    batch, _, height, width = input.shape
    kernel_h, kernel_w = weight.shape[2], weight.shape[3]
    kernel_points = kernel_h * kernel_w

    padded_h, padded_w = height, width
    if needs_grad and not exporting:
        # Exact integer sampling points (see the module docstring). Exported graphs keep H, W
        # symbolic, so they normalise with the true size: values agree to float rounding.
        padded_h, padded_w = _next_power_of_two(height), _next_power_of_two(width)

    # (N * offset_groups, K, H_out, W_out, 2) normalised (y, x) points of the transposed image.
    grid = _sampling_grid(
        _cast(offset, sample_dtype).reshape(batch * offset_groups, kernel_points, 2, out_h, out_w),
        geometry,
        (kernel_h, kernel_w),
        (padded_h, padded_w),
        symbolic=symbolic,
    )
    if offset_grad_inside_only and torch.is_grad_enabled() and offset.requires_grad:
        grid = _stop_offset_grad_outside(grid, height, width, padded_h, padded_w)

    image = _sampled_image(
        input,
        offset_groups,
        kernel_points * out_h * out_w,
        (padded_h, padded_w),
        sample_dtype,
        split_channels=not symbolic,
    )
    modulation: Tensor | None = None
    if mask is not None:
        modulation = mask.reshape(batch, offset_groups, 1, kernel_points, out_h, out_w)
    out = _convolve_columns(image, grid, modulation, weight, bias, geometry, gemm_dtype)
    return _cast(out, input.dtype)


def _convolve_columns(
    image: Tensor,
    grid: Tensor,
    modulation: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    geometry: Geometry,
    dtype: torch.dtype,
) -> Tensor:
    """``(N, C_out, H_out, W_out)`` in ``dtype``: the sampled columns times the weight plus the
    bias, in chunks of output rows under the column-memory cap (:mod:`._chunking`).

    ``image``, ``grid`` and ``modulation`` are as :func:`_sample_columns` takes them.
    """
    out_h, out_w, groups = geometry.out_h, geometry.out_w, geometry.groups
    batch = grid.shape[0] // geometry.offset_groups
    out_channels, group_in_channels, kernel_h, kernel_w = weight.shape
    weight_matrix = _cast(weight, dtype).reshape(
        groups, out_channels // groups, group_in_channels * kernel_h * kernel_w
    )
    bias_column: Tensor | None = None
    if bias is not None:
        bias_column = _cast(bias, dtype).view(groups, out_channels // groups, 1)
    rows_per_chunk = chunk_rows(
        out_h,
        out_w,
        batch * groups * weight_matrix.shape[2] * out_w * weight_matrix.element_size(),
        torch.is_grad_enabled() and image.requires_grad,
        image.device.type,
    )
    if rows_per_chunk >= out_h:
        columns = _sample_columns(image, grid, modulation, 0, out_h, batch, groups, dtype)
        out = _contract(weight_matrix, columns, bias_column)
    else:
        out = weight_matrix.new_empty(batch, groups, out_channels // groups, out_h * out_w)
        for row_start in range(0, out_h, rows_per_chunk):
            row_stop = min(row_start + rows_per_chunk, out_h)
            columns = _sample_columns(
                image, grid, modulation, row_start, row_stop, batch, groups, dtype
            )
            out[..., row_start * out_w : row_stop * out_w] = _contract(
                weight_matrix, columns, bias_column
            )
    return out.view(batch, out_channels, out_h, out_w)


def _sampling_grid(
    offset: Tensor,
    geometry: Geometry,
    kernel_size: tuple[int, int],
    image_size: tuple[int, int],
    symbolic: bool,
) -> Tensor:
    """Normalised sampling points ``u = (p + offset + 0.5) * 2 / size - 1``, (y, x) last.

    ``offset``: ``(N * offset_groups, K, 2, H_out, W_out)`` (y, x) pixel displacements;
    ``image_size``: the (possibly padded) image size that normalises. Returns
    ``(N * offset_groups, K, H_out, W_out, 2)``. Points beyond about -2 or the size plus 1,
    infinite or NaN ones included, are clamped there: they sample nothing and pass no gradient,
    as in torchvision, and grid_sample's coordinates stay finite. (|u| = 4 is at least two
    pixels outside for any size.)

    Each point is one rounding of the exact value, since the scales are powers of two where
    that matters (see the module docstring). ``symbolic``: traced, scripted or compiled graphs
    build the points in the graph instead of keeping them.
    """
    scale_y = 2.0 / image_size[0]
    scale_x = 2.0 / image_size[1]
    if symbolic:
        base_y, base_x = _normalised_kernel_grid(
            geometry, kernel_size, scale_y, scale_x, offset.dtype, offset.device
        )
        kernel_h, kernel_w = kernel_size
        grid = torch.stack(
            [
                torch.add(
                    base_y, offset[:, :, 0].unflatten(1, (kernel_h, kernel_w)), alpha=scale_y
                ),
                torch.add(
                    base_x, offset[:, :, 1].unflatten(1, (kernel_h, kernel_w)), alpha=scale_x
                ),
            ],
            dim=-1,
        ).flatten(1, 2)
    else:
        points, scale = _kernel_points(
            geometry, kernel_size, scale_y, scale_x, offset.dtype, offset.device
        )
        grid = torch.addcmul(points, offset.permute(0, 1, 3, 4, 2), scale)
    return grid.nan_to_num(-4.0, 4.0, -4.0).clamp(-4.0, 4.0)


def _sampled_image(
    input: Tensor,
    offset_groups: int,
    points_per_image: int,
    padded_size: tuple[int, int],
    dtype: torch.dtype,
    split_channels: bool,
) -> Tensor:
    """The image as grid_sample reads it: ``(N * offset_groups * splits, C_in / (offset_groups
    * splits), padded_w, padded_h)`` in ``dtype``.

    Zero-padded on the bottom and right to ``padded_size`` (where that differs), each offset
    group's channels split ``splits`` ways where ``split_channels`` (:func:`_channel_splits`;
    graphs with symbolic shapes do not), and transposed, so grid_sample's first coordinate
    (its "x") indexes rows. Without padding it is a view: the pixels are read where they lie.
    """
    batch, in_channels, height, width = input.shape
    padded_h, padded_w = padded_size
    splits = 1
    if split_channels:
        splits = _channel_splits(
            in_channels // offset_groups,
            batch * offset_groups * points_per_image,
            input.device.type,
        )
    image = _cast(input, dtype)
    if padded_h != height or padded_w != width:
        image = F.pad(image, (0, padded_w - width, 0, padded_h - height))
    image = image.reshape(
        batch * offset_groups * splits, in_channels // (offset_groups * splits), padded_h, padded_w
    )
    return image.transpose(2, 3)


def _stop_offset_grad_outside(
    grid: Tensor, height: int, width: int, padded_h: int, padded_w: int
) -> Tensor:
    """mmcv's offset-gradient convention: points not strictly inside ``(-1, H) x (-1, W)``
    pass no gradient to their offsets. ``grid``: ``(..., 2)`` normalised (y, x) points of an
    image padded to ``(padded_h, padded_w)``."""
    scale_y = 2.0 / padded_h
    scale_x = 2.0 / padded_w
    y = grid[..., 0]
    x = grid[..., 1]
    inside = (
        (y > -0.5 * scale_y - 1)
        & (y < (height + 0.5) * scale_y - 1)
        & (x > -0.5 * scale_x - 1)
        & (x < (width + 0.5) * scale_x - 1)
    )
    return torch.where(inside.unsqueeze(-1), grid, grid.detach())


def _sample_columns(
    image: Tensor,
    grid: Tensor,
    modulation: Tensor | None,
    row_start: int,
    row_stop: int,
    batch: int,
    groups: int,
    dtype: torch.dtype,
) -> Tensor:
    """Modulated im2col columns of output rows ``row_start:row_stop``.

    Args:
        image: ``(N * offset_groups * splits, C_in / (offset_groups * splits), W', H')``, the
            transposed image with each offset group's channels split ``splits`` ways.
        grid: ``(N * offset_groups, K, H_out, W_out, 2)`` normalised (y, x) sampling points.
        modulation: ``(N, offset_groups, 1, K, H_out, W_out)`` or None.
        batch, groups: ``N`` and the conv groups.

    Returns:
        ``(N, groups, C_in / groups * K, rows * W_out)`` columns in ``dtype``.
    """
    batch_offset_groups, kernel_points, _, out_w, _ = grid.shape
    splits = image.shape[0] // batch_offset_groups
    rows = row_stop - row_start
    if rows < grid.shape[2]:
        grid = grid[:, :, row_start:row_stop]
    chunk_grid = grid.reshape(batch_offset_groups, kernel_points * rows, out_w, 2)
    if splits > 1:
        # Every split of an offset group's channels samples the same points. (A view where
        # N * offset_groups is 1, else one small copy of the points.)
        chunk_grid = chunk_grid.unsqueeze(1).expand(-1, splits, -1, -1, -1)
        chunk_grid = chunk_grid.reshape(
            batch_offset_groups * splits, kernel_points * rows, out_w, 2
        )
    # (N * offset_groups * splits, C_in / (offset_groups * splits), K * rows, W_out)
    columns = F.grid_sample(
        image, chunk_grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    columns = _cast(columns, dtype)
    offset_groups = batch_offset_groups // batch
    group_channels = image.shape[1] * splits
    if modulation is not None:
        columns = columns.view(batch, offset_groups, group_channels, kernel_points, rows, out_w)
        chunk_mask = modulation
        if rows < modulation.shape[-2]:
            chunk_mask = modulation[..., row_start:row_stop, :]
        if torch.is_grad_enabled() and (columns.requires_grad or chunk_mask.requires_grad):
            columns = columns * chunk_mask
        else:
            # Saves allocating a second column buffer at inference.
            columns = columns.mul_(chunk_mask)
    in_channels = offset_groups * group_channels
    return columns.view(batch, groups, in_channels // groups * kernel_points, rows * out_w)


@torch.jit.unused  # eager only (graphs sample unsplit)
def _channel_splits(group_channels: int, points: int, device_type: str) -> int:
    """How many ways to split each offset group's channels across grid_sample's threads.

    grid_sample's GPU kernel runs one thread per sampled point, looping over channels: a
    (1, 512, 20, 20) layer's 3600 points leave most of a GPU idle for 512 iterations. Split
    (by powers of two that divide the channels) until the threads reach
    ``_TARGET_SAMPLING_THREADS`` or a thread is left ``_MIN_CHANNELS_PER_THREAD``. CPU kernels
    vectorise over points already.
    """
    splits = 1
    if device_type == "cpu":
        return splits
    while (
        points * splits < _TARGET_SAMPLING_THREADS
        and group_channels % (2 * splits) == 0
        and group_channels // (2 * splits) >= _MIN_CHANNELS_PER_THREAD
    ):
        splits *= 2
    return splits


def _contract(weight_matrix: Tensor, columns: Tensor, bias_column: Tensor | None) -> Tensor:
    """``weight_matrix @ columns + bias_column`` per conv group, in one GEMM launch.

    Args:
        weight_matrix: ``(groups, C_out / groups, D)``.
        columns: ``(N, groups, D, P)``.
        bias_column: ``(groups, C_out / groups, 1)`` or None.

    Returns:
        ``(N, groups, C_out / groups, P)``.
    """
    if bias_column is None:
        return torch.matmul(weight_matrix, columns)
    batch, groups, depth, positions = columns.shape
    if batch * groups == 1:  # the common inference call: one plain GEMM, fewer dispatches
        out = torch.addmm(bias_column[0], weight_matrix[0], columns[0, 0])
        return out.view(1, 1, -1, positions)
    group_out_channels = weight_matrix.shape[1]
    # Views, not copies, where batch or groups is 1 (the expanded dim merges with a size-1 one).
    out = torch.baddbmm(
        bias_column.expand(batch, groups, group_out_channels, 1).reshape(
            batch * groups, group_out_channels, 1
        ),
        weight_matrix.expand(batch, groups, group_out_channels, depth).reshape(
            batch * groups, group_out_channels, depth
        ),
        columns.reshape(batch * groups, depth, positions),
    )
    return out.view(batch, groups, group_out_channels, positions)


@torch.jit.unused
def _kernel_points(
    geometry: Geometry,
    kernel_size: tuple[int, int],
    scale_y: float,
    scale_x: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Undeformed normalised points ``(K, H_out, W_out, 2)`` (y, x) and the ``(2,)`` (y, x)
    scales from pixels to normalised units; kept per layer shape where small enough."""
    kernel_points = kernel_size[0] * kernel_size[1]
    points_bytes = kernel_points * geometry.out_h * geometry.out_w * 2 * dtype.itemsize
    if points_bytes <= _MAX_CACHED_POINTS_BYTES:
        return _cached_kernel_points(geometry, kernel_size, scale_y, scale_x, dtype, device)
    return _build_kernel_points(geometry, kernel_size, scale_y, scale_x, dtype, device)


def _build_kernel_points(
    geometry: Geometry,
    kernel_size: tuple[int, int],
    scale_y: float,
    scale_x: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    # Ordinary tensors outside any graph, whatever mode the first call ran in: an inference
    # tensor kept here could not be saved for a later call's backward.
    with torch.inference_mode(False), torch.no_grad():
        base_y, base_x = _normalised_kernel_grid(
            geometry, kernel_size, scale_y, scale_x, dtype, device
        )
        shape = (kernel_size[0], kernel_size[1], geometry.out_h, geometry.out_w)
        points = torch.stack([base_y.expand(shape), base_x.expand(shape)], dim=-1).flatten(0, 1)
        # Filled by kernels, not copied from the host: safe while a CUDA graph is captured.
        scale = points.new_full((2,), scale_x)
        scale[:1].fill_(scale_y)
    return points, scale


_cached_kernel_points = functools.lru_cache(maxsize=16)(_build_kernel_points)


def _normalised_kernel_grid(
    geometry: Geometry,
    kernel_size: tuple[int, int],
    scale_y: float,
    scale_x: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Undeformed sampling points ``u = (p + 0.5) * scale - 1``: y ``(kH, 1, H_out, 1)`` and x
    ``(1, kW, 1, W_out)``, broadcasting against ``(kH, kW, H_out, W_out)``."""
    (stride_h, stride_w), (padding_h, padding_w) = geometry.stride, geometry.padding
    kernel_h, kernel_w = kernel_size
    out_h, out_w = geometry.out_h, geometry.out_w
    rows = torch.arange(-padding_h, out_h * stride_h - padding_h, stride_h, device=device)
    cols = torch.arange(-padding_w, out_w * stride_w - padding_w, stride_w, device=device)
    kernel_rows = torch.arange(
        0, kernel_h * geometry.dilation[0], geometry.dilation[0], device=device
    )
    kernel_cols = torch.arange(
        0, kernel_w * geometry.dilation[1], geometry.dilation[1], device=device
    )
    pixel_y = (kernel_rows.view(kernel_h, 1, 1, 1) + rows.view(1, 1, out_h, 1)).to(dtype)
    pixel_x = (kernel_cols.view(1, kernel_w, 1, 1) + cols.view(1, 1, 1, out_w)).to(dtype)
    return pixel_y * scale_y + (0.5 * scale_y - 1), pixel_x * scale_x + (0.5 * scale_x - 1)


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)`` without a dispatch where it already has it (eager time is launches
    and dispatches)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _next_power_of_two(size: int) -> int:
    power = 1
    while power < size:
        power *= 2
    return power
