"""The command line under hostile and careless use: broken models never pass, bad input is one
line with exit 2, nothing is overwritten or half-written, no pickled code runs."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from deformcli.cli import app
from deformcli.models.dbnet import build_dbnet

runner = CliRunner()
MODEL = "deformcli.models.dbnet:build_dbnet"
SMALL = ["--input-shape", "1,3,64,64"]
EXECUTABLE = str(Path(sys.executable).parent / "deformcli")


@pytest.fixture(scope="module")
def state_dict():
    return build_dbnet("torchvision").state_dict()


@pytest.fixture
def checkpoint(tmp_path, state_dict):
    path = tmp_path / "model.pth"
    torch.save({"state_dict": state_dict}, path)
    return path


def one_line_error(result, code=2):
    """Exit ``code``, no traceback, and the first line an error."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert text.startswith("error: "), result.output
    return text


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------ verification cannot pass


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_fail_verification_naming_the_tensor(tmp_path, state_dict, value):
    broken = dict(state_dict)
    broken["backbone.layer2.0.conv2_offset.weight"] = broken[
        "backbone.layer2.0.conv2_offset.weight"
    ].clone()
    broken["backbone.layer2.0.conv2_offset.weight"][0, 0, 0, 0] = value
    source = tmp_path / "broken.pth"
    torch.save(broken, source)
    out = tmp_path / "out.safetensors"
    result = invoke("convert", source, "--model", MODEL, *SMALL, "-o", out)
    assert result.exit_code == 1, result.output
    assert "backbone.layer2.0.conv2_offset.weight (1 " in " ".join(result.output.split())
    assert "FAILED" in result.output and not out.exists()
    # The same file verified against the model: a failure, not a crash.
    verified = invoke("verify", source, "--model", MODEL, *SMALL, "--json")
    assert verified.exit_code == 1
    assert any("conv2_offset.weight" in p for p in json.loads(verified.output)["problems"])


def test_non_finite_input_and_offsets_never_reach_torchvision(tmp_path, checkpoint):
    # torchvision's CPU kernel reads out of bounds on NaN offsets (SIGSEGV): run in a process.
    nan_input = tmp_path / "nan.pt"
    torch.save(torch.full((1, 3, 64, 64), float("nan")), nan_input)
    command = [EXECUTABLE, "convert", str(checkpoint), "--model", MODEL, "--input", str(nan_input)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "the input (12288 NaN)" in " ".join(result.stdout.split())
    # Finite weights whose offsets overflow: the reference stops before the kernel.
    huge = tmp_path / "huge.pt"
    torch.save(torch.full((1, 3, 64, 64), 3e38), huge)
    command[-1] = str(huge)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    text = " ".join(result.stdout.split())
    assert re.search(r"problem: backbone\.layer\d\.\d\.conv2 \(DeformConv2d\): the offset", text)
    assert "torchvision's kernel was not run on them" in text


# ------------------------------------------------------------------------ reading checkpoints


def test_a_self_referencing_container_is_refused_quickly(tmp_path):
    container = {}
    container["model"] = container
    torch.save(container, tmp_path / "loop.pth")
    text = one_line_error(invoke("inspect", tmp_path / "loop.pth"))
    assert "containers nest in a cycle under 'model'" in text


def test_the_format_comes_from_the_content_not_the_name(tmp_path):
    save_file({"conv.weight": torch.ones(2, 2, 3, 3)}, tmp_path / "named.pth")
    payload = json.loads(invoke("inspect", tmp_path / "named.pth", "--json").output)
    assert payload["format"] == "safetensors"
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(300))
    text = one_line_error(invoke("inspect", tmp_path / "noise.safetensors"))
    assert "not a checkpoint" in text and "--trust-pickle" not in text
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pth")
    text = one_line_error(invoke("verify", tmp_path / "whole.pth", "--model", MODEL))
    assert "GLOBAL torch.nn.modules.linear.Linear" in text and "pass --trust-pickle" in text


def test_a_flipped_byte_in_a_zip_member_is_found(tmp_path, checkpoint):
    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as archive:
        member = next(m for m in archive.infolist() if "/data/" in m.filename)
    # The member's data starts after its local header (30 bytes + name + extra).
    with open(checkpoint, "rb") as file:
        file.seek(member.header_offset + 26)
        name_length, extra_length = (int.from_bytes(file.read(2), "little") for _ in range(2))
    data[member.header_offset + 30 + name_length + extra_length + 5] ^= 0xFF
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(bytes(data))
    text = one_line_error(invoke("convert", corrupt, "-o", tmp_path / "o.safetensors"))
    assert f"member {member.filename!r} is corrupt" in text
    assert not (tmp_path / "o.safetensors").exists()


def test_messages_name_the_entry_the_key_and_the_file(tmp_path, checkpoint, state_dict):
    torch.save({**dict(list(state_dict.items())[:3]), "epoch": 3}, tmp_path / "mixed.pth")
    assert "'epoch' (int)" in one_line_error(invoke("inspect", tmp_path / "mixed.pth"))
    resized = dict(state_dict)
    resized["backbone.conv1.weight"] = torch.zeros(2, 3, 7, 7)
    torch.save(resized, tmp_path / "resized.pth")
    text = one_line_error(invoke("convert", tmp_path / "resized.pth", "--model", MODEL, *SMALL))
    assert "backbone.conv1.weight: checkpoint [2, 3, 7, 7], model [64, 3, 7, 7]" in text
    (tmp_path / "text.pt").write_text("101 102 103\n")
    text = one_line_error(
        invoke("convert", checkpoint, "--model", MODEL, "--input", tmp_path / "text.pt")
    )
    assert "text.pt: not a checkpoint" in text
    os.mkfifo(tmp_path / "fifo.pth")
    assert "not a regular file" in one_line_error(invoke("inspect", tmp_path / "fifo.pth"))


def test_an_offset_conv_of_the_wrong_width_is_described(tmp_path):
    weights = {
        "conv2.weight": torch.ones(4, 4, 3, 3),
        "conv2_offset.weight": torch.ones(20, 4, 3, 3),
    }
    torch.save(weights, tmp_path / "near.pth")
    text = " ".join(invoke("inspect", tmp_path / "near.pth").output.split())
    assert "conv2_offset beside conv2 has 20 output channels, not a multiple of" in text


def test_export_of_a_model_that_cannot_take_the_input_is_one_line(tmp_path, checkpoint):
    text = one_line_error(
        invoke(
            "export",
            checkpoint,
            "--model",
            MODEL,
            "--input-shape",
            "2,5,64,64",
            "-o",
            tmp_path / "m.onnx",
        )
    )
    assert "failed in backbone.conv1 (Conv2d)" in text and not (tmp_path / "m.onnx").exists()


def test_verify_takes_a_saved_input(tmp_path, checkpoint):
    torch.save(torch.randn(1, 3, 48, 64), tmp_path / "x.pt")
    result = invoke("verify", checkpoint, "--model", MODEL, "--input", tmp_path / "x.pt", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["input_shape"] == [1, 3, 48, 64]


def test_half_precision_output_is_verified_in_float32(tmp_path, checkpoint):
    out = tmp_path / "half.safetensors"
    result = invoke(
        "convert", checkpoint, "--model", MODEL, *SMALL, "--dtype", "bfloat16", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert "verified in float32" in " ".join(result.output.split())
    from safetensors import safe_open

    with safe_open(str(out), "pt") as file:
        assert file.get_tensor("backbone.conv1.weight").dtype == torch.bfloat16


# ------------------------------------------------------------------------ writing outputs


def test_the_input_is_never_the_output_and_it_is_refused_before_any_work(tmp_path, checkpoint):
    before = checkpoint.read_bytes()
    link = tmp_path / "link.pth"
    os.link(checkpoint, link)
    for output in (checkpoint, link):
        for command in (["convert", checkpoint], ["export", checkpoint, "--model", MODEL]):
            text = one_line_error(invoke(*command, "-o", output, "--force"))
            assert "is the input" in text
    assert checkpoint.read_bytes() == before


def test_special_files_and_links_at_the_output_are_never_replaced(tmp_path, checkpoint):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in one_line_error(
        invoke("convert", checkpoint, "-o", fifo, "--force")
    )
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "elsewhere")
    assert "symbolic link" in one_line_error(invoke("convert", checkpoint, "-o", dangling))
    assert dangling.is_symlink() and not (tmp_path / "elsewhere").exists()


def test_outputs_honour_the_umask(tmp_path, checkpoint):
    previous = os.umask(0o027)
    try:
        assert invoke("convert", checkpoint, "-o", tmp_path / "o.safetensors").exit_code == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "o.safetensors").stat().st_mode) == 0o640


def test_sigterm_during_convert_leaves_nothing(tmp_path, checkpoint):
    process = subprocess.Popen(
        [EXECUTABLE, "convert", str(checkpoint), "--model", MODEL, "--input-shape", "1,3,640,640"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        process.wait(timeout=3)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert process.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]


# ------------------------------------------------------------------- crashes and messages


def test_markup_in_file_names_and_keys_is_printed_as_is(tmp_path, state_dict):
    (tmp_path / "x[").mkdir()
    odd = tmp_path / "x[/].pth"  # as typed on the command line: 'x[/].pth'
    torch.save(
        {"x[dim].weight": torch.ones(4, 4, 3, 3), "x[dim]_offset.weight": torch.ones(18, 4, 3, 3)},
        odd,
    )
    result = invoke("inspect", odd)
    assert result.exit_code == 0, result.output
    assert "x[/].pth" in result.output and "x[dim]" in result.output
    named = tmp_path / "model[final].pth"
    torch.save(state_dict, named)
    result = invoke("convert", named, "-o", tmp_path / "o[1].safetensors")
    assert result.exit_code == 0 and "o[1].safetensors" in result.output


def test_unusable_weights_are_named_not_crashed_on(tmp_path):
    weights = {
        "empty.weight": torch.ones(4, 4, 0, 0),
        "empty_offset.weight": torch.ones(18, 4, 0, 0),
        "bad.weight": torch.ones(4, 4, 3, 3),
        "bad.bias": torch.ones(5),
        "bad_offset.weight": torch.ones(27, 4, 3, 3),
    }
    torch.save(weights, tmp_path / "odd.pth")
    assert invoke("inspect", tmp_path / "odd.pth").exit_code == 0
    result = invoke("convert", tmp_path / "odd.pth", "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 1, result.output
    assert "bad.bias: shape [5] does not fit bad.weight" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("3,64,64", "expected 4 sizes"),
        ("1,3,100000000000000000000,3", "every size must be between 1 and"),
        ("1,3,100000,100000", "more than a quarter of this machine's memory"),
        ("1,3,0,64", "every size must be between 1 and"),
    ],
)
def test_sample_shapes_are_checked_before_allocating(checkpoint, shape, message):
    text = one_line_error(invoke("convert", checkpoint, "--model", MODEL, "--input-shape", shape))
    assert message in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "bogus"], "not a device torch knows"),
        (["--device", "cuda:7"], "cuda:7"),
        (["--dtype", "int32"], "choose from float32"),
        (["--shape", "1,200000,8,8"], "memory"),
    ],
)
def test_bench_arguments(args, message):
    assert message in one_line_error(invoke("bench", *args))


def test_a_plot_that_cannot_be_written_is_refused_before_timing(tmp_path):
    (tmp_path / "chart.png").write_bytes(b"mine")
    text = one_line_error(invoke("bench", "--plot", tmp_path / "chart.png", "--rounds", "99"))
    assert "already exists; pass --force" in text
    assert (tmp_path / "chart.png").read_bytes() == b"mine"


def test_user_code_that_exits_or_breaks(tmp_path, checkpoint, monkeypatch):
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    text = one_line_error(invoke("convert", checkpoint, "--model", "exits:build"))
    assert "it called sys.exit(0)" in text
    sys.modules.pop("exits", None)


def test_unexpected_errors_are_one_line_with_exit_3(checkpoint, monkeypatch):
    import deformcli.checkpoint

    def broken(*args, **kwargs):
        raise ValueError("a bug in deformcli")

    monkeypatch.setattr(deformcli.checkpoint, "sha256_of", broken)
    text = one_line_error(invoke("inspect", checkpoint), code=3)
    assert "internal error: ValueError: a bug in deformcli (rerun with --debug" in text
    payload = json.loads(invoke("inspect", checkpoint, "--json").output)
    assert payload["exit_code"] == 3 and "a bug in deformcli" in payload["error"]


def test_debug_anywhere_keeps_the_exit_code_and_json_errors(tmp_path):
    missing = str(tmp_path / "missing.pth")
    result = subprocess.run(
        [EXECUTABLE, "inspect", missing, "--debug"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "no such file" in result.stderr
    result = subprocess.run(
        [EXECUTABLE, "inspect", missing, "--json"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert json.loads(result.stdout) == {"error": f"{missing}: no such file", "exit_code": 2}


def test_help_shows_flags_without_type_placeholders():
    for command in ("inspect", "convert", "verify", "bench", "export", "demo"):
        text = invoke(command, "--help").output
        assert "<bool>" not in text and "--json" in text, command


def test_inspect_table_is_not_cut_when_piped(tmp_path):
    name = "backbone." + "very_long_module_name." * 4 + "conv2"
    torch.save(
        {
            f"{name}.weight": torch.ones(4, 4, 3, 3),
            f"{name}_offset.weight": torch.ones(27, 4, 3, 3),
        },
        tmp_path / "long.pth",
    )
    result = subprocess.run(
        [EXECUTABLE, "inspect", str(tmp_path / "long.pth")], capture_output=True, text=True
    )
    assert name in result.stdout and "saved on" in result.stdout
