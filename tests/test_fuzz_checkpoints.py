"""Fuzzing `inspect` and `convert` with corrupted checkpoints (hypothesis).

Every run, whatever the mutation: exit code 0, 1 or 2; no traceback; nothing under the output
name unless the exit code is 0; no temporary files left; the input file unchanged.
"""

import io
import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors_bytes
from typer.testing import CliRunner

from deformcli.cli import app

runner = CliRunner()


def _state_dict(name: str = "block.conv2") -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        f"{name}.weight": torch.randn(4, 4, 3, 3, generator=generator),
        f"{name}_offset.weight": torch.randn(27, 4, 3, 3, generator=generator) * 0.1,
        f"{name}_offset.bias": torch.zeros(27),
        "head.weight": torch.randn(2, 4, 1, 1, generator=generator),
    }


def _torch_bytes(obj, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _recursive() -> bytes:
    container: dict = {}
    container["state_dict"] = {"model": container}
    return _torch_bytes(container)


def _huge_safetensors() -> bytes:
    """A safetensors header that declares a tensor far larger than the file."""
    header = json.dumps(
        {"w.weight": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + bytes(16)


BASES = {
    "zip": _torch_bytes({"state_dict": _state_dict()}),
    "legacy": _torch_bytes({"model": _state_dict()}, legacy=True),
    "safetensors": save_safetensors_bytes(_state_dict()),
    "markup keys": _torch_bytes(_state_dict("x[dim].[/]conv")),
    "recursive": _recursive(),
    "huge shape": _huge_safetensors(),
}


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    base = draw(st.sampled_from(sorted(BASES)))
    data = bytearray(BASES[base])
    mutation = draw(st.sampled_from(["none", "truncate", "flip", "reorder", "splice"]))
    if mutation == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "flip":
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= draw(st.integers(1, 255))
    elif mutation == "reorder":
        cut = draw(st.integers(1, len(data) - 1))
        data = data[cut:] + data[:cut]
    elif mutation == "splice":
        position = draw(st.integers(0, len(data)))
        data[position:position] = draw(st.binary(min_size=1, max_size=64))
    return f"{base}, {mutation}", bytes(data)


FILE_NAMES = st.sampled_from(["model.pth", "final", "[red]model[final].pth", "m.safetensors"])


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=mutated(), name=FILE_NAMES, command=st.sampled_from(["inspect", "convert"]))
def test_corrupted_checkpoints_never_crash_or_leave_files(case, name, command):
    label, data = case
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        source = root / name
        source.write_bytes(data)
        output = root / "out.safetensors"
        args = [command, str(source)] + (["-o", str(output)] if command == "convert" else [])
        result = runner.invoke(app, args)
        context = f"{label}, {name}, {command}: exit {result.exit_code}\n{result.output}"
        assert result.exit_code in (0, 1, 2), context
        assert "Traceback" not in result.output, context
        if result.exit_code != 0:
            assert not output.exists(), context
        assert sorted(p.name for p in root.iterdir()) == sorted(
            {name} | ({"out.safetensors"} if output.exists() else set())
        ), context
        assert source.read_bytes() == data, context
