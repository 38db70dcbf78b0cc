"""The CPU gather formulation (deformcli.ops._gather): its table, its index types, and that
eager CPU calls take it (tests/ops/test_deform_conv.py runs the whole op on both formulations)."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import deformcli.ops._gather
from deformcli import deform_conv2d
from deformcli.ops._checks import Geometry
from deformcli.ops._gather import (
    _corner_products,
    _gather_table,
    _IndexKey,
    _table_band,
    _weighted_row_scatter,
    _weighted_row_sums,
)
from tests.helpers import (
    assert_close_scaled,
    assert_outputs_and_grads_close,
    check_kept_across_modes,
    forward_and_grads,
    make_problem,
    names_for,
)

TV = torchvision.ops.deform_conv2d


def test_cpu_eager_samples_without_grid_sample(monkeypatch):
    # On CPU, eager sampling is the channels-last gather, with and without autograd; only
    # TorchScript and torch.compile with gradients fall back to grid_sample. A silent fallback
    # would keep the numbers and lose the speed.
    problem = make_problem()
    expected = forward_and_grads(TV, problem)
    calls = []
    grid_sample = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda *a, **k: calls.append(1) or grid_sample(*a, **k))
    with torch.no_grad():
        assert_close_scaled(problem.call(deform_conv2d), expected[0], 1e-10)
    assert_outputs_and_grads_close(
        problem, forward_and_grads(deform_conv2d, problem), expected, 1e-10
    )
    assert not calls


def _spy_on_onednn(monkeypatch) -> list[tuple[int, ...]]:
    """Record the shape of each product sent to oneDNN."""
    calls: list[tuple[int, ...]] = []
    onednn_linear = deformcli.ops._gather._onednn_linear

    def spy(left, right):
        calls.append((*left.shape, right.shape[0]))
        return onednn_linear(left, right)

    monkeypatch.setattr(deformcli.ops._gather, "_onednn_linear", spy)
    return calls


@pytest.mark.skipif(
    not deformcli.ops._gather._ONEDNN_LINEAR_BUILT, reason="torch without oneDNN's x86 GEMM"
)
@pytest.mark.parametrize("groups", [1, 4])
def test_float32_products_run_on_onednn_forward_and_backward(monkeypatch, groups):
    # float32 GEMMs go to oneDNN (10-25% faster than torch.mm's MKL), one per conv group: the
    # product, the columns' gradient (a transposed weight) and the weight's (both operands
    # transposed). Each is checked against torchvision in float64 on the same values.
    shape = {"in_channels": 16, "out_channels": 8, "size": (9, 11), "groups": groups}
    problem = make_problem(**shape)
    expected = forward_and_grads(TV, problem)
    low = problem.to(torch.float32)
    calls = _spy_on_onednn(monkeypatch)
    with torch.no_grad():
        out = low.call(deform_conv2d)
    positions, depth, group_out = 2 * 9 * 11, 9 * 16 // groups, 8 // groups
    assert calls == [(positions, depth, group_out)] * groups
    assert_close_scaled(out.double(), expected[0], 1e-5, "inference output")
    calls.clear()
    actual = forward_and_grads(deform_conv2d, low)
    for name, got, wanted in zip(names_for(problem), actual, expected, strict=True):
        assert got.dtype == torch.float32, name
        assert_close_scaled(got.double(), wanted, 1e-5, name)
    # The product, then the backward's: the weight's gradient, then the columns'.
    assert calls == (
        [(positions, depth, group_out)] * groups
        + [(group_out, positions, depth)] * groups
        + [(positions, group_out, depth)] * groups
    )


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # raised by flags()
def test_float32_without_onednn_uses_torch_mm(monkeypatch):
    # With oneDNN disabled (torch.backends.mkldnn.flags), and under autograd through the
    # product (double backward), the products are torch.mm's, with the same numbers.
    problem = make_problem(dtype=torch.float32)
    calls = _spy_on_onednn(monkeypatch)
    with torch.backends.mkldnn.flags(enabled=False):
        actual = forward_and_grads(deform_conv2d, problem)
    assert not calls
    expected = forward_and_grads(TV, problem)
    assert_outputs_and_grads_close(problem, actual, expected, 1e-5)
    tensors = [t.detach().clone().requires_grad_() for t in problem.tensors()]
    (grad_input,) = torch.autograd.grad(
        problem.call(deform_conv2d, tensors).sum(), tensors[0], create_graph=True
    )
    calls.clear()
    (grad_weight,) = torch.autograd.grad(grad_input.square().sum(), tensors[2])
    assert not calls
    assert grad_weight.abs().sum() > 0


def test_products_off_the_cpu_use_torch_mm(monkeypatch):
    # oneDNN's linear op takes CPU tensors only; the helper stays correct on other devices.
    calls = _spy_on_onednn(monkeypatch)
    left, right = torch.empty(3, 4, device="meta"), torch.empty(5, 4, device="meta")
    assert deformcli.ops._gather._matmul_transposed(left, right).shape == (3, 5)
    assert not calls


def test_sampling_index_is_kept_per_layer_shape_and_usable_with_autograd(monkeypatch):
    # Made under inference_mode, the kept index must still be made of ordinary tensors, which
    # a later call that autograd records can use; compiled calls make their own.
    cached = deformcli.ops._gather._cached_sampling_index
    problem = make_problem(offset_groups=2)
    check_kept_across_modes(TV, cached, problem)
    # Inference calls share one index; autograd's samples points at exactly -1 too (another).
    assert cached.cache_info().currsize == 2
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert_close_scaled(problem.call(deform_conv2d), problem.call(TV), 1e-10, "compiling")
    assert cached.cache_info().currsize == 2
    geometry = Geometry((1, 1), (1, 1), (1, 1), 1, 1, 3, 3)
    key = _IndexKey(
        1, 3, 3, geometry, (3, 3), torch.float64, torch.int32, torch.device("cpu"), False
    )
    with torch.inference_mode():
        index = deformcli.ops._gather._kept_sampling_index(key)
    assert not any(t.is_inference() for t in index if isinstance(t, torch.Tensor))


def test_inference_path_with_int64_indices(monkeypatch):
    # Tables beyond 2**31 rows switch to int64 indices; force the switch on a small problem.
    assert deformcli.ops._gather._index_dtype(2**31 - 1) == torch.int32
    assert deformcli.ops._gather._index_dtype(2**31) == torch.int64
    monkeypatch.setattr(deformcli.ops._gather, "_index_dtype", lambda rows: torch.int64)
    problem = make_problem(batch=3, groups=2, offset_groups=3)
    with torch.no_grad():
        assert_close_scaled(problem.call(deform_conv2d), problem.call(TV), 1e-10)


def test_inference_points_on_minus_one_never_read_the_border():
    # torchvision's forward gives a point at y == -1 or x == -1 no value at all, so an infinite
    # pixel in row or column 0 must not leak in through a zero interpolation weight. (With
    # autograd, under torchvision's convention, such a point is sampled with weight zero on
    # row 0: its one-sided offset gradient at y == -1 needs row 0.)
    problem = make_problem(kernel=(1, 1), padding=(0, 0), offset_scale=0.0, with_mask=False)
    _, _, out_h, out_w = problem.offset.shape
    rows = torch.arange(out_h, dtype=torch.float64).view(1, out_h, 1)
    cols = torch.arange(out_w, dtype=torch.float64).view(1, 1, out_w)
    offset = problem.offset.view(-1, 2, out_h, out_w)
    offset[:, 0] = -1 - rows  # y == -1 exactly
    offset[:, 1] = 3 - cols  # x == 3, inside
    problem.input[:, :, 0, :] = float("inf")
    problem.input[:, :, :, 3] = float("inf")
    expected = problem.call(TV)
    assert torch.isfinite(expected).all()
    with torch.no_grad():
        assert torch.equal(problem.call(deform_conv2d), expected)


@pytest.mark.parametrize("offset_groups", [1, 2])
def test_gather_table_rows_are_pixels_of_the_zero_framed_image(offset_groups):
    input = torch.randn(2, 4, 3, 5)
    table = _gather_table(input, offset_groups, torch.float64)
    group_channels = 4 // offset_groups
    assert table.shape == (2 * 5 * 7 * offset_groups, group_channels)
    assert table.dtype == torch.float64
    framed = table.view(2, 5, 7, 4)
    assert torch.equal(framed[:, 1:-1, 1:-1], input.permute(0, 2, 3, 1).double())
    assert torch.count_nonzero(table[0]) == 0  # outside points read row 0
    framed = framed.clone()
    framed[:, 1:-1, 1:-1] = 0
    assert torch.count_nonzero(framed) == 0  # the frame is zeros


def test_row_scatter_and_corner_products_are_the_row_sums_gradients():
    # The backward's two kernels against autograd through embedding_bag: the table gradient
    # (rows read by many corners, by none, and row 0) and the corner weights' gradient.
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(30, 5, dtype=torch.float64, generator=generator).requires_grad_()
    index = torch.randint(0, 20, (40, 4), generator=generator)
    index[:5] = 0
    weights = torch.rand(40, 4, dtype=torch.float64, generator=generator).requires_grad_()
    values = torch.randn(40, 5, dtype=torch.float64, generator=generator)
    grad_table, grad_weights = torch.autograd.grad(
        _weighted_row_sums(table, index, weights), [table, weights], values
    )
    scattered = _weighted_row_scatter(index, weights.detach(), values, 30)
    assert_close_scaled(scattered, grad_table, 1e-12)
    assert torch.count_nonzero(scattered[20:]) == 0
    assert_close_scaled(_corner_products(table.detach(), index, values), grad_weights, 1e-12)


def test_table_band_starts_at_a_zero_frame_pixel_and_skips_row_zero():
    # Rows 0 (points outside) are left out; the band starts where a framed image row starts,
    # whose first pixel is a frame pixel (a zero row standing in for row 0).
    index = torch.tensor([[0, 0, 0, 0], [23, 24, 30, 31], [45, 46, 52, 53]])
    assert _table_band(index, 7) == (21, 54)
    assert _table_band(torch.zeros(3, 4, dtype=torch.long), 7) == (0, 1)
    assert _table_band(torch.zeros(0, 4, dtype=torch.long), 7) == (0, 1)
