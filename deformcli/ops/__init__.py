"""Deformable convolution written only with PyTorch tensor operations."""

from deformcli.ops.deform_conv import (
    DeformConv2d,
    deform_conv2d,
    deform_conv2d_mmcv_grad,
    get_max_column_bytes,
    set_max_column_bytes,
)

__all__ = [
    "DeformConv2d",
    "deform_conv2d",
    "deform_conv2d_mmcv_grad",
    "get_max_column_bytes",
    "set_max_column_bytes",
]
