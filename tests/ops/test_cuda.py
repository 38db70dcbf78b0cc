"""deform_conv2d on CUDA against torchvision's CUDA kernel (the grid_sample formulation).

Skipped without a GPU; ``bash benchmarks/gpu_check.sh`` runs them with the GPU benchmark.
"""

import random

import pytest
import torch
import torchvision

from deformcli import deform_conv2d
from deformcli.ops import deform_conv2d_mmcv_grad
from tests.helpers import (
    GEOMETRIES,
    assert_close_scaled,
    assert_outputs_and_grads_close,
    check_against,
    check_chunked_columns,
    check_gradcheck_and_gradgradcheck,
    check_kept_sampling_points,
    forward_and_grads,
    make_problem,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

TV = torchvision.ops.deform_conv2d


def _random_configurations(count: int, seed: int = 0) -> list[dict]:
    """Problems over every argument at once: kernel, both group kinds, geometry, batch, size,
    mask and bias. in_channels=12, out_channels=8 divide every group count drawn."""
    draw = random.Random(seed)
    configurations = []
    for _ in range(count):
        configurations.append(
            dict(
                batch=draw.randint(1, 3),
                size=(draw.randint(9, 14), draw.randint(9, 14)),
                kernel=draw.choice([(3, 3), (3, 2), (1, 1), (5, 5), (2, 4)]),
                groups=draw.choice([1, 2, 4]),
                offset_groups=draw.choice([1, 2, 3, 4]),
                stride=(draw.randint(1, 2), draw.randint(1, 2)),
                padding=(draw.randint(0, 2), draw.randint(0, 2)),
                dilation=(draw.randint(1, 2), draw.randint(1, 2)),
                with_mask=draw.random() < 0.7,
                with_bias=draw.random() < 0.7,
            )
        )
    return configurations


CONFIGURATIONS = _random_configurations(40)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("configuration", CONFIGURATIONS, ids=lambda c: str(sorted(c.items())))
def test_random_configurations_match_torchvision_cuda(configuration, dtype):
    problem = make_problem(dtype=dtype, device="cuda", **configuration)
    check_against(TV, problem, 1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_integer_offsets_match_torchvision_cuda_gradients(geometry):
    # Exact grid points, many on the border: the one-sided offset gradient survives the
    # normalisation of grid_sample's coordinates only because the image is padded to 2**k.
    problem = make_problem(
        device="cuda", integer_offsets=True, offset_scale=1.5, **GEOMETRIES[geometry]
    )
    check_against(TV, problem, 1e-10)


def test_mmcv_offset_gradient_on_cuda_equals_cpu():
    problem = make_problem(integer_offsets=True, offset_scale=1.5, groups=2, offset_groups=3)
    on_cuda = problem.to("cuda")
    expected = forward_and_grads(deform_conv2d_mmcv_grad, problem)
    actual = [t.cpu() for t in forward_and_grads(deform_conv2d_mmcv_grad, on_cuda)]
    assert_outputs_and_grads_close(problem, actual, expected, 1e-10)


def test_kept_sampling_points_serve_inference_then_training():
    check_kept_sampling_points(TV, "cuda")


@pytest.mark.parametrize("rows_per_chunk", [1, 3])
def test_chunked_columns_on_cuda(monkeypatch, rows_per_chunk):
    problem = make_problem(device="cuda", size=(40, 24), groups=2, offset_groups=3)
    bytes_per_row = 2 * 12 * 9 * 24 * problem.input.element_size()  # N * C_in * K * W_out * 8
    check_chunked_columns(TV, problem, rows_per_chunk * bytes_per_row, monkeypatch)


@pytest.mark.skipif(
    torch.__version__ < "2.13", reason="grid_sample's double backward needs torch >= 2.13"
)
def test_gradcheck_and_gradgradcheck_on_cuda():
    check_gradcheck_and_gradgradcheck("cuda")


def test_large_image_float32_error_is_torchvisions():
    # On a 1000x1400 image the normalised coordinates are large: our float32 error against a
    # float64 truth must stay of the order of torchvision's own float32 error.
    problem = make_problem(
        batch=1, in_channels=8, out_channels=8, size=(1000, 1400), offset_scale=5.0, device="cuda"
    )
    truth = problem.call(TV)
    low = [t.float() for t in problem.tensors()]
    ours = (problem.call(deform_conv2d, low).double() - truth).abs().max().item()
    theirs = (problem.call(TV, low).double() - truth).abs().max().item()
    assert ours <= 2 * theirs, f"ours {ours:.2e}, torchvision {theirs:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_matches_torchvision(dtype):
    problem = make_problem(dtype=torch.float32, device="cuda", in_channels=16, out_channels=16)
    tensors = [t.detach().clone().requires_grad_() for t in problem.tensors()]
    with torch.autocast("cuda", dtype=dtype):
        ours = problem.call(deform_conv2d, tensors)
        theirs = problem.call(TV, [t.detach() for t in tensors])
    reference = problem.call(TV)  # float32 reference
    assert_close_scaled(ours.float(), reference, 2e-2 * 16**0.5)
    assert_close_scaled(theirs.float(), reference, 2e-2 * 16**0.5)
    ours.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in tensors)
