"""torchvision's vs mmcv's offset gradient at integer sampling points (issue: exact to each
CUDA kernel). Fixtures from mmcv's own tests: tests/test_ops/test_modulated_deform_conv.py and
tests/test_ops/test_deform_conv.py (open-mmlab/mmcv)."""

import pytest
import torch
import torchvision

from deformcli import deform_conv2d, deform_conv2d_mmcv_grad
from deformcli.families import basicsr, legacy_dcn, mmcv
from tests.helpers import (
    assert_close_scaled,
    assert_outputs_and_grads_close,
    forward_and_grads,
    make_problem,
)

# Every test here runs on both formulations of the op (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("formulation")

# mmcv tests/test_ops/test_modulated_deform_conv.py
MODULATED_INPUT = [[[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]]
MODULATED_OUTPUT = [
    [[[0.5, 1.5, 2.5, 1.5], [1.0, 3.0, 5.0, 3.0], [1.0, 3.0, 5.0, 3.0], [0.5, 1.5, 2.5, 1.5]]]
]
MODULATED_INPUT_GRAD = [[[[2.0] * 3] * 3]]
MODULATED_WEIGHT_GRAD = [[[[9.0, 9.0], [9.0, 9.0]]]]
MODULATED_OFFSET_WEIGHT_GRAD = [
    [[[-7.0, -4.0], [0.0, 0.0]]],
    [[[-9.0, 7.5], [-6.0, 5.0]]],
    [[[-4.0, -7.0], [0.0, 0.0]]],
    [[[-7.5, -9.0], [-5.0, -6.0]]],
    [[[-7.0, -4.0], [-7.0, -4.0]]],
    [[[-6.0, 5.0], [-9.0, 7.5]]],
    [[[-4.0, -7.0], [-4.0, -7.0]]],
    [[[-5.0, -6.0], [-7.5, -9.0]]],
    [[[10.5, 6.0], [7.0, 4.0]]],
    [[[6.0, 10.5], [4.0, 7.0]]],
    [[[7.0, 4.0], [10.5, 6.0]]],
    [[[4.0, 7.0], [6.0, 10.5]]],
]
MODULATED_OFFSET_BIAS_GRAD = [-3.0, -1.5, -3.0, -1.5, -3.0, -1.5, -3.0, -1.5, 4.5, 4.5, 4.5, 4.5]

# mmcv tests/test_ops/test_deform_conv.py (values published rounded to 2-3 decimals)
DEFORM_INPUT = [[[[1.0, 2.0, 3.0], [0.0, 1.0, 2.0], [3.0, 5.0, 2.0]]]]
DEFORM_OFFSET_WEIGHT = [
    [[0.1, 0.4, 0.6, 0.1]],
    [[0.3, 0.2, 0.1, 0.3]],
    [[0.5, 0.5, 0.2, 0.8]],
    [[0.8, 0.3, 0.9, 0.1]],
    [[0.3, 0.1, 0.2, 0.5]],
    [[0.3, 0.7, 0.5, 0.3]],
    [[0.6, 0.2, 0.5, 0.3]],
    [[0.4, 0.1, 0.8, 0.4]],
]
DEFORM_OFFSET_BIAS = [0.7, 0.1, 0.8, 0.5, 0.6, 0.5, 0.4, 0.7]
DEFORM_WEIGHT = [[[0.4, 0.2, 0.1, 0.9]]]
DEFORM_OUTPUT = [[[[1.650, 0.0], [0.000, 0.0]]]]
DEFORM_INPUT_GRAD = [[[[-0.666, 0.204, 0.000], [0.030, -0.416, 0.012], [0.000, 0.252, 0.129]]]]
DEFORM_OFFSET_WEIGHT_GRAD = [
    [[[1.44, 2.88], [0.00, 1.44]]],
    [[[-0.72, -1.44], [0.00, -0.72]]],
    [[[0.00, 0.00], [0.00, 0.00]]],
    [[[0.00, 0.00], [0.00, 0.00]]],
    [[[-0.10, -0.20], [0.00, -0.10]]],
    [[[-0.08, -0.16], [0.00, -0.08]]],
    [[[-0.54, -1.08], [0.00, -0.54]]],
    [[[-0.54, -1.08], [0.00, -0.54]]],
]
DEFORM_OFFSET_BIAS_GRAD = [1.44, -0.72, 0.0, 0.0, -0.10, -0.08, -0.54, -0.54]
DEFORM_WEIGHT_GRAD = [[[[3.62, 0.0], [0.40, 0.18]]]]


def _run_modulated_fixture(layer_cls, dtype):
    x = torch.tensor(MODULATED_INPUT, dtype=dtype, requires_grad=True)
    layer = layer_cls(1, 1, kernel_size=(2, 2), stride=1, padding=1, bias=False).to(dtype)
    layer.weight.data.fill_(1.0)
    out = layer(x)
    out.sum().backward()
    return out, x.grad, layer


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "layer_cls", [mmcv.ModulatedDeformConv2dPack, legacy_dcn.ModulatedDeformConvPack]
)
def test_mmcv_modulated_fixture(layer_cls, dtype, tol):
    out, input_grad, layer = _run_modulated_fixture(layer_cls, dtype)
    expected = {
        "output": (out, MODULATED_OUTPUT),
        "input grad": (input_grad, MODULATED_INPUT_GRAD),
        "weight grad": (layer.weight.grad, MODULATED_WEIGHT_GRAD),
        "conv_offset.weight grad": (layer.conv_offset.weight.grad, MODULATED_OFFSET_WEIGHT_GRAD),
        "conv_offset.bias grad": (layer.conv_offset.bias.grad, MODULATED_OFFSET_BIAS_GRAD),
    }
    for name, (actual, values) in expected.items():
        assert_close_scaled(actual.detach(), torch.tensor(values, dtype=dtype), tol, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer_cls", [mmcv.DeformConv2dPack, legacy_dcn.DeformConvPack])
def test_mmcv_deform_fixture(layer_cls, dtype):
    batch = 10  # as in mmcv's test: gradients of parameters are divided by the batch size
    x = torch.tensor(DEFORM_INPUT, dtype=dtype).repeat(batch, 1, 1, 1).requires_grad_()
    layer = layer_cls(1, 1, kernel_size=2, stride=1, padding=0).to(dtype)
    layer.conv_offset.weight.data = torch.tensor(DEFORM_OFFSET_WEIGHT, dtype=dtype).reshape(
        8, 1, 2, 2
    )
    layer.conv_offset.bias.data = torch.tensor(DEFORM_OFFSET_BIAS, dtype=dtype)
    layer.weight.data = torch.tensor(DEFORM_WEIGHT, dtype=dtype).reshape(1, 1, 2, 2)
    out = layer(x)
    out.backward(torch.ones_like(out))
    # mmcv's threshold is 1e-3 because its published values are rounded; so is ours.
    checks = [
        (out, DEFORM_OUTPUT, 1),
        (x.grad, DEFORM_INPUT_GRAD, 1),
        (layer.conv_offset.weight.grad, DEFORM_OFFSET_WEIGHT_GRAD, batch),
        (layer.conv_offset.bias.grad, DEFORM_OFFSET_BIAS_GRAD, batch),
        (layer.weight.grad, DEFORM_WEIGHT_GRAD, batch),
    ]
    for actual, values, divide in checks:
        # Outputs and input gradients are per sample; parameter gradients summed over the batch.
        expected = torch.tensor(values, dtype=dtype).expand_as(actual)
        assert torch.allclose(actual.detach() / divide, expected, atol=1e-3, rtol=1e-3)


def test_torchvision_convention_differs_on_the_same_fixture():
    # The functional op is torchvision's drop-in: on mmcv's fixture it must give torchvision's
    # numbers (quoted in the issue), not mmcv's.
    x = torch.tensor(MODULATED_INPUT, dtype=torch.float64)
    weight = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    raw = torch.zeros(1, 12, 4, 4, dtype=torch.float64, requires_grad=True)  # conv_offset output

    def bias_grad(op):
        o1, o2, m = raw.chunk(3, dim=1)
        out = op(x, torch.cat((o1, o2), 1), weight, None, (1, 1), (1, 1), (1, 1), m.sigmoid())
        (grad,) = torch.autograd.grad(out.sum(), raw)
        return grad.sum(dim=(0, 2, 3))

    ours = bias_grad(deform_conv2d)
    assert torch.equal(ours, bias_grad(torchvision.ops.deform_conv2d))
    assert ours.tolist() == [0, 0, 0, -1.5, -3, 0, -3, -1.5, 4.5, 4.5, 4.5, 4.5]
    assert bias_grad(deform_conv2d_mmcv_grad).tolist() == MODULATED_OFFSET_BIAS_GRAD
    # First output channel of conv_offset.weight's gradient: the input patch dotted with it.
    layer = mmcv.ModulatedDeformConv2dPack(1, 1, (2, 2), padding=1, bias=False).double()
    layer.weight.data.fill_(1.0)
    inputs = torch.tensor(MODULATED_INPUT, dtype=torch.float64)
    o1, o2, m = layer.conv_offset(inputs).chunk(3, dim=1)
    out = deform_conv2d(inputs, torch.cat((o1, o2), 1), layer.weight, None, 1, 1, 1, m.sigmoid())
    out.sum().backward()
    assert layer.conv_offset.weight.grad[0].flatten().tolist() == [-7, -4, 7, 4]


def test_conventions_agree_away_from_the_border_lines():
    # Non-integer offsets never land on y == -1 or x == -1: all five gradients agree.
    problem = make_problem(offset_scale=2.5)
    assert_outputs_and_grads_close(
        problem,
        forward_and_grads(deform_conv2d_mmcv_grad, problem),
        forward_and_grads(deform_conv2d, problem),
        1e-12,
    )


def test_mmcv_convention_has_double_backward():
    problem = make_problem(
        batch=1, in_channels=2, out_channels=2, size=(4, 4), kernel=(2, 2), offset_scale=1.5
    )
    tensors = [t.detach().clone().requires_grad_() for t in problem.tensors()]
    assert torch.autograd.gradgradcheck(
        lambda *ts: problem.call(deform_conv2d_mmcv_grad, list(ts)), tensors
    )


def test_dcnv2pack_follows_torchvision():
    # BasicSR runs DCNv2Pack through torchvision's op (torchvision >= 0.9), so on mmcv's fixture
    # it must give torchvision's offset gradient, not mmcv's.
    layer = basicsr.DCNv2Pack(1, 1, kernel_size=(2, 2), stride=1, padding=1, bias=False).double()
    layer.weight.data.fill_(1.0)
    x = torch.tensor(MODULATED_INPUT, dtype=torch.float64)
    layer(x, x).sum().backward()
    assert layer.conv_offset.bias.grad.tolist() == [
        0,
        0,
        0,
        -1.5,
        -3,
        0,
        -3,
        -1.5,
        4.5,
        4.5,
        4.5,
        4.5,
    ]


def test_mmcv_assertions_are_assertion_errors_as_in_mmcvs_tests():
    # mmcv's tests/test_ops/test_deform_conv.py expects AssertionError for these.
    for kwargs in (
        dict(in_channels=1, out_channels=1, kernel_size=2, bias=True),
        dict(in_channels=3, out_channels=2, kernel_size=3, groups=2),
        dict(in_channels=3, out_channels=4, kernel_size=3, groups=3),
    ):
        with pytest.raises(AssertionError):
            mmcv.DeformConv2d(**kwargs)
        with pytest.raises(ValueError):  # and the ValueError a Python caller expects
            mmcv.DeformConv2d(**kwargs)
    assert not hasattr(mmcv.DeformConv2d(1, 1, 2), "bias")


def test_mmcv_im2col_step_must_divide_the_batch():
    layer = mmcv.DeformConv2dPack(1, 1, 2, im2col_step=3)
    with pytest.raises(AssertionError, match="batch size must be divisible by im2col_step"):
        layer(torch.randn(10, 1, 3, 3))
    assert layer(torch.randn(9, 1, 3, 3)).shape == (9, 1, 2, 2)
    # A batch smaller than the step is one step.
    assert mmcv.DeformConv2dPack(1, 1, 2, im2col_step=2)(torch.randn(1, 1, 3, 3)).shape[0] == 1
    offset = torch.zeros(10, 8, 2, 2)
    with pytest.raises(AssertionError, match="batch size must be divisible by im2col_step"):
        mmcv.deform_conv2d(torch.randn(10, 1, 3, 3), offset, torch.randn(1, 1, 2, 2), im2col_step=4)
