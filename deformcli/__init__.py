"""deformcli: deformable convolution with no compiled extension."""

from deformcli.ops import (
    DeformConv2d,
    deform_conv2d,
    deform_conv2d_mmcv_grad,
    get_max_column_bytes,
    set_max_column_bytes,
)
from deformcli.surgery import SwapRecord, convert_layer, swap
from deformcli.user_model import load_model

__version__ = "0.1.0"

__all__ = [
    "DeformConv2d",
    "SwapRecord",
    "__version__",
    "convert_layer",
    "deform_conv2d",
    "deform_conv2d_mmcv_grad",
    "get_max_column_bytes",
    "load_model",
    "set_max_column_bytes",
    "swap",
]
