"""The command line, driven through Typer's runner (and once through the installed executable)."""

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from deformcli import __version__
from deformcli.cli import app
from deformcli.models.dbnet import build_dbnet
from deformcli.verify import ModelComparison
from tests.helpers import RunsCode

runner = CliRunner()
MODEL = "deformcli.models.dbnet:build_dbnet"
SMALL = ["--input-shape", "1,3,64,64"]


@pytest.fixture(scope="module")
def cuda_style_checkpoint(tmp_path_factory):
    """The example DBNet saved as a GPU training script would: torchvision layers, DataParallel."""
    path = tmp_path_factory.mktemp("ckpt") / "dbnet.pth"
    state = {f"module.{k}": v for k, v in build_dbnet("torchvision").state_dict().items()}
    torch.save({"epoch": 7, "state_dict": state}, path)
    return path


def _ok(result, code=0):
    assert result.exit_code == code, result.output
    return result


def test_version_and_help_with_examples():
    assert _ok(runner.invoke(app, ["--version"])).output.strip() == f"deformcli {__version__}"
    for command in ("inspect", "convert", "verify", "bench", "demo"):
        assert "Example" in _ok(runner.invoke(app, [command, "--help"])).output


def test_inspect_json(cuda_style_checkpoint):
    payload = json.loads(
        _ok(runner.invoke(app, ["inspect", str(cuda_style_checkpoint), "--json"])).output
    )
    assert len(payload["deformable_layers"]) == 6
    assert payload["notes"][1] == "stripped the 'module.' prefix (DataParallel/DDP) from every key"


def test_inspect_table(cuda_style_checkpoint):
    output = _ok(runner.invoke(app, ["inspect", str(cuda_style_checkpoint)])).output
    assert "6 deformable layer(s)" in output and "backbone.layer4.1.conv2" in output


def test_convert_with_model_verifies_and_writes_metadata(cuda_style_checkpoint, tmp_path):
    out = tmp_path / "dbnet.safetensors"
    result = _ok(
        runner.invoke(
            app,
            [
                "convert",
                str(cuda_style_checkpoint),
                "-o",
                str(out),
                "--model",
                MODEL,
                *SMALL,
                "--json",
            ],
        )
    )
    payload = json.loads(result.output)
    assert payload["verification"]["passed"] and payload["verification"]["max_rel"] < 1e-5
    assert len(payload["swapped"]) == 6 and len(payload["verification"]["layers"]) == 6
    with safe_open(str(out), "pt") as file:
        metadata = file.metadata()
        keys = set(file.keys())
    assert metadata["source_sha256"] == payload_sha(cuda_style_checkpoint)
    assert metadata["source_file"] == "dbnet.pth" and metadata["deformcli_version"] == __version__
    assert json.loads(metadata["verification"])["passed"]
    assert keys == set(build_dbnet("deformcli").state_dict())
    # The converted file loads strictly into a model built with our layers.
    from safetensors.torch import load_file

    build_dbnet("deformcli").load_state_dict(load_file(str(out)), strict=True)


def payload_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_convert_without_model_keeps_keys(cuda_style_checkpoint, tmp_path):
    out = tmp_path / "plain.safetensors"
    _ok(runner.invoke(app, ["convert", str(cuda_style_checkpoint), "-o", str(out)]))
    from safetensors.torch import load_file

    assert set(load_file(str(out))) == set(build_dbnet("torchvision").state_dict())
    refused = runner.invoke(app, ["convert", str(cuda_style_checkpoint), "-o", str(out)])
    assert refused.exit_code == 2 and "already exists; pass --force" in refused.output
    _ok(
        runner.invoke(
            app, ["convert", str(cuda_style_checkpoint), "-o", str(out), "--force", "--no-verify"]
        )
    )


def test_verification_failure_exits_1_and_writes_nothing(
    cuda_style_checkpoint, tmp_path, monkeypatch
):
    def failing(reference, converted, inputs, layer_paths, tolerance=1e-4):
        return ModelComparison(list(inputs.shape), 1.0, 1.0, tolerance)

    monkeypatch.setattr("deformcli.convert.compare_models", failing)
    out = tmp_path / "never.safetensors"
    result = runner.invoke(
        app, ["convert", str(cuda_style_checkpoint), "-o", str(out), "--model", MODEL, *SMALL]
    )
    assert result.exit_code == 1 and "FAILED" in result.output and not out.exists()
    forced = runner.invoke(
        app,
        [
            "convert",
            str(cuda_style_checkpoint),
            "-o",
            str(out),
            "--model",
            MODEL,
            *SMALL,
            "--force",
        ],
    )
    assert forced.exit_code == 1 and out.exists()


MODEL_FILES = {
    "returns_int.py": "def build():\n    return 3\n",
    "needs_compiled_op.py": "import deformcli_missing_extension\n",
    "small_model.py": textwrap.dedent(
        """
        import torch.nn as nn
        def build():
            return nn.Sequential(nn.Conv2d(3, 4, 3))
        """
    ),
}


def _bad_inputs(tmp: Path, checkpoint: Path) -> dict:
    marker = tmp / "pickle-ran"
    cases = {}
    cases["missing file"] = ([str(tmp / "nope.pth")], "no such file")
    cases["directory"] = ([str(tmp)], "is a directory")
    (tmp / "empty.pth").write_bytes(b"")
    cases["empty file"] = ([str(tmp / "empty.pth")], "file is empty")
    data = checkpoint.read_bytes()
    (tmp / "cut.pth").write_bytes(data[: len(data) // 3])
    cases["truncated zip"] = ([str(tmp / "cut.pth")], "truncated or corrupt|could not be read")
    (tmp / "noise.pth").write_bytes(os.urandom(512))
    cases["random bytes"] = ([str(tmp / "noise.pth")], "not a checkpoint: neither a torch file")
    torch.save(RunsCode(marker), tmp / "evil.pth", _use_new_zipfile_serialization=False)
    cases["code-running pickle"] = ([str(tmp / "evil.pth")], "--trust-pickle")
    with open(tmp / "plain.pth", "wb") as file:
        pickle.dump(RunsCode(marker), file)
    cases["plain pickle"] = ([str(tmp / "plain.pth")], "plain Python pickle")
    torch.save({"epoch": 1, "history": [1.0]}, tmp / "odd.pth")
    cases["unknown layout"] = ([str(tmp / "odd.pth")], "unknown checkpoint layout")
    cases["model not importable"] = (
        [str(checkpoint), "--model", "no_such_pkg.models:build"],
        "cannot import 'no_such_pkg.models'",
    )
    cases["model import fails"] = (
        [str(checkpoint), "--model", "needs_compiled_op:build"],
        "ModuleNotFoundError",
    )
    cases["model is not a module"] = (
        [str(checkpoint), "--model", "returns_int:build"],
        "returned int, not a torch.nn.Module",
    )
    cases["bad model spec"] = (
        [str(checkpoint), "--model", "just_a_module"],
        "expected 'package.module:factory'",
    )
    cases["missing and unexpected keys"] = (
        [str(checkpoint), "--model", "small_model:build"],
        r"missing keys \(0.bias, 0.weight\).*unexpected keys",
    )
    cases["wrong input shape"] = (
        [str(checkpoint), "--model", MODEL, "--input-shape", "1,5,64,64"],
        r"failed in backbone.conv1 \(Conv2d\) on an input of shape \[1, 5, 64, 64\]"
        r".*input shape right",
    )
    cases["malformed input shape"] = (
        [str(checkpoint), "--input-shape", "1,3,a"],
        "expected 4 integers",
    )
    cases["bad kwargs"] = (
        [str(checkpoint), "--model", MODEL, "--model-kwargs", "{nope"],
        "not valid JSON",
    )
    return cases, marker


def test_bad_input_gets_one_message_exit_2_and_no_output(
    cuda_style_checkpoint, tmp_path, monkeypatch
):
    for name, text in MODEL_FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases, marker = _bad_inputs(inputs, cuda_style_checkpoint)
    for name, (args, pattern) in cases.items():
        out = tmp_path / "out.safetensors"
        result = runner.invoke(app, ["convert", *args, "-o", str(out)])
        assert result.exit_code == 2, f"{name}: {result.output}"
        assert "Traceback" not in result.output, name
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines[0].startswith("error: "), f"{name}: {result.output}"
        assert re.search(pattern, " ".join(result.output.split())), f"{name}: {result.output}"
        assert not out.exists(), name
        assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == [], name
    assert not marker.exists()


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    result = runner.invoke(app, ["--debug", "inspect", str(tmp_path / "missing.pth")])
    assert result.exit_code == 2
    assert "Traceback" in result.output and "CheckpointError" in result.output


def test_verify_conformance_suite():
    payload = json.loads(_ok(runner.invoke(app, ["verify", "--json"])).output)
    assert payload["passed"] and len(payload["cases"]) >= 16
    assert {case["dtype"] for case in payload["cases"]} == {"float64", "float32"}


def test_verify_converted_file(cuda_style_checkpoint, tmp_path):
    out = tmp_path / "c.safetensors"
    _ok(runner.invoke(app, ["convert", str(cuda_style_checkpoint), "-o", str(out), "--no-verify"]))
    payload = json.loads(
        _ok(runner.invoke(app, ["verify", str(out), "--model", MODEL, *SMALL, "--json"])).output
    )
    assert payload["passed"]
    assert _ok(runner.invoke(app, ["verify", str(out)]), 2).output.startswith(
        "error: verify PATH needs --model"
    )


def test_bench_layer_json():
    rows = json.loads(
        _ok(runner.invoke(app, ["bench", "--shape", "1,8,16,16", "--rounds", "1", "--json"])).output
    )
    assert rows[0]["shape"] == [1, 8, 16, 16] and rows[0]["deformcli_ms"] > 0
    assert rows[0]["speedup_vs_torchvision"] == rows[0]["torchvision_ms"] / rows[0]["deformcli_ms"]
    assert _ok(runner.invoke(app, ["bench", "--preset", "nope"]), 2).output.startswith(
        "error: --preset"
    )
    assert rows[0]["channels_last"] is False
    args = ["bench", "--shape", "1,8,16,16", "--rounds", "1", "--channels-last", "--json"]
    assert json.loads(_ok(runner.invoke(app, args)).output)[0]["channels_last"] is True


def test_bench_groups():
    args = ["bench", "--shape", "1,8,16,16", "--rounds", "1", "--groups", "4", "--json"]
    row = json.loads(_ok(runner.invoke(app, args)).output)[0]
    assert row["groups"] == 4 and row["deformcli_ms"] > 0 and row["dense_ms"] > 0
    args[args.index("4")] = "3"
    assert json.loads(_ok(runner.invoke(app, args), 2).output) == {
        "error": "layer shape [1, 8, 16, 16]: its 8 channels do not split into 3 groups",
        "exit_code": 2,
    }
    result = runner.invoke(app, ["bench", "--preset", "dbnet", "--groups", "2"])
    assert _ok(result, 2).output.startswith("error: groups=2: conv groups apply to single layers")


def test_demo(tmp_path):
    payload = json.loads(
        _ok(runner.invoke(app, ["demo", "--out-dir", str(tmp_path), "--json"])).output
    )
    assert payload["layers_found"] == 6 and payload["conversion"]["verification"]["passed"]
    assert Path(payload["conversion"]["output"]).exists() and Path(payload["checkpoint"]).exists()


def test_installed_executable(cuda_style_checkpoint):
    executable = Path(sys.executable).parent / "deformcli"
    result = subprocess.run(
        [str(executable), "inspect", str(cuda_style_checkpoint), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(json.loads(result.stdout)["deformable_layers"]) == 6
    missing = subprocess.run(
        [str(executable), "inspect", "/nonexistent/x.pth"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and missing.stderr.startswith(
        "error: /nonexistent/x.pth: no such file"
    )
    assert "Traceback" not in missing.stderr


def test_inspect_whole_pickled_model_by_class(tmp_path):
    import torchvision

    path = tmp_path / "whole.pth"
    torch.save(torch.nn.Sequential(torchvision.ops.DeformConv2d(4, 4, 3)), path)
    refused = runner.invoke(app, ["inspect", str(path)])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output
    payload = json.loads(
        _ok(runner.invoke(app, ["inspect", str(path), "--trust-pickle", "--json"])).output
    )
    assert [(layer["name"], layer["family"]) for layer in payload["deformable_layers"]] == [
        ("0", "torchvision.ops.deform_conv.DeformConv2d")
    ]


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "chart.png"
    _ok(runner.invoke(app, ["bench", "--shape", "1,8,16,16", "--rounds", "1", "--plot", str(out)]))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = runner.invoke(
        app,
        [
            "bench",
            "--shape",
            "1,8,16,16",
            "--rounds",
            "1",
            "--plot",
            str(tmp_path / "no" / "c.png"),
        ],
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output
