"""Values a user hands deformcli (dtype names, devices, sample shapes), checked before any work.

Every problem raises :class:`InputError` naming the value, so it never surfaces later as an
exception from deep inside torch, or as an allocation the machine cannot hold.
"""

import os
from collections.abc import Sequence

import torch

from deformcli.errors import DeformcliError

__all__ = [
    "DTYPES",
    "InputError",
    "check_allocation",
    "parse_device",
    "parse_dtype",
    "parse_shape",
]

#: The floating dtypes deformcli converts to and times, by name.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

# Dimensions beyond this are typos (torch sizes are int64, but no image is 2**31 pixels wide).
_MAX_DIM = 2**31 - 1


class InputError(DeformcliError):
    """A value given on the command line or to a library call is not usable."""


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; only the floating dtypes in :data:`DTYPES`."""
    dtype = DTYPES.get(name)
    if dtype is None:
        raise InputError(f"dtype {name!r}: choose from {', '.join(DTYPES)}")
    return dtype


def parse_device(name: str) -> torch.device:
    """A device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``...)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"device {name!r}: not a device torch knows (cpu, cuda, mps...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r}: no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {name!r}: MPS is not available on this machine")
    return device


def parse_shape(text: str, what: str, dims: int = 4) -> tuple[int, ...]:
    """``"1,3,640,640"`` (or ``1x3x640x640``) -> ``(1, 3, 640, 640)``: ``dims`` sizes, each
    between 1 and 2**31 - 1."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"{what} {text!r}: expected {dims} integers like 1,3,640,640") from None
    if len(shape) != dims:
        raise InputError(
            f"{what} {text!r}: expected {dims} sizes (N,C,H,W) like 1,3,640,640, got {len(shape)}"
        )
    if any(size <= 0 or size > _MAX_DIM for size in shape):
        raise InputError(f"{what} {text!r}: every size must be between 1 and {_MAX_DIM}")
    return shape


def check_allocation(shape: Sequence[int], dtype: torch.dtype, what: str) -> None:
    """Refuse a tensor of ``shape`` whose dims are not positive sizes or that would not fit in
    a quarter of this machine's memory (the run needs several such tensors)."""
    if any(not isinstance(size, int) or size <= 0 or size > _MAX_DIM for size in shape):
        raise InputError(f"{what} {list(shape)}: every size must be between 1 and {_MAX_DIM}")
    count = 1
    for size in shape:
        count *= size
    needed = count * torch.empty((), dtype=dtype).element_size()
    budget = _memory_bytes() // 4
    if needed > budget:
        raise InputError(
            f"{what} {list(shape)}: needs {_gib(needed)} for this tensor alone, more than a "
            f"quarter of this machine's memory ({_gib(budget * 4)})"
        )


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 << 30  # no sysconf (Windows): assume a 16 GiB machine


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"
