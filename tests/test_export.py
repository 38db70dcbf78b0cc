"""deformcli.export: ONNX graphs checked in onnxruntime, from a model or from a checkpoint."""

import json

import pytest
import torch
from typer.testing import CliRunner

import deformcli.export
from deformcli.cli import app
from deformcli.errors import DeformcliError
from deformcli.export import ExportError, export_checkpoint
from deformcli.output_file import OutputExistsError
from tests.helpers import build_tiny


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
    (tmp_path / "tiny_model.py").write_text("from tests.helpers import build_tiny\n")
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


@pytest.fixture
def tiny_checkpoint(tmp_path, monkeypatch):
    """A DataParallel-style checkpoint of the tiny model, and its factory importable by name."""
    (tmp_path / "tiny_model.py").write_text("from tests.helpers import build_tiny\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "tiny.pth"
    torch.save({f"module.{k}": v for k, v in build_tiny(1).state_dict().items()}, path)
    return path


def test_export_checkpoint_checks_two_shapes_in_onnxruntime(tiny_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "tiny.onnx"
    result = export_checkpoint(tiny_checkpoint, out, "tiny_model:build_tiny", None, (1, 8, 16, 16))
    assert result.output == out and out.exists() and result.graph == "standard"
    # A batch of 1 is exported at 2 (torch.export fixes sizes 0 and 1); the second shape differs.
    assert result.checked_shapes == [[2, 8, 16, 16], [1, 8, 48, 80]]
    assert 0 < result.onnxruntime_max_abs_error <= 1e-4
    assert result.to_dict()["dynamic_axes"] == ["batch", "height", "width"]
    with pytest.raises(OutputExistsError):
        export_checkpoint(tiny_checkpoint, out, "tiny_model:build_tiny", None, (2, 8, 16, 16))


def test_an_export_that_differs_from_pytorch_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(deformcli.export, "onnxruntime_max_error", lambda *args: 0.5)
    out = tmp_path / "tiny.onnx"
    with pytest.raises(ExportError, match=r"differs from PyTorch by 5\.00e-01 \(> 0\.0001\)"):
        export_checkpoint(tiny_checkpoint, out, "tiny_model:build_tiny", None, (2, 8, 16, 16))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny.pth", "tiny_model.py"]


@pytest.mark.parametrize(
    ("input_shape", "graph", "message"),
    [
        ((2, 8, 16), "standard", r"input shape \[2, 8, 16\]: expected N,C,H,W"),
        ((2, 8, 16, 16), "fancy", "graph 'fancy': choose from standard, native"),
        ((2, 5, 16, 16), "standard", "the model"),
    ],
)
def test_export_checkpoint_bad_input(tiny_checkpoint, tmp_path, input_shape, graph, message):
    with pytest.raises(DeformcliError, match=message):
        export_checkpoint(
            tiny_checkpoint, tmp_path / "t.onnx", "tiny_model:build_tiny", None, input_shape, graph
        )
    assert not (tmp_path / "t.onnx").exists()
