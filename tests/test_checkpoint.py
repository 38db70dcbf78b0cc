"""Checkpoint I/O: safe loading, unwrapping, detection, atomic safetensors writing."""

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from torch import nn

from deformcli.checkpoint import (
    PickledObjectsError,
    find_deformable_layers,
    load_checkpoint,
    save_safetensors,
)
from deformcli.errors import CheckpointError
from deformcli.families import mmcv
from deformcli.models.dbnet import build_dbnet
from deformcli.output_file import OutputError, OutputExistsError
from tests.helpers import RunsCode


@pytest.fixture(scope="module")
def dbnet_state():
    return build_dbnet("torchvision").state_dict()


def test_unwraps_containers_and_dataparallel_prefix(tmp_path, dbnet_state):
    path = tmp_path / "train.pth"
    wrapped = {f"module.{k}": v for k, v in dbnet_state.items()}
    torch.save({"epoch": 3, "state_dict": wrapped, "optimizer": {"lr": 0.1}}, path)
    loaded = load_checkpoint(path)
    assert loaded.state_dict.keys() == dbnet_state.keys()
    assert loaded.format == "torch zip"
    assert loaded.notes == [
        "unwrapped the weights under 'state_dict'",
        "stripped the 'module.' prefix (DataParallel/DDP) from every key",
    ]


@pytest.mark.parametrize("container", ["model", "net", "params", "ema", "model_state_dict"])
def test_other_container_keys(tmp_path, container):
    path = tmp_path / "c.pt"
    torch.save({container: {"w": torch.ones(2)}, "step": 1}, path)
    assert list(load_checkpoint(path).state_dict) == ["w"]


def test_legacy_format_and_safetensors(tmp_path):
    legacy = tmp_path / "old.pth"
    torch.save({"w": torch.arange(3.0)}, legacy, _use_new_zipfile_serialization=False)
    assert load_checkpoint(legacy).format == "torch legacy"
    out = save_safetensors({"w": torch.arange(3.0)}, tmp_path / "w.safetensors", {"k": "v"})
    loaded = load_checkpoint(out)
    assert loaded.format == "safetensors" and torch.equal(loaded.state_dict["w"], torch.arange(3.0))


def test_unpickles_no_code_by_default(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    # A torch file (legacy format) whose pickle names a global: a pickle of objects.
    torch.save({"state_dict": RunsCode(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(PickledObjectsError, match=r"pickled Python objects.*weights-only load"):
        load_checkpoint(path)
    # A plain pickle is not a torch checkpoint at all: trusting it could only run its code.
    plain = tmp_path / "plain.pth"
    for protocol in (2, pickle.DEFAULT_PROTOCOL):
        plain.write_bytes(pickle.dumps({"state_dict": RunsCode(marker)}, protocol=protocol))
        with pytest.raises(CheckpointError, match="plain Python pickle") as error:
            load_checkpoint(plain, trust_pickle=True)
        assert not isinstance(error.value, PickledObjectsError)
    assert not marker.exists()


def test_whole_pickled_model_needs_trust(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(nn.Sequential(nn.Conv2d(2, 2, 1)), path)
    pattern = r"pickled Python objects.*GLOBAL torch\.nn\.modules\.container\.Sequential"
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(path)
    loaded = load_checkpoint(path, trust_pickle=True)
    assert isinstance(loaded.module, nn.Sequential)
    assert set(loaded.state_dict) == {"0.weight", "0.bias"}


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b""), r"file is empty \(0 bytes"),
        (
            lambda p: p.write_bytes(os.urandom(256)),
            r"not a checkpoint: neither a torch file \(zip or pickle\) nor safetensors",
        ),
        (
            lambda p: torch.save({"epoch": 1, "losses": [0.1]}, p),
            "unknown checkpoint layout.*'epoch': int",
        ),
        (lambda p: torch.save([torch.ones(1)], p), "expected a state_dict .* found list"),
    ],
)
def test_bad_files(tmp_path, make, pattern):
    path = tmp_path / "bad.pth"
    make(path)
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(path)


def test_truncated_zip(tmp_path, dbnet_state):
    path = tmp_path / "cut.pth"
    torch.save(dbnet_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt|could not be read"):
        load_checkpoint(path)


def test_finds_deformable_layers_of_each_layout(dbnet_state):
    layers = find_deformable_layers(dbnet_state)
    assert [layer.name for layer in layers] == [
        f"backbone.layer{stage}.{block}.conv2" for stage in (2, 3, 4) for block in (0, 1)
    ]
    assert {layer.kind for layer in layers} == {"DCNv2"}
    assert layers[0].family == "DB-style" and layers[0].weight_shape == [
        128,
        128,
        3,
        3,
    ]
    packed = nn.Module()
    packed.v2 = mmcv.ModulatedDeformConv2dPack(4, 4, 3)
    packed.v1 = mmcv.DeformConv2dPack(4, 4, (3, 1))
    # 3 * 2 * 9 = 54 offset channels is also 2 * 3 * 9: the tensors alone cannot tell.
    packed.ambiguous = mmcv.ModulatedDeformConv2dPack(4, 4, 3, deform_groups=2)
    found = {layer.name: layer for layer in find_deformable_layers(packed.state_dict())}
    assert (found["v2"].kind, found["v2"].offset_groups) == ("DCNv2", 1)
    assert found["ambiguous"].kind == "DCNv1/DCNv2"
    assert (found["v1"].kind, found["v1"].offset_groups) == ("DCNv1", 1)
    assert found["v1"].family == "mmcv/BasicSR Pack"


def test_records_the_device_tensors_were_saved_on(tmp_path, monkeypatch):
    path = tmp_path / "cuda.pth"
    torch.save({"w": torch.ones(2)}, path)
    real_load = torch.load

    def load_as_if_saved_on_cuda(*args, map_location, **kwargs):
        def relocate(storage, _location):
            return map_location(storage, "cuda:0")

        return real_load(*args, map_location=relocate, **kwargs)

    monkeypatch.setattr(torch, "load", load_as_if_saved_on_cuda)
    assert load_checkpoint(path).saved_devices == {"w": "cuda:0"}


def test_save_refuses_overwrite_and_input_and_handles_shared_tensors(tmp_path):
    shared = torch.arange(6.0)
    state = {"a": shared, "b": shared, "c": shared[:3]}
    out = save_safetensors(state, tmp_path / "o.safetensors", {"layers": [1, 2]})
    with safe_open(str(out), "pt") as file:
        assert json.loads(file.metadata()["layers"]) == [1, 2]
        assert torch.equal(file.get_tensor("c"), torch.arange(3.0))
    with pytest.raises(OutputExistsError, match=r"already exists$"):
        save_safetensors(state, out, {})
    save_safetensors(state, out, {}, force=True)
    source = tmp_path / "in.safetensors"
    source.write_bytes(out.read_bytes())
    with pytest.raises(OutputError, match=r"is the input .*; refusing to overwrite it"):
        save_safetensors(state, source, {}, force=True, protect=(source,))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses non-tensors
        save_safetensors({"a": "not a tensor"}, tmp_path / "x.safetensors", {})
    assert list(tmp_path.iterdir()) == []


def test_a_legacy_file_declaring_more_tensor_bytes_than_it_holds_is_refused(tmp_path):
    # torch's legacy loader would allocate what the pickle declares before reading anything.
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(1000, 1000)}, path, _use_new_zipfile_serialization=False)
    assert load_checkpoint(path).state_dict["w"].shape == (1000, 1000)
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"declares 4,000,000 bytes of tensor data in a "):
        load_checkpoint(path)
