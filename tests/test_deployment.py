"""Deployment paths: torch.compile, torch.export, ONNX in onnxruntime, TorchScript."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from deformcli import DeformConv2d, swap
from deformcli.cli import app
from deformcli.families import mmcv
from deformcli.models.dbnet import build_dbnet
from tests.helpers import assert_close_scaled


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


@pytest.mark.parametrize("graph", ["standard", "native"])
def test_onnx_export_runs_in_onnxruntime(graph, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from deformcli.export import export_onnx, onnxruntime_max_error

    model = build_tiny()
    path = export_onnx(model, torch.randn(2, 8, 16, 16), tmp_path / "tiny.onnx", graph=graph)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    if graph == "native":
        assert "DeformConv" in ops and "GridSample" not in ops
    else:
        assert "GridSample" in ops and "DeformConv" not in ops
    inputs = [torch.randn(1, 8, 16, 16), torch.randn(3, 8, 21, 13)]
    assert onnxruntime_max_error(path, model, inputs) <= 1e-4


def test_export_command(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    (tmp_path / "tiny_model.py").write_text("from tests.test_deployment import build_tiny\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = tmp_path / "tiny.pth"
    torch.save(
        {"model": {f"module.{k}": v for k, v in build_tiny(1).state_dict().items()}}, checkpoint
    )
    out = tmp_path / "tiny.onnx"
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(checkpoint),
            "--model",
            "tiny_model:build_tiny",
            "-o",
            str(out),
            "--input-shape",
            "2,8,16,16",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert out.exists() and report["onnxruntime_max_abs_error"] <= 1e-4
    again = CliRunner().invoke(
        app, ["export", str(checkpoint), "--model", "tiny_model:build_tiny", "-o", str(out)]
    )
    assert again.exit_code == 2 and "already exists; pass --force" in " ".join(again.output.split())


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


class TwoHeads(torch.nn.Module):
    """CenterNet's output shape: a list holding a dict of heads."""

    def __init__(self):
        super().__init__()
        self.body = build_tiny()
        self.wh = torch.nn.Conv2d(8, 2, 1)

    def forward(self, x):
        features = self.body(x)
        return [{"hm": features.sigmoid(), "wh": self.wh(features)}]


def test_onnx_check_compares_every_output(tmp_path):
    pytest.importorskip("onnxruntime")
    from deformcli.export import export_onnx, onnxruntime_max_error

    model = TwoHeads().eval()
    path = export_onnx(model, torch.randn(2, 8, 16, 16), tmp_path / "heads.onnx")
    assert onnxruntime_max_error(path, model, [torch.randn(1, 8, 16, 16)]) <= 1e-4
    with torch.no_grad():
        model.wh.bias.add_(1.0)  # PyTorch now differs from the exported graph in one head only
    assert onnxruntime_max_error(path, model, [torch.randn(1, 8, 16, 16)]) >= 0.99
