"""Deployment paths of models with deformcli layers: torch.compile, torch.export, TorchScript
(ONNX export is tests/test_export.py)."""

import torch

from deformcli import DeformConv2d, swap
from deformcli.models.dbnet import build_dbnet
from tests.helpers import assert_close_scaled, build_tiny


def test_torch_compile_fullgraph_matches_eager():
    model = build_dbnet("deformcli")
    x = torch.randn(1, 3, 64, 96)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
    with torch.no_grad():
        assert_close_scaled(compiled(x), model(x), 1e-5)


def test_torch_compile_backward_matches_eager():
    model = build_tiny()
    x = torch.randn(2, 8, 10, 12, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    (eager_grad,) = torch.autograd.grad(model(x).sum(), x)
    (compiled_grad,) = torch.autograd.grad(compiled(x).sum(), x)
    assert_close_scaled(compiled_grad, eager_grad, 1e-5)


def test_torch_export_dynamic_batch_height_width():
    model = build_dbnet("deformcli")
    batch, height, width = (
        torch.export.Dim("batch", max=64),
        torch.export.Dim("h", max=64),
        torch.export.Dim("w", max=64),
    )
    program = torch.export.export(
        model,
        (torch.randn(2, 3, 64, 96),),
        dynamic_shapes=({0: batch, 2: 32 * height, 3: 32 * width},),
    )
    for shape in [(1, 3, 64, 64), (3, 3, 96, 160)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert_close_scaled(program.module()(x), model(x), 1e-5)


def test_torchscript_of_a_model_with_our_layers():
    layer = DeformConv2d(4, 4, 3, padding=1)
    scripted = torch.jit.script(layer)
    x, offset = torch.randn(2, 4, 7, 7), torch.randn(2, 18, 7, 7)
    assert_close_scaled(scripted(x, offset), layer(x, offset), 1e-6)


def test_swapped_torchvision_model_compiles():
    model = build_dbnet("torchvision")
    swap(model)
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert_close_scaled(torch.compile(model, fullgraph=True)(x), model(x), 1e-5)
