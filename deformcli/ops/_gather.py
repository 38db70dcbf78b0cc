"""CPU kernel: bilinear sampling as a weighted gather of channels-last pixels.

With the image laid out channels-last, the four corners of one sampling point are four
contiguous rows of channels, and bilinear interpolation times the modulation mask is a
weighted sum of those rows: exactly ``F.embedding_bag(mode="sum", per_sample_weights=...)``,
a fused CPU kernel that streams whole rows instead of gathering one scalar per channel as
``grid_sample`` must on channels-first images (about 5x faster on DBNet's layers). A one-pixel
zero frame around the image holds the corners that fall just outside it, coordinates stay in
pixels (integer points are exact, with no normalisation round trip), and the sampled columns
come out as ``(positions, K * C_in)``, the layout a ``positions x C_out`` GEMM wants. In float32
that GEMM is oneDNN's, as in dense conv2d (:func:`_matmul_transposed`).

With autograd (:class:`_GatherConvolution`), the image's gradient is the same weighted sum
the other way round, the corner weights' is embedding_bag's own kernel for it, and nothing
the size of the columns is kept for the backward. When the backward is itself differentiated
(double backward, which embedding_bag lacks), it switches to plain differentiable formulas.
"""

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from deformcli.ops._checks import Geometry
from deformcli.ops._chunking import band_rows, block_rows, chunk_rows

# oneDNN's GEMM is in torch's x86 builds; its linear op, registered with it, takes plain tensors.
_ONEDNN_LINEAR_BUILT = (
    torch.backends.mkldnn.is_available()
    and torch.backends.cpu.get_cpu_capability().startswith("AVX")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


class _SamplingIndex(NamedTuple):
    """Where each output row's sampling points read the gather table (the same for every call
    of a layer shape: :func:`_sampling_index`).

    ``image_base``: ``(N * H_out,)`` first table row of each output row's image; ``row_y``:
    ``(N * H_out,)`` top sampling row; ``col_x``: ``(W_out,)`` left sampling column;
    ``kernel_y``, ``kernel_x``: ``(K,)`` kernel point displacements; ``group_index``:
    ``(offset_groups,)`` 0, 1, ...; ``height``, ``width``: the image's size;
    ``sample_minus_one``: sample points at exactly -1 too (they have zero value either way).

    torchvision gives no value to a point at or beyond -1 or H (W). Without autograd such a
    point reads nothing at all. With it, torchvision's convention still differentiates a point
    at exactly -1 one-sidedly (seeing row or column 0), so that point is sampled, with weight
    zero on row 0; mmcv's convention gives it no gradient.
    """

    image_base: Tensor
    row_y: Tensor
    col_x: Tensor
    kernel_y: Tensor
    kernel_x: Tensor
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
    ``(N, C_out, H_out, W_out)`` in the input's dtype and layout (:func:`is_channels_last`).
    ``needs_grad``: whether the call records an autograd graph. ``offset_grad_inside_only``
    picks mmcv's offset-gradient convention over torchvision's (see
    ``deformcli.ops.deform_conv._deform_conv2d``).
    """
    batch, out_channels = input.shape[0], weight.shape[0]
    kernel_h, kernel_w = weight.shape[2], weight.shape[3]
    kernel_points = kernel_h * kernel_w

    sampling = _sampling_index(
        input,
        geometry,
        (kernel_h, kernel_w),
        sample_dtype,
        sample_minus_one=needs_grad and not offset_grad_inside_only,
    )
    # One output row per slice: offsets (N * H_out, W_out, K, offset_groups, 2), mask
    # (N * H_out, W_out, K, offset_groups).
    offset = _by_output_row(offset.to(sample_dtype), geometry, kernel_points, 2)
    modulation: Tensor | None = None
    if mask is not None:
        modulation = _by_output_row(mask.to(sample_dtype), geometry, kernel_points, 1)[..., 0]
    weight_matrix = _weight_matrix(weight, geometry.groups, gemm_dtype)
    channels_last = is_channels_last(input)
    if needs_grad:
        # All points' corners at once: autograd keeps their arithmetic's tensors anyway.
        index, point_weights = _sampling_points(offset, modulation, sampling, 0, offset.shape[0])
        out = _convolve_with_autograd(input, point_weights, weight_matrix, index, geometry)
    else:
        # The table is in the GEMM's dtype: bfloat16 images are gathered as bfloat16, half
        # the bytes of float32 (2x faster), while their coordinates and weights stay float32.
        table = _gather_table(input, geometry.offset_groups, gemm_dtype)
        out = _convolve_rows(
            table, offset, modulation, sampling, weight_matrix, geometry, channels_last
        )
    if bias is not None:
        out = _with_bias(out, bias, in_place=not needs_grad)
    # Already in the input's layout (:func:`_new_output`), which the dispatcher asks for.
    return out.reshape(batch, out_channels, geometry.out_h, geometry.out_w).to(input.dtype)


def _with_bias(out: Tensor, bias: Tensor, in_place: bool) -> Tensor:
    """``out`` ``(N, C_out, positions)`` plus ``bias`` ``(C_out,)``, in ``out``'s dtype."""
    # In place without autograd: no second output-sized buffer. (With it the output may be a
    # view the Function made, which autograd cannot modify in place.)
    bias_column = bias.to(out.dtype).view(1, -1, 1)
    return out.add_(bias_column) if in_place else out + bias_column


def is_channels_last(input: Tensor) -> bool:
    """Whether ``input`` ``(N, C, H, W)`` is laid out channels-last (and not also contiguous,
    as when C or H * W is 1): the op then returns a channels-last output, as torch's
    convolutions do, and the CPU kernel skips both of its layout changes."""
    return not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)


def _new_output(channels_last: bool, weight_matrix: Tensor, batch: int, positions: int) -> Tensor:
    """An uninitialised ``(N, C_out, positions)`` output in the weight matrix's dtype, laid out
    ``(N, positions, C_out)`` when ``channels_last``: each position's channels together, as a
    chunk's product has them, so writing the product is a plain copy."""
    groups, group_out_channels, _ = weight_matrix.shape
    out_channels = groups * group_out_channels
    if channels_last:
        return weight_matrix.new_empty(batch, positions, out_channels).transpose(1, 2)
    return weight_matrix.new_empty(batch, out_channels, positions)


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
    channels_last: bool,
) -> Tensor:
    """``(N, C_out, H_out * W_out)`` in the weight matrix's dtype, without the bias and without
    autograd: the sampled columns times the weight, in chunks of output rows under the
    column-memory cap.

    ``table`` is :func:`_gather_table`'s, ``offset``, ``modulation`` and ``sampling`` as
    :func:`_sampling_points` takes them, ``weight_matrix`` as :func:`_weight_matrix` makes it;
    ``channels_last``: the layout of the output (:func:`_new_output`).
    """
    out_h, out_w = geometry.out_h, geometry.out_w
    total_rows, _, kernel_points, offset_groups, _ = offset.shape
    chunk = _rows_per_chunk(geometry, weight_matrix, total_rows, table.element_size())
    out = _new_output(channels_last, weight_matrix, total_rows // out_h, out_h * out_w)
    rows_per_block = block_rows(out_w * kernel_points * offset_groups, chunk)
    for block_start in range(0, total_rows, rows_per_block):
        block_stop = min(block_start + rows_per_block, total_rows)
        index, weights = _sampling_points(offset, modulation, sampling, block_start, block_stop)
        _convolve_block(table, index, weights, weight_matrix, out, block_start, chunk, geometry)
    return out


def _convolve_block(
    table: Tensor,
    index: Tensor,
    weights: Tensor,
    weight_matrix: Tensor,
    out: Tensor,
    block_start: int,
    rows_per_chunk: int,
    geometry: Geometry,
) -> None:
    """Write the products of a block of output rows from ``block_start`` on (of all N *
    H_out), whose corner rows and weights ``index``, ``weights`` ``(P, 4)`` are, into ``out``
    (:func:`_new_output`), ``rows_per_chunk`` rows at a time."""
    out_w, offset_groups = geometry.out_w, geometry.offset_groups
    groups, _, depth = weight_matrix.shape
    kernel_points = depth * groups // (table.shape[1] * offset_groups)  # depth = K * C_in / groups
    points_per_row = out_w * kernel_points * offset_groups
    block_stop = block_start + index.shape[0] // max(points_per_row, 1)
    for start in range(block_start, block_stop, rows_per_chunk):
        first = (start - block_start) * points_per_row
        last = (min(start + rows_per_chunk, block_stop) - block_start) * points_per_row
        # Each chunk's (positions, C_out) product is written into the output while it is still
        # in cache, so no second output-sized buffer exists; no name holds a chunk's product
        # or columns into the next chunk (_chunk_product).
        _write_positions(
            _chunk_product(
                table, index[first:last], weights[first:last], weight_matrix, kernel_points
            ),
            out,
            start,
            geometry.out_h,
            out_w,
        )


@torch.jit.unused  # TorchScript compiles no autograd.Function; with autograd it never gets here
def _convolve_with_autograd(
    input: Tensor, point_weights: Tensor, weight_matrix: Tensor, index: Tensor, geometry: Geometry
) -> Tensor:
    """:class:`_GatherConvolution`."""
    return _GatherConvolution.apply(input, point_weights, weight_matrix, index, geometry)


class _GatherConvolution(torch.autograd.Function):
    """The sampled columns times the weight matrix with autograd: ``(N, C_out, H_out *
    W_out)``, without the bias, differentiable in the image, the corner weights and the
    weight matrix.

    The backward goes chunk by chunk, as the forward does. Nothing the size of the columns (K
    times the image) is kept for it: the weight matrix's gradient samples a chunk's columns
    again, one gather (a tenth of the chunk's GEMM). The image's gradient is the same weighted
    sum the other way round (:func:`_weighted_row_scatter`, 4x faster than differentiating
    embedding_bag), and each chunk's covers only the table rows the chunk reads, so no
    image-sized gradient is zeroed and summed per chunk.
    """

    @staticmethod
    def forward(
        input: Tensor,
        point_weights: Tensor,
        weight_matrix: Tensor,
        index: Tensor,
        geometry: Geometry,
    ) -> Tensor:
        """``input`` ``(N, C_in, H, W)``; ``index`` and ``point_weights`` ``(P, 4)``, as
        :func:`_sampling_points` returns them for all N * H_out output rows; ``weight_matrix``
        as :func:`_weight_matrix` makes it."""
        table = _gather_table(input, geometry.offset_groups, weight_matrix.dtype)
        rows = _ChunkRows.of(input, index, weight_matrix, geometry)
        out = _new_output(
            is_channels_last(input), weight_matrix, input.shape[0], geometry.out_h * geometry.out_w
        )
        # All output rows are one block: their corners were computed at once, with autograd.
        _convolve_block(
            table, index, point_weights, weight_matrix, out, 0, rows.rows_per_chunk, geometry
        )
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        # The table is made again in the backward: 1-2% of it, and no image-sized copy is
        # kept between the passes.
        input, point_weights, weight_matrix, index, geometry = inputs
        ctx.save_for_backward(input, point_weights, weight_matrix, index)
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            grads = _differentiable_grads(ctx, grad)
        else:
            grads = _chunked_grads(ctx, grad)
        return (*grads, None, None)


class _ChunkRows(NamedTuple):
    """How :class:`_GatherConvolution` walks the output rows (of all N * H_out) in chunks."""

    total_rows: int
    rows_per_chunk: int
    points_per_row: int
    kernel_points: int

    @staticmethod
    def of(input: Tensor, index: Tensor, weight_matrix: Tensor, geometry: Geometry) -> "_ChunkRows":
        total_rows = input.shape[0] * geometry.out_h
        points_per_row = index.shape[0] // max(total_rows, 1)
        return _ChunkRows(
            total_rows,
            _rows_per_chunk(geometry, weight_matrix, total_rows, weight_matrix.element_size()),
            points_per_row,
            points_per_row // (geometry.out_w * geometry.offset_groups),
        )

    def chunks(self) -> list[tuple[int, int, int]]:
        """``(first row, first point, last point)`` of each chunk."""
        return [
            (
                start,
                start * self.points_per_row,
                (start + self.rows_per_chunk) * self.points_per_row,
            )
            for start in range(0, self.total_rows, self.rows_per_chunk)
        ]


def _chunked_grads(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:class:`_GatherConvolution`'s gradients (image, corner weights, weight matrix), chunk
    by chunk; only the weight matrix's needs the chunk's columns, which are sampled again."""
    input, point_weights, weight_matrix, index = ctx.saved_tensors
    needs, geometry = ctx.needs_input_grad[:3], ctx.geometry
    table = _gather_table(input, geometry.offset_groups, weight_matrix.dtype)
    rows = _ChunkRows.of(input, index, weight_matrix, geometry)
    batch, in_channels, height, width = input.shape
    groups, _, depth = weight_matrix.shape
    # A band starting at the first pixel of a framed image row starts with a zero row.
    band_step = (width + 2) * geometry.offset_groups
    grad_table = torch.zeros_like(table) if needs[0] else None
    grad_weights = torch.empty_like(point_weights) if needs[1] else None
    grad_matrix = torch.zeros_like(weight_matrix) if needs[2] else None
    if grad_table is None and grad_weights is None and grad_matrix is None:
        return None, None, None
    for start, first, last in rows.chunks():
        band_start, band_stop = _table_band(index[first:last], band_step)
        band = table[band_start:band_stop]
        # Points outside read row 0 of the table; the band's row 0 is a zero too.
        corner_rows = (index[first:last] - band_start).clamp_(min=0)
        weights = point_weights[first:last].to(band.dtype)
        chunk_grad = _read_positions(
            grad, start, geometry.out_h, geometry.out_w, rows.rows_per_chunk
        )
        if grad_matrix is not None:
            # The chunk's columns again: keeping them all from the forward would cost K times
            # the image's memory.
            grad_matrix += _grouped_product_matrix_grad(
                _weighted_row_sums(band, corner_rows, weights).view(-1, groups * depth),
                chunk_grad,
                groups,
                rows.kernel_points,
            )
        if grad_table is None and grad_weights is None:
            continue
        grad_columns = _grouped_product_columns_grad(weight_matrix, chunk_grad, rows.kernel_points)
        grad_columns = grad_columns.view(corner_rows.shape[0], -1)
        if grad_table is not None:
            grad_table[band_start:band_stop] += _weighted_row_scatter(
                corner_rows, weights, grad_columns, band_stop - band_start
            )
        if grad_weights is not None:
            grad_weights[first:last] = _corner_products(band, corner_rows, grad_columns)
        del grad_columns  # before the next chunk's are made (see _chunk_product)
    grad_input = None
    if grad_table is not None:
        framed = grad_table.view(batch, height + 2, width + 2, in_channels)
        grad_input = framed[:, 1:-1, 1:-1].permute(0, 3, 1, 2).to(input.dtype)
        grad_input = grad_input.contiguous(
            memory_format=torch.channels_last
            if is_channels_last(input)
            else torch.contiguous_format
        )
    return grad_input, grad_weights, grad_matrix


def _differentiable_grads(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:class:`_GatherConvolution`'s gradients under ``create_graph=True``: the product again
    through differentiable steps (all points at once), differentiated with a graph."""
    input, point_weights, weight_matrix, index = ctx.saved_tensors
    geometry = ctx.geometry
    batch, in_channels, _, _ = input.shape
    framed = F.pad(input.to(weight_matrix.dtype), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    table = framed.reshape(-1, in_channels // geometry.offset_groups)
    # embedding_bag has no double backward: the weighted sum of corner rows as a gather.
    corners = table[index]  # (B, 4, C_in / offset_groups)
    columns = (corners * point_weights.to(table.dtype).unsqueeze(-1)).sum(1)
    groups, _, depth = weight_matrix.shape
    kernel_points = _ChunkRows.of(input, index, weight_matrix, geometry).kernel_points
    product = _grouped_product(columns.view(-1, groups * depth), weight_matrix, kernel_points)
    out = product.view(batch, -1, product.shape[1]).transpose(1, 2)
    needs = ctx.needs_input_grad[:3]
    tensors = (input, point_weights, weight_matrix)
    wanted = [tensor for tensor, need in zip(tensors, needs, strict=True) if need]
    grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def _table_band(index: Tensor, band_step: int) -> tuple[int, int]:
    """The table rows ``start:stop`` that the corner rows ``index`` read, ``start`` rounded
    down to a multiple of ``band_step`` (where a zero frame pixel begins), row 0 left out:
    it only stands for points outside the image."""
    if index.numel() == 0:
        return 0, 1
    stop = int(index.max()) + 1
    start = int(index.masked_fill(index == 0, stop).min())
    start -= start % band_step
    return start, max(stop, start + 1)


def _rows_per_chunk(
    geometry: Geometry, weight_matrix: Tensor, total_rows: int, element_size: int
) -> int:
    """Output rows per chunk: as many as the column-memory cap allows, with or without
    autograd (each chunk's image gradient is only as large as the rows it reads)."""
    groups, _, depth = weight_matrix.shape
    row_bytes = geometry.out_w * groups * depth * element_size
    return max(chunk_rows(total_rows, geometry.out_w, row_bytes, False, "cpu"), 1)


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
    if is_channels_last(input):  # already channels-last: one copy into the frame
        table[:, 1:-1, 0].zero_()
        table[:, 1:-1, -1].zero_()
        table[:, 1:-1, 1:-1].copy_(input.permute(0, 2, 3, 1))
        return table.view(-1, in_channels // offset_groups)
    # Band by band, each padded left and right before it is made channels-last: reading
    # channels whose stride is a power of two (a 128 x 128 image) directly is 2-3x slower, the
    # rows colliding in cache; a padded band has an odd stride and stays in cache.
    rows = band_rows(height, (width + 2) * in_channels * batch * table.element_size())
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        band = F.pad(input[:, :, top:bottom].to(dtype), (1, 1))
        table[:, 1 + top : 1 + bottom].copy_(band.permute(0, 2, 3, 1))
    return table.view(-1, in_channels // offset_groups)


class _IndexKey(NamedTuple):
    """All a call's :class:`_SamplingIndex` depends on: ``batch`` images of ``height`` x
    ``width``, the layer's geometry and kernel size, coordinates in ``dtype``, table rows in
    ``index_dtype``."""

    batch: int
    height: int
    width: int
    geometry: Geometry
    kernel_size: tuple[int, int]
    dtype: torch.dtype
    index_dtype: torch.dtype
    device: torch.device
    sample_minus_one: bool


def _sampling_index(
    input: Tensor,
    geometry: Geometry,
    kernel_size: tuple[int, int],
    dtype: torch.dtype,
    sample_minus_one: bool,
) -> _SamplingIndex:
    """The call's :class:`_SamplingIndex` for ``input`` laid out as :func:`_gather_table`, its
    coordinates in ``dtype`` (the sampling dtype, which the table's may not be: a bfloat16
    table's integers are exact only up to 256).

    Eager calls keep it per layer shape: every call of a layer has the same, and making it
    takes about 20 small operations (a tenth of a small layer's time)."""
    batch, _, height, width = input.shape
    index_dtype = _index_dtype(batch * (height + 2) * (width + 2) * geometry.offset_groups)
    device = input.device
    key = _IndexKey(
        batch, height, width, geometry, kernel_size, dtype, index_dtype, device, sample_minus_one
    )
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return _build_sampling_index(key)
    return _kept_sampling_index(key)


@torch.jit.unused
def _kept_sampling_index(key: _IndexKey) -> _SamplingIndex:
    """:func:`_build_sampling_index`, kept for the last few layer shapes."""
    # Ordinary tensors whatever mode the first call ran in: a kept inference tensor would fail
    # any later call, outside inference mode, that saved it for its backward.
    with torch.inference_mode(False):
        return _cached_sampling_index(key)


def _build_sampling_index(key: _IndexKey) -> _SamplingIndex:
    """The :class:`_SamplingIndex` of ``key``'s layer shape."""
    (stride_h, stride_w), (padding_h, padding_w) = key.geometry.stride, key.geometry.padding
    dilation_h, dilation_w = key.geometry.dilation
    out_h, out_w = key.geometry.out_h, key.geometry.out_w
    kernel_h, kernel_w = key.kernel_size
    image_rows = (key.height + 2) * (key.width + 2) * key.geometry.offset_groups
    flat_rows = torch.arange(key.batch * out_h, device=key.device)
    kernel_index = torch.arange(kernel_h * kernel_w, device=key.device)
    return _SamplingIndex(
        image_base=(flat_rows // out_h * image_rows).to(key.index_dtype),
        row_y=(flat_rows % out_h * stride_h - padding_h).to(key.dtype),
        col_x=(torch.arange(out_w, device=key.device) * stride_w - padding_w).to(key.dtype),
        kernel_y=(kernel_index // kernel_w * dilation_h).to(key.dtype),
        kernel_x=(kernel_index % kernel_w * dilation_w).to(key.dtype),
        group_index=torch.arange(
            key.geometry.offset_groups, dtype=key.index_dtype, device=key.device
        ),
        height=key.height,
        width=key.width,
        sample_minus_one=key.sample_minus_one,
    )


_cached_sampling_index = functools.lru_cache(maxsize=16)(_build_sampling_index)


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


def _matmul_transposed(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right.t()``: ``(M, N)`` from ``(M, D)`` and ``(N, D)``.

    float32 without autograd on x86 goes to oneDNN's GEMM (the one F.conv2d uses), 10-25%
    faster on these shapes than torch.mm, which sends float32 to MKL. Elsewhere (other
    dtypes, autograd, TorchScript, torch.compile, builds without oneDNN) it is torch.mm.
    """
    if (
        left.dtype == torch.float32
        and not (torch.is_grad_enabled() and (left.requires_grad or right.requires_grad))
        and not torch.jit.is_scripting()
        and _onednn_linear_usable(left)
    ):
        return _onednn_linear(left, right)
    return torch.mm(left, right.t())


@torch.jit.unused
def _onednn_linear_usable(left: Tensor) -> bool:
    """Whether :func:`_onednn_linear` runs ``left``'s product: on the CPU, eagerly
    (torch.compile lowers the op only with a constant weight), oneDNN built and enabled."""
    return (
        left.is_cpu
        and not torch.compiler.is_compiling()
        and _ONEDNN_LINEAR_BUILT
        and torch.backends.mkldnn.enabled
    )


@torch.jit.unused
def _onednn_linear(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right.t()`` through oneDNN (no bias, no fused activation)."""
    return torch.ops.mkldnn._linear_pointwise(left, right, None, "none", [], "")


def _grouped_product(columns: Tensor, weight_matrix: Tensor, kernel_points: int) -> Tensor:
    """``(positions, C_out)`` products of columns ``(positions, K * C_in)`` with the weight
    ``(groups, C_out / groups, K * C_in / groups)``, group by group."""
    groups, group_out_channels, _ = weight_matrix.shape
    if groups == 1:
        return _matmul_transposed(columns, weight_matrix[0])
    product = columns.new_empty(columns.shape[0], groups, group_out_channels)
    for group in range(groups):
        group_columns = _group_columns(columns, group, groups, kernel_points)
        product[:, group] = _matmul_transposed(group_columns, weight_matrix[group])
    return product.view(columns.shape[0], -1)


def _group_columns(columns: Tensor, group: int, groups: int, kernel_points: int) -> Tensor:
    """``(positions, K * C_in / groups)``, contiguous: one conv group's part of the columns
    ``(positions, K * C_in)``, in the weight matrix's (k, c) order.

    The grouped GEMMs take one group's columns at a time: a permuted copy of all of them for
    one ``bmm`` would hold two column-sized temporaries at once, whose pages glibc faults in
    again every chunk (2x slower on grouped layers).
    """
    by_group = columns.view(columns.shape[0], kernel_points, groups, -1)
    return by_group[:, :, group].reshape(columns.shape[0], -1)


def _grouped_product_columns_grad(
    weight_matrix: Tensor, grad: Tensor, kernel_points: int
) -> Tensor:
    """``(positions, K * C_in)``: the columns' gradient in :func:`_grouped_product`, for the
    gradient ``grad`` ``(positions, C_out)`` of its product."""
    groups, group_out_channels, depth = weight_matrix.shape
    if groups == 1:
        return _matmul_transposed(grad, weight_matrix[0].t())
    positions = grad.shape[0]
    grad_columns = grad.new_empty(positions, kernel_points, groups, depth // kernel_points)
    by_group = grad.view(positions, groups, group_out_channels)
    for group in range(groups):
        group_grad = _matmul_transposed(by_group[:, group], weight_matrix[group].t())
        grad_columns[:, :, group] = group_grad.view(positions, kernel_points, -1)
    return grad_columns.view(positions, -1)


def _grouped_product_matrix_grad(
    columns: Tensor, grad: Tensor, groups: int, kernel_points: int
) -> Tensor:
    """``(groups, C_out / groups, K * C_in / groups)``: the weight matrix's gradient in
    :func:`_grouped_product` of ``columns`` ``(positions, K * C_in)``, for the gradient
    ``grad`` ``(positions, C_out)`` of its product."""
    if groups == 1:
        return _matmul_transposed(grad.t(), columns.t()).unsqueeze(0)
    by_group = grad.view(grad.shape[0], groups, -1)
    return torch.stack(
        [
            _matmul_transposed(
                by_group[:, group].t(), _group_columns(columns, group, groups, kernel_points).t()
            )
            for group in range(groups)
        ]
    )


def _write_positions(product: Tensor, out: Tensor, start: int, out_h: int, out_w: int) -> None:
    """Copy ``product`` ``(positions, C_out)`` of the flattened output rows from ``start`` on
    (of all N * H_out) into ``out`` ``(N, C_out, H_out * W_out)``: a transposing copy, or a
    plain one into a channels-last output (:func:`_new_output`)."""
    for image, first, last, offset in _image_pieces(start, product.shape[0], out_h, out_w):
        out[image, :, first:last].copy_(product[offset : offset + last - first].t())


def _read_positions(grad: Tensor, start: int, out_h: int, out_w: int, rows: int) -> Tensor:
    """``(positions, C_out)``, contiguous: the flattened output rows ``start:start + rows``
    of ``grad`` ``(N, C_out, H_out * W_out)``; the inverse of :func:`_write_positions`."""
    rows = min(rows, grad.shape[0] * out_h - start)
    pieces = [
        grad[image, :, first:last].t()
        for image, first, last, _ in _image_pieces(start, rows * out_w, out_h, out_w)
    ]
    # One image's rows stay a transposed view: the GEMMs read it as it is.
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _image_pieces(
    start: int, positions: int, out_h: int, out_w: int
) -> list[tuple[int, int, int, int]]:
    """The ``positions`` output positions from flattened output row ``start`` (of all N *
    H_out) on, image by image: ``(image, first, last, offset)`` for positions ``first:last``
    of ``image``'s H_out * W_out, which are ``offset:offset + last - first`` of the chunk."""
    pieces: list[tuple[int, int, int, int]] = []
    row, stop = start, start + positions // out_w
    while row < stop:
        image = row // out_h
        piece_stop = min(stop, (image + 1) * out_h)
        first = (row - image * out_h) * out_w
        pieces.append((image, first, (piece_stop - image * out_h) * out_w, (row - start) * out_w))
        row = piece_stop
    return pieces


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
    # Outside, the top-left row and both steps are 0. (Four corners as four plain tensors
    # stacked: adding a (4,) step to a (..., 1) broadcast, then masking, is 3-4x slower.)
    inside_rows = inside.to(top_left.dtype)
    top_left.mul_(inside_rows)
    right = inside_rows * offset_groups
    below = top_left + inside_rows * (framed_w * offset_groups)
    return torch.stack([top_left, top_left + right, below, below + right], -1)


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
    return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")


def _weighted_row_scatter(index: Tensor, weights: Tensor, values: Tensor, rows: int) -> Tensor:
    """``(rows, C)``: ``out[r] = sum of weights[b, j] * values[b] over index[b, j] == r``, the
    adjoint of :func:`_weighted_row_sums` (its gradient in the table) for ``(B, 4)`` index and
    weights and ``(B, C)`` values."""
    # The same weighted sum the other way round: (b, j) pairs sorted by table row are bags
    # of rows of ``values``. About 4x faster than embedding_bag's own backward.
    flat = index.flatten()
    order = torch.argsort(flat)
    counts = torch.bincount(flat, minlength=rows)
    starts = counts.cumsum(0) - counts
    corners = index.shape[1]
    return F.embedding_bag(
        order // corners, values, starts, per_sample_weights=weights.flatten()[order], mode="sum"
    )


def _corner_products(table: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """``(B, 4)``: ``out[b, j] = table[index[b, j]] . values[b]``, the gradient of
    :func:`_weighted_row_sums` in its weights, for ``(B, C)`` values."""
    # embedding_bag's own kernel for this, called directly: a gather-and-multiply in public
    # ops materialises four times the values (4-6x slower).
    bags, corners = index.shape
    bag_starts = torch.arange(0, bags * corners, corners, device=index.device)
    bag_of_corner = torch.arange(bags, device=index.device).repeat_interleave(corners)
    products = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        values, table, index.flatten(), bag_starts, bag_of_corner, 0, -1
    )
    return products.view(bags, corners)
