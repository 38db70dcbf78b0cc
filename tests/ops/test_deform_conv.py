"""deform_conv2d against torchvision's kernel and an independent loop reference."""

import itertools
import subprocess
import sys

import pytest
import torch
import torchvision

from deformcli import deform_conv2d
from tests.helpers import (
    GEOMETRIES,
    assert_close_scaled,
    assert_outputs_and_grads_close,
    check_against,
    check_chunked_columns,
    check_gradcheck_and_gradgradcheck,
    forward_and_grads,
    make_problem,
    names_for,
)
from tests.reference import deform_conv2d_loop

TV = torchvision.ops.deform_conv2d

GRID = list(
    itertools.product(
        [(3, 3), (3, 2), (1, 1)],
        [1, 2, 4],  # conv groups
        [1, 3],  # offset groups, independent of conv groups
        [True, False],  # mask
        [True, False],  # bias
        list(GEOMETRIES),
    )
)


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize(("kernel", "groups", "offset_groups", "mask", "bias", "geometry"), GRID)
def test_matches_torchvision_float64(kernel, groups, offset_groups, mask, bias, geometry):
    problem = make_problem(
        kernel=kernel,
        groups=groups,
        offset_groups=offset_groups,
        with_mask=mask,
        with_bias=bias,
        **GEOMETRIES[geometry],
    )
    check_against(TV, problem, 1e-10)


@pytest.mark.parametrize(
    ("kernel", "groups", "offset_groups", "geometry"),
    [
        ((3, 3), 1, 1, "plain"),
        ((3, 2), 2, 3, "asymmetric"),
        ((1, 1), 4, 1, "asymmetric"),
        ((3, 3), 4, 3, "plain"),
    ],
)
def test_matches_torchvision_float32(kernel, groups, offset_groups, geometry):
    problem = make_problem(
        kernel=kernel,
        groups=groups,
        offset_groups=offset_groups,
        dtype=torch.float32,
        **GEOMETRIES[geometry],
    )
    check_against(TV, problem, 1e-5)


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("mask", [True, False])
def test_integer_offsets_match_torchvision_gradients(geometry, mask):
    # Every sample on an exact grid point, many on the border rows/columns -1, 0, H-1 and H:
    # torchvision's offset gradient there is one-sided, and ours must be the same side.
    problem = make_problem(
        integer_offsets=True, offset_scale=1.5, with_mask=mask, **GEOMETRIES[geometry]
    )
    check_against(TV, problem, 1e-10)


def test_zero_offsets_equal_dense_convolution():
    problem = make_problem(offset_scale=0.0, with_mask=False, groups=2, **GEOMETRIES["asymmetric"])
    dense = torch.nn.functional.conv2d(
        problem.input,
        problem.weight,
        problem.bias,
        problem.stride,
        problem.padding,
        problem.dilation,
        groups=2,
    )
    assert_close_scaled(problem.call(deform_conv2d), dense, 1e-12, "output")


def test_offsets_far_outside_give_bias_only():
    problem = make_problem(offset_scale=0.0)
    problem.offset = torch.full_like(problem.offset, 1e4)
    out = problem.call(deform_conv2d)
    assert torch.equal(out, problem.bias.view(1, -1, 1, 1).expand_as(out))


@pytest.mark.parametrize(
    ("kernel", "groups", "offset_groups", "geometry"),
    [
        ((3, 3), 1, 1, "plain"),
        ((3, 2), 2, 3, "asymmetric"),
        ((2, 2), 1, 2, "asymmetric"),
    ],
)
def test_matches_loop_reference(kernel, groups, offset_groups, geometry):
    problem = make_problem(
        batch=2,
        in_channels=6,
        out_channels=4,
        size=(5, 6),
        kernel=kernel,
        groups=groups,
        offset_groups=offset_groups,
        **GEOMETRIES[geometry],
    )
    check_against(deform_conv2d_loop, problem, 1e-10)


def test_loop_reference_agrees_with_torchvision():
    # The two references are independent; their agreement is what makes either trustworthy.
    problem = make_problem(batch=1, in_channels=4, out_channels=2, size=(4, 5), offset_groups=2)
    assert_outputs_and_grads_close(
        problem,
        forward_and_grads(deform_conv2d_loop, problem),
        forward_and_grads(TV, problem),
        1e-10,
    )


@pytest.mark.parametrize("mask", [True, False])
def test_batch_zero(mask):
    problem = make_problem(batch=0, with_mask=mask)
    with torch.no_grad():
        assert problem.call(deform_conv2d).shape == (0, 8, 7, 9)
    outputs = forward_and_grads(deform_conv2d, problem)
    assert outputs[0].shape == (0, 8, 7, 9)
    for tensor, grad in zip(problem.tensors(), outputs[1:], strict=True):
        assert grad.shape == tensor.shape
    assert torch.count_nonzero(outputs[3]) == 0  # weight gradient of an empty batch


def test_non_contiguous_inputs():
    problem = make_problem(batch=3, groups=2, offset_groups=3)
    expected = forward_and_grads(TV, problem)
    problem.input = problem.input.to(memory_format=torch.channels_last)
    problem.offset = problem.offset.transpose(2, 3).contiguous().transpose(2, 3)
    problem.weight = problem.weight.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    problem.mask = torch.cat([problem.mask, problem.mask], dim=3)[..., : problem.mask.shape[3]]
    assert not problem.input.is_contiguous() and not problem.offset.is_contiguous()
    assert not problem.weight.is_contiguous() and not problem.mask.is_contiguous()
    assert_outputs_and_grads_close(
        problem, forward_and_grads(deform_conv2d, problem), expected, 1e-10
    )
    with torch.no_grad():
        assert_close_scaled(problem.call(deform_conv2d), expected[0], 1e-10, "inference output")


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize("groups", [1, 2])
def test_channels_last_input_gives_channels_last_output(groups, monkeypatch):
    # As from torch's convolutions; the CPU kernel then makes neither of its layout changes.
    problem = make_problem(batch=2, groups=groups, offset_groups=3, size=(9, 7))
    expected = forward_and_grads(TV, problem)
    problem.input = problem.input.contiguous(memory_format=torch.channels_last)
    assert not problem.input.is_contiguous()
    with torch.no_grad():
        out = problem.call(deform_conv2d)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_scaled(out, expected[0], 1e-10)
    actual = forward_and_grads(deform_conv2d, problem)
    assert actual[0].is_contiguous(memory_format=torch.channels_last)
    assert_outputs_and_grads_close(problem, actual, expected, 1e-10)
    # Chunks of 2 output rows: a chunk crosses from one image to the next (9 rows each).
    bytes_per_row = 7 * 9 * 12 * problem.input.element_size()  # W_out * K * C_in * 8
    check_chunked_columns(TV, problem, 2 * bytes_per_row, monkeypatch)


def test_int_arguments_like_torchvision():
    problem = make_problem(**GEOMETRIES["plain"])
    ours = deform_conv2d(
        problem.input, problem.offset, problem.weight, problem.bias, 1, 1, 1, problem.mask
    )
    assert_close_scaled(ours, problem.call(TV), 1e-10)


@pytest.mark.usefixtures("formulation")
def test_gradcheck_and_gradgradcheck():
    check_gradcheck_and_gradgradcheck()


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precisions_against_float64(dtype, tol):
    # Sampling runs in float32; the error left is the input's and the GEMM's rounding.
    problem = make_problem(dtype=torch.float64, in_channels=8, out_channels=8, offset_groups=2)
    expected = problem.call(deform_conv2d)
    low = problem.to(dtype)
    out = low.call(deform_conv2d)
    assert out.dtype == dtype
    bound = tol * problem.weight.shape[1] ** 0.5
    assert_close_scaled(out.double(), expected, bound)
    # Gradients, sums of products of rounded values like the output, against torchvision's
    # in float64 on the same rounded values.
    problem = low.to(torch.float64)
    expected_grads = forward_and_grads(TV, problem)[1:]
    actual_grads = forward_and_grads(deform_conv2d, low)[1:]
    for name, actual, wanted in zip(
        names_for(problem)[1:], actual_grads, expected_grads, strict=True
    ):
        assert actual.dtype == dtype, name
        assert_close_scaled(actual.double(), wanted, bound, name)


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precisions_beyond_256_pixels(dtype, tol):
    # Sampling coordinates past 256 are not integers in bfloat16 (8-bit mantissa): they must be
    # computed in float32 whatever the dtype the image is gathered in.
    problem = make_problem(in_channels=4, out_channels=4, size=(300, 290), with_mask=True)
    low = [t.to(dtype) for t in problem.tensors()]
    with torch.no_grad():
        out = problem.call(deform_conv2d, low)
        expected = problem.call(TV, [t.double() for t in low])
    assert out.dtype == dtype
    assert_close_scaled(out.double(), expected, tol * problem.weight.shape[1] ** 0.5)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("name", ["input", "offset", "weight", "bias", "mask"])
def test_gradient_of_one_tensor(name, groups):
    # Only one argument requires grad: the op must still build a graph (and pick its path).
    problem = make_problem(groups=groups, offset_groups=3)
    gradients = []
    for op in (deform_conv2d, TV):
        tensors = [t.detach().clone() for t in problem.tensors()]
        wanted = tensors[names_for(problem).index(name) - 1].requires_grad_()
        problem.call(op, tensors).square().sum().backward()
        gradients.append(wanted.grad)
    assert_close_scaled(*gradients, 1e-10, name)


def test_torch_func_gradients_match_torchvision():
    # torch.func transforms work on the op (its autograd.Function has setup_context); their
    # backward runs with a graph, so this also covers the differentiable backward.
    problem = make_problem(offset_groups=3, groups=2)
    tensors = [t.detach().clone().requires_grad_() for t in problem.tensors()]
    out = problem.call(TV, tensors)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    expected = torch.autograd.grad((out * upstream).sum(), tensors)

    def loss(*arguments):
        return (problem.call(deform_conv2d, list(arguments)) * upstream).sum()

    arguments = tuple(t.detach() for t in tensors)
    grads = torch.func.grad(loss, argnums=tuple(range(len(arguments))))(*arguments)
    for name, actual, wanted in zip(names_for(problem)[1:], grads, expected, strict=True):
        assert_close_scaled(actual, wanted, 1e-10, name)


def test_torchscript_gradients_match_torchvision():
    # Under TorchScript, gradients come from the grid_sample formulation.
    problem = make_problem(offset_groups=3, groups=2, integer_offsets=True, offset_scale=1.5)
    scripted = torch.jit.script(deform_conv2d)
    assert_outputs_and_grads_close(
        problem, forward_and_grads(scripted, problem), forward_and_grads(TV, problem), 1e-10
    )


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 1e30])
@pytest.mark.parametrize("inference", [True, False])
def test_non_finite_and_huge_offsets_sample_nothing(value, inference):
    problem = make_problem(offset_scale=0.0)
    problem.offset = torch.full_like(problem.offset, value)
    with torch.set_grad_enabled(not inference):
        tensors = [t.detach().clone().requires_grad_(not inference) for t in problem.tensors()]
        out = problem.call(deform_conv2d, tensors)
    assert torch.equal(out.detach(), problem.bias.view(1, -1, 1, 1).expand_as(out))
    if not inference:  # and no gradient reaches input, offset or mask (torchvision's is NaN)
        out.sum().backward()
        input, offset, _, _, mask = tensors
        for tensor in (input, offset, mask):
            assert torch.count_nonzero(tensor.grad) == 0


@pytest.mark.parametrize("groups", [1, 2])
def test_torchscript_of_functional_op(groups):
    # Inference under TorchScript runs the gather kernel, its grouped products included.
    problem = make_problem(groups=groups, offset_groups=3)
    scripted = torch.jit.script(deform_conv2d)
    assert_close_scaled(problem.call(scripted), problem.call(TV), 1e-10)


def test_import_without_torchvision():
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "import torch, deformcli\n"
        "x = torch.randn(1, 2, 5, 5); w = torch.randn(3, 2, 3, 3); off = torch.zeros(1, 18, 3, 3)\n"
        "print(tuple(deformcli.deform_conv2d(x, off, w).shape))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "(1, 3, 3, 3)"


def test_docstring_example_runs():
    import doctest

    finder = doctest.DocTestFinder()
    (test,) = finder.find(deform_conv2d, globs={"torch": torch, "deform_conv2d": deform_conv2d})
    results = doctest.DocTestRunner().run(test)
    assert results.attempted == 7 and results.failed == 0
