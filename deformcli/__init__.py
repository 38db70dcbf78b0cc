"""deformcli: deformable convolution with no compiled extension."""

from deformcli.ops import DeformConv2d, deform_conv2d, get_max_column_bytes, set_max_column_bytes

__version__ = "0.1.0"

__all__ = [
    "DeformConv2d",
    "__version__",
    "deform_conv2d",
    "get_max_column_bytes",
    "set_max_column_bytes",
]
