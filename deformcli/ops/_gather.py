"""CPU kernel: bilinear sampling as a weighted gather of channels-last pixels.

With the image laid out channels-last, the four corners of one sampling point are four
contiguous rows of channels, and bilinear interpolation times the modulation mask is a
weighted sum of those rows: exactly ``F.embedding_bag(mode="sum", per_sample_weights=...)``,
a fused CPU kernel that streams whole rows instead of gathering one scalar per channel as
``grid_sample`` must on channels-first images (about 5x faster on DBNet's layers). A one-pixel
zero frame around the image holds the corners that fall just outside it, coordinates stay in
pixels (integer points are exact, with no normalisation round trip), and the sampled columns
come out as ``(positions, K * C_in)``, the layout a ``positions x C_out`` GEMM wants.

Gradients use embedding_bag's fused backward; when the backward is itself differentiated
(double backward, which embedding_bag lacks) they switch to plain differentiable formulas.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from deformcli.ops._checks import Geometry
from deformcli.ops._chunking import band_rows, block_rows, chunk_rows


class _SamplingIndex(NamedTuple):
    """Where each output row's sampling points read the gather table (built once per call).

    ``image_base``: ``(N * H_out,)`` first table row of each output row's image; ``row_y``:
    ``(N * H_out,)`` top sampling row; ``col_x``: ``(W_out,)`` left sampling column;
    ``kernel_y``, ``kernel_x``: ``(K,)`` kernel point displacements; ``corner_step``: ``(4,)``
    table rows of the four corners relative to the top-left one; ``group_index``:
    ``(offset_groups,)`` 0, 1, ...; ``height``, ``width``: the image's size;
    ``sample_minus_one``: sample points at exactly -1 too (they have zero value either way).
    """

    image_base: Tensor
    row_y: Tensor
    col_x: Tensor
    kernel_y: Tensor
    kernel_x: Tensor
    corner_step: Tensor
    group_index: Tensor
    height: int
    width: int
    sample_minus_one: bool


def gather_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    geometry: Geometry,
    sample_dtype: torch.dtype,
    gemm_dtype: torch.dtype,
    needs_grad: bool,
    offset_grad_inside_only: bool,
) -> Tensor:
    """:func:`deformcli.deform_conv2d` on checked CPU arguments (TorchScript: without autograd).

    Shapes are those of :func:`deformcli.deform_conv2d`; ``geometry`` is the call's checked
    stride, padding, dilation, groups and output size. Coordinates and weights are computed in
    ``sample_dtype``; the image is gathered and the GEMM runs in ``gemm_dtype``. The result is
    contiguous ``(N, C_out, H_out, W_out)`` in the input's dtype. ``needs_grad``: whether the
    call records an autograd graph. ``offset_grad_inside_only`` picks mmcv's offset-gradient
    convention over torchvision's (see ``deformcli.ops.deform_conv._deform_conv2d``).
    """
    batch, out_channels = input.shape[0], weight.shape[0]
    kernel_h, kernel_w = weight.shape[2], weight.shape[3]
    kernel_points = kernel_h * kernel_w

    # The table is in the GEMM's dtype: bfloat16 images are gathered as bfloat16, half the
    # bytes of float32 (2x faster), while their coordinates and weights stay in float32.
    table = _gather_table(input, geometry.offset_groups, gemm_dtype)
    # torchvision gives no value to a point at or beyond -1 or H (W). Without autograd such a
    # point reads nothing at all. With it, torchvision's convention still differentiates a
    # point at exactly -1 one-sidedly (seeing row or column 0), so that point is sampled,
    # with weight zero on row 0; mmcv's convention gives it no gradient.
    sampling = _sampling_index(
        input,
        geometry,
        (kernel_h, kernel_w),
        table,
        sample_dtype,
        needs_grad and not offset_grad_inside_only,
    )
    # One output row per slice: offsets (N * H_out, W_out, K, offset_groups, 2), mask
    # (N * H_out, W_out, K, offset_groups).
    offset = _by_output_row(offset.to(sample_dtype), geometry, kernel_points, 2)
    modulation: Tensor | None = None
    if mask is not None:
        modulation = _by_output_row(mask.to(sample_dtype), geometry, kernel_points, 1)[..., 0]
    out = _convolve_rows(
        table,
        offset,
        modulation,
        sampling,
        _weight_matrix(weight, geometry.groups, gemm_dtype),
        geometry,
        needs_grad,
        needs_grad and input.requires_grad,
    )
    if bias is not None:
        out.add_(bias.to(gemm_dtype).view(1, out_channels, 1))  # in place: no second buffer
    out = out.reshape(batch, out_channels, geometry.out_h, geometry.out_w)
    return out.to(input.dtype).contiguous()


def _weight_matrix(weight: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """The weight ``(C_out, C_in / groups, kH, kW)`` as ``(groups, C_out / groups, K * C_in /
    groups)`` in ``dtype``, matching the columns' (k, c) order."""
    out_channels, group_in_channels, kernel_h, kernel_w = weight.shape
    kernel_points = kernel_h * kernel_w
    return (
        weight.to(dtype)
        .reshape(groups, out_channels // groups, group_in_channels, kernel_points)
        .transpose(2, 3)
        .reshape(groups, out_channels // groups, kernel_points * group_in_channels)
    )


def _convolve_rows(
    table: Tensor,
    offset: Tensor,
    modulation: Tensor | None,
    sampling: _SamplingIndex,
    weight_matrix: Tensor,
    geometry: Geometry,
    needs_grad: bool,
    input_needs_grad: bool,
) -> Tensor:
    """``(N, C_out, H_out * W_out)`` in the weight matrix's dtype, without the bias: the
    sampled columns times the weight, in chunks of output rows under the column-memory cap.

    ``table`` is :func:`_gather_table`'s, ``offset``, ``modulation`` and ``sampling`` as
    :func:`_sampling_points` takes them, ``weight_matrix`` as :func:`_weight_matrix` makes it.
    """
    out_h, out_w = geometry.out_h, geometry.out_w
    total_rows, _, kernel_points, _, _ = offset.shape
    batch = total_rows // out_h
    groups, group_out_channels, depth = weight_matrix.shape
    row_bytes = out_w * groups * depth * table.element_size()
    chunk = max(chunk_rows(total_rows, out_w, row_bytes, input_needs_grad, table.device.type), 1)
    # Without autograd, each chunk's (positions, C_out) product is written transposed into the
    # (N, C_out, H_out * W_out) output while it is still in cache, so no second output-sized
    # buffer exists; with autograd, chunks are concatenated and transposed at the end.
    out = weight_matrix.new_empty(
        batch if not needs_grad else 0, groups * group_out_channels, out_h * out_w
    )
    out_chunks: list[Tensor] = []
    points_per_row = out_w * kernel_points * sampling.group_index.shape[0]
    rows_per_block = block_rows(points_per_row, chunk)
    # At least one chunk, empty for an empty batch, so the output is connected to autograd.
    for block_start in range(0, max(total_rows, 1), rows_per_block):
        block_stop = min(block_start + rows_per_block, total_rows)
        index, weights = _sampling_points(offset, modulation, sampling, block_start, block_stop)
        for start in range(block_start, max(block_stop, block_start + 1), chunk):
            stop = min(start + chunk, block_stop)
            first = (start - block_start) * points_per_row
            last = (stop - block_start) * points_per_row
            chunk_index, chunk_weights = index[first:last], weights[first:last]
            # No name holds a chunk's product or columns into the next chunk (_chunk_product).
            if needs_grad:
                out_chunks.append(
                    _chunk_product(table, chunk_index, chunk_weights, weight_matrix, kernel_points)
                )
            else:
                _write_transposed(
                    _chunk_product(table, chunk_index, chunk_weights, weight_matrix, kernel_points),
                    out,
                    start,
                    stop,
                    out_h,
                    out_w,
                )
    if needs_grad:
        out = torch.cat(out_chunks).view(batch, out_h * out_w, groups * group_out_channels)
        out = out.transpose(1, 2)
    return out


def _chunk_product(
    table: Tensor, index: Tensor, weights: Tensor, weight_matrix: Tensor, kernel_points: int
) -> Tensor:
    """``(positions, C_out)``: one chunk's sampled columns (from its corner rows and weights,
    as :func:`_sampling_points` returns them) times the weight matrix.

    The columns, the largest temporary, are freed on return, before the next chunk's are
    allocated, so each chunk reuses the same memory. (With two chunks' temporaries alive at
    once, glibc's allocator returns the heap's top to the system between chunks and calls and
    takes it back in thousands of page faults: 15-20% of a layer's time.)
    """
    groups, _, depth = weight_matrix.shape
    columns = _weighted_row_sums(table, index, weights.to(table.dtype))
    return _grouped_product(columns.view(-1, groups * depth), weight_matrix, kernel_points)


def _gather_table(input: Tensor, offset_groups: int, dtype: torch.dtype) -> Tensor:
    """The image as gather rows: ``(N * (H + 2) * (W + 2) * offset_groups, C_in /
    offset_groups)`` in ``dtype``.

    One row per (n, y, x, offset group) of the image framed by a one-pixel zero border: that
    group's channels of one pixel. Every corner of a point strictly inside (-1, H) x (-1, W)
    then lies in the table, and corners outside the image read zeros. Row 0, a frame pixel,
    stands in for all four corners of points outside.
    """
    batch, in_channels, height, width = input.shape
    table = torch.empty(batch, height + 2, width + 2, in_channels, dtype=dtype, device=input.device)
    table[:, 0].zero_()
    table[:, -1].zero_()
    # Band by band, each padded left and right before it is made channels-last: reading
    # channels whose stride is a power of two (a 128 x 128 image) directly is 2-3x slower, the
    # rows colliding in cache; a padded band has an odd stride and stays in cache.
    rows = band_rows(height, (width + 2) * in_channels * batch * table.element_size())
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        band = F.pad(input[:, :, top:bottom].to(dtype), (1, 1))
        table[:, 1 + top : 1 + bottom].copy_(band.permute(0, 2, 3, 1))
    return table.view(-1, in_channels // offset_groups)


def _sampling_index(
    input: Tensor,
    geometry: Geometry,
    kernel_size: tuple[int, int],
    table: Tensor,
    dtype: torch.dtype,
    sample_minus_one: bool,
) -> _SamplingIndex:
    """The call's :class:`_SamplingIndex` for ``input`` laid out as :func:`_gather_table`, its
    coordinates in ``dtype`` (the sampling dtype, which the table's may not be: a bfloat16
    table's integers are exact only up to 256)."""
    (stride_h, stride_w), (padding_h, padding_w) = geometry.stride, geometry.padding
    dilation_h, dilation_w = geometry.dilation
    offset_groups, out_h, out_w = geometry.offset_groups, geometry.out_h, geometry.out_w
    batch, _, height, width = input.shape
    kernel_h, kernel_w = kernel_size
    device = input.device
    index_dtype = _index_dtype(table.shape[0])
    framed_w = width + 2

    flat_rows = torch.arange(batch * out_h, device=device)
    kernel_index = torch.arange(kernel_h * kernel_w, device=device)
    return _SamplingIndex(
        image_base=(flat_rows // out_h * ((height + 2) * framed_w * offset_groups)).to(index_dtype),
        row_y=(flat_rows % out_h * stride_h - padding_h).to(dtype),
        col_x=(torch.arange(out_w, device=device) * stride_w - padding_w).to(dtype),
        kernel_y=(kernel_index // kernel_w * dilation_h).to(dtype),
        kernel_x=(kernel_index % kernel_w * dilation_w).to(dtype),
        corner_step=torch.tensor([0, 1, framed_w, framed_w + 1], dtype=index_dtype, device=device)
        * offset_groups,
        group_index=torch.arange(offset_groups, dtype=index_dtype, device=device),
        height=height,
        width=width,
        sample_minus_one=sample_minus_one,
    )


def _by_output_row(
    values: Tensor, geometry: Geometry, kernel_points: int, components: int
) -> Tensor:
    """Offsets or mask ``(N, offset_groups * K * components, H_out, W_out)`` as contiguous
    ``(N * H_out, W_out, K, offset_groups, components)``: what one output row samples."""
    batch = values.shape[0]
    offset_groups, out_h, out_w = geometry.offset_groups, geometry.out_h, geometry.out_w
    return (
        values.reshape(batch, offset_groups, kernel_points, components, out_h, out_w)
        .permute(0, 4, 5, 2, 1, 3)
        .contiguous()
        .view(batch * out_h, out_w, kernel_points, offset_groups, components)
    )


def _grouped_product(columns: Tensor, weight_matrix: Tensor, kernel_points: int) -> Tensor:
    """``(positions, C_out)`` products of columns ``(positions, K * C_in)`` with the weight
    ``(groups, C_out / groups, K * C_in / groups)``, group by group."""
    groups, group_out_channels, depth = weight_matrix.shape
    if groups == 1:
        return torch.mm(columns, weight_matrix[0].t())
    # (positions, K * C_in) -> (groups, positions, K * C_in / groups)
    group_in_channels = depth // kernel_points
    columns = columns.view(-1, kernel_points, groups, group_in_channels).permute(2, 0, 1, 3)
    columns = columns.reshape(groups, -1, depth)
    grouped = torch.bmm(columns, weight_matrix.transpose(1, 2))
    return grouped.transpose(0, 1).reshape(-1, groups * group_out_channels)


def _write_transposed(
    product: Tensor, out: Tensor, start: int, stop: int, out_h: int, out_w: int
) -> None:
    """Copy ``product`` ``(positions, C_out)`` of the flattened output rows ``start:stop`` (of
    all N * H_out) into ``out`` ``(N, C_out, H_out * W_out)``, one image at a time."""
    row = start
    while row < stop:
        image = row // out_h
        piece_stop = min(stop, (image + 1) * out_h)
        first = (row - image * out_h) * out_w
        last = (piece_stop - image * out_h) * out_w
        out[image, :, first:last].copy_(
            product[(row - start) * out_w : (piece_stop - start) * out_w].t()
        )
        row = piece_stop


def _index_dtype(table_rows: int) -> torch.dtype:
    """int32 (less index memory and traffic) when every table row has an int32 index."""
    return torch.int32 if table_rows <= 2**31 - 1 else torch.int64


def _sampling_points(
    offset: Tensor,
    modulation: Tensor | None,
    sampling: _SamplingIndex,
    start: int,
    stop: int,
) -> tuple[Tensor, Tensor]:
    """Table rows and weights of the four corners of every sampling point of the output rows
    ``start:stop`` (of all N * H_out).

    Args:
        offset: ``(N * H_out, W_out, K, offset_groups, 2)`` (y, x) displacements of all rows.
        modulation: ``(N * H_out, W_out, K, offset_groups)`` or None.
        sampling: where the rows read the table (:func:`_gather_table`).

    Returns:
        ``(R * W_out * K * offset_groups, 4)`` table rows and bilinear weights (times the
        modulation) of the corners of the ``R = stop - start`` rows' points, in the order
        (top left, top right, bottom left, bottom right); points outside read row 0 (a zero)
        with weight zero.
    """
    offset = offset[start:stop]
    rows, out_w, kernel_points, _, _ = offset.shape
    # Integer base first, then the offset: one rounding, as in torchvision's kernel. (The
    # offset leads so the result takes its (R, W_out, K, offset_groups) memory order.)
    row_y = sampling.row_y[start:stop].view(rows, 1, 1, 1)
    col_x = sampling.col_x.view(1, out_w, 1, 1)
    y = offset[..., 0] + (row_y + sampling.kernel_y.view(1, 1, kernel_points, 1))
    x = offset[..., 1] + (col_x + sampling.kernel_x.view(1, 1, kernel_points, 1))
    height, width = sampling.height, sampling.width
    # Points outside (NaN ones too) read the table's row 0, a zero, with zero weights; their
    # coordinates are replaced by 0 first so no non-finite value reaches the weights, the
    # integer conversion or the gradient.
    if sampling.sample_minus_one:
        inside = (y >= -1) & (y < height) & (x >= -1) & (x < width)
    else:
        inside = (y > -1) & (y < height) & (x > -1) & (x < width)
    y = torch.where(inside, y, 0)
    x = torch.where(inside, x, 0)
    top = y.floor()
    left = x.floor()
    image_base = sampling.image_base[start:stop].view(rows, 1, 1, 1)
    index = _corner_rows(top, left, inside, image_base, sampling)
    if modulation is None:
        scale = inside.to(y.dtype)
    else:
        scale = torch.where(inside, modulation[start:stop], 0)
    return index.view(-1, 4), _corner_weights(y - top, x - left, scale).view(-1, 4)


# The two halves of _sampling_points are functions of their own so that their temporaries
# (a few dozen bytes a point) are freed as each returns.


def _corner_rows(
    top: Tensor, left: Tensor, inside: Tensor, image_base: Tensor, sampling: _SamplingIndex
) -> Tensor:
    """``(..., 4)`` table rows of the four corners of points with integer ``top``, ``left``
    (in image pixels); row 0 (a zero) for points not ``inside``."""
    offset_groups = sampling.group_index.shape[0]
    # Top-left corner's table row (the frame shifts pixels by one), then all four corners.
    # Integers need no gradient: in-place steps keep one temporary alive instead of several.
    framed_w = sampling.width + 2
    top_left = top.to(image_base.dtype).add_(1).mul_(framed_w).add_(left.to(image_base.dtype))
    top_left = top_left.add_(1).mul_(offset_groups).add_(image_base).add_(sampling.group_index)
    corners = top_left.unsqueeze(-1) + sampling.corner_step
    return corners.masked_fill_(inside.logical_not().unsqueeze(-1), 0)


def _corner_weights(below: Tensor, right: Tensor, scale: Tensor) -> Tensor:
    """``(..., 4)`` bilinear weights of the four corners times ``scale``, from the fractional
    parts of a point's coordinates: ``below`` (of y) and ``right`` (of x)."""
    # The scale is folded into the row weights first: one product fewer over all four
    # corners. (A broadcast (2,) x (2,) outer product is 5x slower: inner loops of two.)
    above = (1 - below) * scale
    below = below * scale
    leftwards = 1 - right
    return torch.stack([above * leftwards, above * right, below * leftwards, below * right], -1)


def _weighted_row_sums(table: Tensor, index: Tensor, weights: Tensor) -> Tensor:
    """``out[b] = sum_j weights[b, j] * table[index[b, j]]``: ``(B, C)`` from ``(T, C)`` and
    ``(B, 4)`` index and weights."""
    # TorchScript compiles no autograd.Function; it skips a block under exactly this test.
    if not torch.jit.is_scripting():  # noqa: SIM102
        if torch.is_grad_enabled() and (table.requires_grad or weights.requires_grad):
            return _WeightedRowSums.apply(table, index, weights)
    return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")


class _WeightedRowSums(torch.autograd.Function):
    """:func:`_weighted_row_sums` with a backward that can itself be differentiated."""

    @staticmethod
    def forward(table: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        table, index, weights = ctx.saved_tensors
        needs_table, _, needs_weights = ctx.needs_input_grad
        grad_table: Tensor | None = None
        grad_weights: Tensor | None = None
        if torch.is_grad_enabled():
            # create_graph=True: formulas autograd can differentiate again.
            if needs_table:
                spread = (grad.unsqueeze(1) * weights.unsqueeze(-1)).flatten(0, 1)
                grad_table = torch.zeros_like(table).index_add(0, index.flatten(), spread)
            if needs_weights:
                grad_weights = (table[index] * grad.unsqueeze(1)).sum(-1)
            return grad_table, None, grad_weights
        # First-order: embedding_bag's fused backward (about 3x faster than the formulas),
        # reached by differentiating a recomputed forward, which costs a tenth of it.
        with torch.enable_grad():
            table = table.detach().requires_grad_(needs_table)
            weights = weights.detach().requires_grad_(needs_weights)
            sums = F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")
        wanted = [tensor for tensor in (table, weights) if tensor.requires_grad]
        grads = list(torch.autograd.grad(sums, wanted, grad))
        if needs_table:
            grad_table = grads.pop(0)
        if needs_weights:
            grad_weights = grads.pop(0)
        return grad_table, None, grad_weights
