"""Shared test helpers: random problems, scale-aware comparisons, a code-running pickle, a tiny
model with deformable layers."""

import os
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from deformcli import DeformConv2d, deform_conv2d, get_max_column_bytes, set_max_column_bytes
from deformcli.families import mmcv

GEOMETRIES = {
    "plain": dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1)),
    "asymmetric": dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
}


def assert_close_scaled(actual: Tensor, expected: Tensor, tol: float, name: str = "") -> None:
    """``max |actual - expected| <= tol * max(1, max |expected|)`` (tolerance relative to scale)."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= tol * scale, f"{name}: max abs error {error:.3e} > {tol:.1e} * {scale:.3g}"


@dataclass
class Problem:
    input: Tensor
    offset: Tensor
    weight: Tensor
    bias: Tensor | None
    mask: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def tensors(self) -> list[Tensor]:
        return [
            t for t in (self.input, self.offset, self.weight, self.bias, self.mask) if t is not None
        ]

    def to(self, *args, **kwargs) -> "Problem":
        """A copy whose tensors are moved or cast by ``Tensor.to(*args, **kwargs)``."""
        names = ("input", "offset", "weight", "bias", "mask")
        tensors = {name: getattr(self, name) for name in names}
        return replace(
            self, **{name: t.to(*args, **kwargs) for name, t in tensors.items() if t is not None}
        )

    def call(self, op, tensors: list[Tensor] | None = None) -> Tensor:
        """Run ``op`` on this problem, optionally with replacement tensors (same order)."""
        values = iter(tensors if tensors is not None else self.tensors())
        input, offset, weight = next(values), next(values), next(values)
        bias = next(values) if self.bias is not None else None
        mask = next(values) if self.mask is not None else None
        return op(input, offset, weight, bias, self.stride, self.padding, self.dilation, mask)


def make_problem(
    batch: int = 2,
    in_channels: int = 12,
    out_channels: int = 8,
    size: tuple[int, int] = (7, 9),
    kernel: tuple[int, int] = (3, 3),
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    offset_groups: int = 1,
    with_mask: bool = True,
    with_bias: bool = True,
    offset_scale: float = 3.0,
    integer_offsets: bool = False,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
) -> Problem:
    """A random problem whose offsets (scale 3 by default) sample well outside the image."""
    kernel_h, kernel_w = kernel
    out_h = (size[0] + 2 * padding[0] - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
    out_w = (size[1] + 2 * padding[1] - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1
    points = offset_groups * kernel_h * kernel_w
    offset = torch.randn(batch, 2 * points, out_h, out_w, dtype=torch.float64) * offset_scale
    if integer_offsets:
        offset = offset.round()
    return Problem(
        input=torch.randn(batch, in_channels, *size, dtype=dtype, device=device),
        offset=offset.to(dtype=dtype, device=device),
        weight=torch.randn(
            out_channels, in_channels // groups, *kernel, dtype=dtype, device=device
        ),
        bias=torch.randn(out_channels, dtype=dtype, device=device) if with_bias else None,
        mask=torch.rand(batch, points, out_h, out_w, dtype=dtype, device=device)
        if with_mask
        else None,
        stride=stride,
        padding=padding,
        dilation=dilation,
    )


def forward_and_grads(op, problem: Problem, seed: int = 1) -> list[Tensor]:
    """Output followed by the gradient of every tensor argument for a fixed random upstream grad."""
    tensors = [t.detach().clone().requires_grad_() for t in problem.tensors()]
    out = problem.call(op, tensors)
    upstream = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    grads = torch.autograd.grad(out, tensors, upstream.to(out.dtype).to(out.device))
    return [out.detach(), *grads]


def names_for(problem: Problem) -> list[str]:
    names = ["output", "input", "offset", "weight"]
    if problem.bias is not None:
        names.append("bias")
    if problem.mask is not None:
        names.append("mask")
    return names


def assert_outputs_and_grads_close(
    problem: Problem, actual: list[Tensor], expected: list[Tensor], tol: float
) -> None:
    """Two :func:`forward_and_grads` results agree, each tensor named in the message."""
    for name, a, e in zip(names_for(problem), actual, expected, strict=True):
        assert_close_scaled(a, e, tol, name)


def check_against(op, problem, tol) -> None:
    """Output and all gradients (autograd path), and the output of the inference path."""
    expected = forward_and_grads(op, problem)
    actual = forward_and_grads(deform_conv2d, problem)
    assert_outputs_and_grads_close(problem, actual, expected, tol)
    with torch.no_grad():
        assert_close_scaled(problem.call(deform_conv2d), expected[0], tol, "inference output")


def check_gradcheck_and_gradgradcheck(device: str = "cpu") -> None:
    """``gradcheck`` and ``gradgradcheck`` of the op on a small float64 problem on ``device``."""
    problem = make_problem(
        batch=1,
        in_channels=4,
        out_channels=2,
        size=(4, 4),
        kernel=(2, 2),
        offset_groups=2,
        groups=2,
        offset_scale=1.5,
        device=device,
        **GEOMETRIES["asymmetric"],
    )
    tensors = [t.detach().clone().requires_grad_() for t in problem.tensors()]

    def op(*ts):
        return problem.call(deform_conv2d, list(ts))

    assert torch.autograd.gradcheck(op, tensors)
    assert torch.autograd.gradgradcheck(op, tensors)


def check_kept_sampling_points(reference, device: str = "cpu") -> None:
    """The grid_sample formulation keeps each layer shape's sampling points from its first
    call (:func:`check_kept_across_modes`). Sizes are powers of two, so training reuses the
    same points."""
    from deformcli.ops import _grid_sample

    problem = make_problem(size=(8, 4), device=device)
    check_kept_across_modes(reference, _grid_sample._cached_kernel_points, problem)


def check_kept_across_modes(reference, cache, problem: Problem) -> None:
    """``cache``, a ``functools.lru_cache`` of tensors kept per layer shape, filled first under
    inference_mode: they must still be ordinary tensors, which a later call's backward can
    save. Calls under inference_mode, with autograd and under no_grad match ``reference``, and
    one of them reuses what the first kept."""
    cache.cache_clear()
    with torch.inference_mode():
        first = problem.call(deform_conv2d)
    expected = forward_and_grads(reference, problem)
    assert_close_scaled(first, expected[0], 1e-10, "inference_mode output")
    assert_outputs_and_grads_close(
        problem, forward_and_grads(deform_conv2d, problem), expected, 1e-10
    )
    with torch.no_grad():
        assert_close_scaled(problem.call(deform_conv2d), expected[0], 1e-10, "no_grad output")
    assert cache.cache_info().hits >= 1


def check_chunked_columns(reference, problem: Problem, cap_bytes: int, monkeypatch) -> None:
    """Output (with and without autograd) and gradients equal ``reference``'s when the
    column-memory cap of the problem's device is ``cap_bytes``, with chunks as small as it
    allows."""
    from deformcli.ops import _chunking

    device_type = problem.input.device.type
    expected = forward_and_grads(reference, problem)
    previous = get_max_column_bytes(device_type)
    monkeypatch.setattr(_chunking, "_MIN_CHUNK_POSITIONS", 1)
    try:
        set_max_column_bytes(cap_bytes, device_type)
        with torch.no_grad():
            chunked = problem.call(deform_conv2d)
        actual = forward_and_grads(deform_conv2d, problem)
    finally:
        set_max_column_bytes(previous, device_type)
    assert_close_scaled(chunked, expected[0], 1e-10, "no_grad output")
    assert_outputs_and_grads_close(problem, actual, expected, 1e-10)


class RunsCode:
    """Unpickling this runs os.system: a loader that executes pickles would create ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TinyDCN(nn.Module):
    """A DCNv2 block (offset conv beside the layer), small enough to export in seconds."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.offset = nn.Conv2d(channels, 27, 3, padding=1)
        self.dcn = DeformConv2d(channels, channels, 3, padding=1)
        self.pack = mmcv.ModulatedDeformConv2dPack(
            channels, channels, 3, padding=1, deform_groups=2
        )
        with torch.no_grad():
            self.offset.weight.normal_(0, 0.2)
            self.pack.conv_offset.weight.normal_(0, 0.2)

    def forward(self, x):
        offset_mask = self.offset(x)
        x = self.dcn(x, offset_mask[:, :18], offset_mask[:, 18:].sigmoid())
        return self.pack(x)


def build_tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyDCN().eval()
