"""Bad arguments raise clear errors naming the tensor and the expected and actual shapes."""

import pytest
import torch

from deformcli import deform_conv2d


def _args(**overrides):
    args = dict(
        input=torch.randn(2, 4, 6, 6),
        offset=torch.randn(2, 18, 6, 6),
        weight=torch.randn(8, 4, 3, 3),
        bias=torch.randn(8),
        stride=1,
        padding=1,
        dilation=1,
        mask=torch.rand(2, 9, 6, 6),
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        (
            dict(input=torch.randn(4, 6, 6)),
            RuntimeError,
            r"input must be a 4-D tensor .* got shape \[4, 6, 6\]",
        ),
        (dict(offset=torch.randn(2, 18, 36)), RuntimeError, r"offset must be a 4-D tensor"),
        (dict(weight=torch.randn(8, 4, 9)), RuntimeError, r"weight must be a 4-D tensor"),
        (
            dict(offset=torch.randn(2, 17, 6, 6)),
            RuntimeError,
            r"offset.shape\[1\] must be a positive multiple of 2 \* kH \* kW = 18, "
            r"got offset shape \[2, 17, 6, 6\]",
        ),
        (
            dict(offset=torch.randn(2, 18, 5, 6)),
            RuntimeError,
            r"offset has shape \[2, 18, 5, 6\], expected \[2, 18, 6, 6\]",
        ),
        (
            dict(offset=torch.randn(1, 18, 6, 6)),
            RuntimeError,
            r"offset has shape \[1, 18, 6, 6\], expected \[2, 18, 6, 6\]",
        ),
        (
            dict(offset=torch.randn(2, 54, 6, 6), mask=None),
            RuntimeError,
            r"input channels \(4\) must be divisible by offset_groups \(3",
        ),
        (
            dict(mask=torch.rand(2, 18, 6, 6)),
            RuntimeError,
            r"mask has shape \[2, 18, 6, 6\], expected \[2, 9, 6, 6\]",
        ),
        (
            dict(weight=torch.randn(8, 3, 3, 3)),
            RuntimeError,
            r"input has 4 channels, which is not a multiple of weight.shape\[1\]=3",
        ),
        (
            dict(weight=torch.randn(7, 2, 3, 3)),
            RuntimeError,
            r"weight.shape\[0\]=7 .* divisible by groups=2",
        ),
        (dict(bias=torch.randn(7)), RuntimeError, r"bias has shape \[7\], expected \[8\]"),
        (
            dict(bias=torch.randn(8, dtype=torch.float64)),
            RuntimeError,
            r"bias has dtype torch.float64",
        ),
        (
            dict(offset=torch.randn(2, 18, 6, 6, dtype=torch.float64)),
            RuntimeError,
            r"offset has dtype torch.float64",
        ),
        (
            dict(input=torch.randn(2, 4, 1, 1), padding=0),
            RuntimeError,
            r"computed output size \(-1, -1\) is too small",
        ),
        (dict(stride=0), ValueError, r"stride must be positive"),
        (dict(padding=-1), ValueError, r"padding must be non-negative"),
        (dict(dilation=(1, 0)), ValueError, r"dilation must be positive"),
        (
            dict(input=torch.ones(2, 4, 6, 6, dtype=torch.int64)),
            RuntimeError,
            r"offset has dtype torch.float32",
        ),
    ],
)
def test_bad_arguments(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        deform_conv2d(**_args(**overrides))


def test_integer_tensors_rejected():
    args = _args()
    args = {k: v.long() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(
        RuntimeError, match=r"input must be a floating point tensor, got dtype torch\.int64"
    ):
        deform_conv2d(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_device_mismatch():
    with pytest.raises(RuntimeError, match="weight is on device cuda"):
        deform_conv2d(**_args(weight=torch.randn(8, 4, 3, 3, device="cuda")))
