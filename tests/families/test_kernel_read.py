"""DB's ResNet-50 quirk: offsets and mask larger than the output, read as mmdetection v1's
modulated CUDA kernel reads them (the first values of each sample's memory).

The reference follows the kernel's pointer arithmetic (tests/db_kernel.py ``sample_read``:
``as_strided`` over the storage from ``offset[b]``'s first element) into the independent loop
reference, so it is checked without the reshape that deformcli uses.
"""

import warnings

import pytest
import torch

from deformcli import DeformConv2d, deform_conv2d
from deformcli.families import db, legacy_dcn
from deformcli.user_model import name_layers
from tests.db_kernel import sample_read
from tests.helpers import assert_close_scaled
from tests.reference import deform_conv2d_loop

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def db_bottleneck_inputs(batch: int, dtype: torch.dtype, size=(6, 7), channels=3):
    """What DB's Bottleneck gives its strided conv2: one stride-1 27-channel prediction, the
    offset a non-contiguous slice of it, the mask a sigmoid of its last 9 channels."""
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, channels, *size, generator=generator, dtype=torch.float64)
    offset_mask = torch.randn(batch, 27, *size, generator=generator, dtype=torch.float64) * 2
    return x.to(dtype), offset_mask.to(dtype)


def split(offset_mask):
    return offset_mask[:, :18], offset_mask[:, -9:].sigmoid()


def cuda_semantics(x, offset_mask, weight, bias, stride=2):
    """The loop reference on exactly what the CUDA kernel reads, sample by sample."""
    offset, mask = split(offset_mask)
    out_h = (x.shape[2] + 2 - 3) // stride + 1
    out_w = (x.shape[3] + 2 - 3) // stride + 1
    outputs = [
        deform_conv2d_loop(
            x[b : b + 1],
            sample_read(offset, b, 18, out_h, out_w)[None],
            weight,
            bias,
            (stride, stride),
            (1, 1),
            (1, 1),
            sample_read(mask, b, 9, out_h, out_w)[None],
        )
        for b in range(x.shape[0])
    ]
    return torch.cat(outputs)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_strided_layer_reads_offsets_like_the_cuda_kernel(formulation, batch, dtype):
    x, offset_mask = db_bottleneck_inputs(batch, dtype)
    layer = db.ModulatedDeformConv(3, 4, 3, stride=2, padding=1, bias=True).to(dtype)
    with torch.no_grad():
        layer.bias.normal_()
    tensors = [t.detach().clone().requires_grad_() for t in (x, offset_mask)]
    params = [layer.weight, layer.bias]

    def run(forward):
        out = forward(*tensors)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
        return [out.detach(), *torch.autograd.grad(out, [*tensors, *params], upstream)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", legacy_dcn.KernelReadWarning)
        actual = run(lambda x, offset_mask: layer(x, *split(offset_mask)))
    expected = run(lambda x, offset_mask: cuda_semantics(x, offset_mask, *params))
    assert actual[0].shape == (batch, 4, 3, 4)
    names = ["output", "input", "offset_mask", "weight", "bias"]
    for name, a, e in zip(names, actual, expected, strict=True):
        assert_close_scaled(a, e, TOLERANCE[dtype], name)
    # The values past what the kernel reads get no gradient, as in the CUDA backward.
    read = 18 * 3 * 4
    assert actual[2][:, :18].reshape(batch, -1)[:, read:].abs().max() == 0
    assert actual[2][:, :18].reshape(batch, -1)[:, :read].abs().max() > 0


def test_functional_op_reads_the_same_way():
    x, offset_mask = db_bottleneck_inputs(2, torch.float64)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    offset, mask = split(offset_mask)
    out = legacy_dcn.modulated_deform_conv(x, offset, mask, weight, None, 2, 1)
    assert_close_scaled(out, cuda_semantics(x, offset_mask, weight, None), 1e-10)


def test_warns_once_per_layer_naming_it():
    model = torch.nn.Sequential(db.ModulatedDeformConv(3, 4, 3, stride=2, padding=1))
    name_layers(model)
    x, offset_mask = db_bottleneck_inputs(1, torch.float32)
    with pytest.warns(legacy_dcn.KernelReadWarning, match=r"^0 \(ModulatedDeformConv\): offset"):
        model[0](x, *split(offset_mask))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model[0](x, *split(offset_mask))  # once per layer: silent now
        # A matching offset is the ordinary op and never warns.
        stride_one = db.ModulatedDeformConv(3, 4, 3, padding=1)
        stride_one(x, *split(offset_mask))


def test_too_few_values_is_an_error_naming_the_layer():
    layer = db.ModulatedDeformConv(3, 4, 3, padding=1)
    layer.layer_path = "backbone.layer2.0.conv2"
    x = torch.randn(1, 3, 8, 8)
    offset, mask = torch.randn(1, 18, 4, 4), torch.rand(1, 9, 4, 4)
    with pytest.raises(
        RuntimeError,
        match=r"backbone.layer2.0.conv2 \(ModulatedDeformConv\): offset has shape \[1, 18, 4, 4\]"
        r" but the output is 8x8: the CUDA kernel reads 1152 values per sample",
    ):
        layer(x, offset, mask)


def test_non_modulated_layer_rejects_the_mismatch_as_its_cuda_op_does():
    layer = db.DeformConv(3, 4, 3, stride=2, padding=1)
    with pytest.raises(RuntimeError, match=r"invalid spatial size of offset.*expected 3x4"):
        layer(torch.randn(1, 3, 6, 7), torch.randn(1, 18, 6, 7))


def test_torchvision_drop_ins_keep_rejecting_mismatched_offsets():
    x, offset_mask = db_bottleneck_inputs(1, torch.float32)
    offset, mask = split(offset_mask)
    weight = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="offset"):
        deform_conv2d(x, offset, weight, stride=2, padding=1, mask=mask)
    with pytest.raises(RuntimeError, match="offset"):
        DeformConv2d(3, 4, 3, stride=2, padding=1)(x, offset, mask)
