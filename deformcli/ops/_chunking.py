"""The cap on temporary sampled-column memory, and how many output rows fit under it."""

import torch

# Upper bound on the bytes of the sampled columns of one chunk of output rows, for CPU (index 0)
# and for other devices (index 1). With a mask the forward pass holds about twice this in
# temporaries. On CPU, 4 MiB keeps one chunk's columns in the last-level cache between
# sampling, modulation and the GEMM, which makes small chunks faster than one big one; on a GPU
# each chunk costs kernel launches, so big chunks are faster there.
_max_column_bytes: list[int] = [4 * 2**20, 512 * 2**20]

# Chunks hold at least this many output positions so the GEMM stays efficient on narrow images.
_MIN_CHUNK_POSITIONS = 1024

# Sampling points whose corner rows and weights the CPU kernel computes in one pass: their
# arithmetic is a few dozen elementwise operations, cheaper over many points at once than
# chunk by chunk (a (1, 128, 80, 80) layer in one pass instead of seven: 15% faster). Their
# temporaries peak at about 100 bytes a point: 2**16 points keep the peak memory of a
# (1, 128, 256, 256) inference forward at about 1.25x dense conv2d's (88 vs 70 MiB; per
# chunk 81, 2**17 points 93).
_MAX_BLOCK_POINTS = 2**16

# Bytes of one band of image rows that the CPU kernel lays out channels-last at a time: it
# stays in a core's L2 cache (1 MiB on the machines measured) between its two copies.
_TABLE_BAND_BYTES = 2**20

# With autograd, each chunk's grid_sample backward produces an input-sized gradient that is
# then summed, so training on that formulation keeps the number of chunks small. (The CPU
# gather kernel's chunk gradients cover only the image rows each chunk reads.)
_MAX_CHUNKS_WITH_INPUT_GRAD = 8


def set_max_column_bytes(max_bytes: int, device_type: str = "cpu") -> None:
    """Cap the temporary sampled-column memory of one chunk of output rows.

    Smaller caps bound peak memory on large images; at least one output row (and 1024 output
    positions) is processed per chunk whatever the cap. Traced and compiled graphs are not
    chunked (their shapes may be symbolic).

    Args:
        max_bytes: the cap in bytes (defaults: 4 MiB on CPU, 512 MiB on other devices).
        device_type: ``"cpu"`` for the CPU cap, anything else (``"cuda"``, ``"mps"``...) for the
            cap shared by all other devices.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    _max_column_bytes[_cap_index(device_type)] = int(max_bytes)


def get_max_column_bytes(device_type: str = "cpu") -> int:
    """The cap set by :func:`set_max_column_bytes` for ``device_type``."""
    return _max_column_bytes[_cap_index(device_type)]


def _cap_index(device_type: str) -> int:
    return 0 if device_type == "cpu" else 1


def chunk_rows(
    out_h: int, out_w: int, bytes_per_row: int, input_needs_grad: bool, device_type: str
) -> int:
    """How many output rows one chunk may hold under the column-memory cap (``input_needs_grad``:
    at most :data:`_MAX_CHUNKS_WITH_INPUT_GRAD` chunks)."""
    if torch.jit.is_scripting() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return out_h
    cap = _max_column_bytes[_cap_index(device_type)]
    rows = max(cap // max(bytes_per_row, 1), -(-_MIN_CHUNK_POSITIONS // out_w))
    if input_needs_grad:
        rows = max(rows, -(-out_h // _MAX_CHUNKS_WITH_INPUT_GRAD))
    return min(out_h, rows)


def block_rows(points_per_row: int, rows_per_chunk: int) -> int:
    """How many output rows (a whole number of chunks) one pass of sampling arithmetic covers."""
    if torch.jit.is_scripting():
        return rows_per_chunk
    chunks = max(1, _MAX_BLOCK_POINTS // max(points_per_row * rows_per_chunk, 1))
    return chunks * rows_per_chunk


def band_rows(height: int, bytes_per_row: int) -> int:
    """How many image rows the CPU kernel's table copies at a time (:data:`_TABLE_BAND_BYTES`)."""
    if torch.jit.is_scripting():
        return height
    return max(1, _TABLE_BAND_BYTES // max(bytes_per_row, 1))
