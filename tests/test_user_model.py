"""deformcli.user_model as a library: building the user's model, fitting weights, loading."""

import sys

import pytest
import torch
import torchvision
from torch import nn

import deformcli
from deformcli import shims
from deformcli.checkpoint import save_safetensors
from deformcli.errors import ModelError
from deformcli.families._base import DeformableConvBase
from deformcli.families.mmcv import ModulatedDeformConv2dPack
from deformcli.user_model import build_model, build_network, fit_state_dict, load_model, user_code
from tests.helpers import assert_close_scaled


class _Block(nn.Module):
    """A training-time block: an offset conv beside torchvision's layer."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.offset = nn.Conv2d(channels, 18, 3, padding=1)
        self.dcn = torchvision.ops.DeformConv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.dcn(x, self.offset(x))


def _build_block(channels: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return _Block(channels)


def _build_pack() -> nn.Module:
    return nn.Sequential(ModulatedDeformConv2dPack(4, 4, 3, padding=1))


def test_build_model_calls_the_factory_with_keyword_arguments():
    as_text = build_model(_build_block, '{"channels": 6}')
    as_dict = build_model(_build_block, {"channels": 6})
    assert as_text.dcn.weight.shape == as_dict.dcn.weight.shape == (6, 6, 3, 3)
    assert build_model(_build_block, "  ").dcn.weight.shape == (4, 4, 3, 3)


def test_build_model_tells_each_family_layer_its_path():
    model = build_model(_build_pack)
    (layer,) = [m for m in model.modules() if isinstance(m, DeformableConvBase)]
    assert layer.layer_path == "0"


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        ("no_colon", None, "'no_colon': expected 'package.module:factory'"),
        ("no_such_module_xyz:build", None, "cannot import 'no_such_module_xyz'"),
        ("deformcli:no_such_factory", None, "deformcli has no callable 'no_such_factory'"),
        (_build_block, "{not json", "model keyword arguments are not valid JSON"),
        (_build_block, "[1, 2]", "must be a JSON object, got list"),
        (_build_block, {"width": 3}, "calling _build_block(**{'width': 3}) failed: TypeError"),
        (lambda: 3, None, "returned int, not a torch.nn.Module"),
    ],
)
def test_build_model_errors_name_the_factory_and_the_problem(factory, kwargs, message):
    with pytest.raises(ModelError) as raised:
        build_model(factory, kwargs)
    assert message in str(raised.value)


def test_a_factory_that_exits_is_an_error_not_an_exit():
    def exits():
        sys.exit(4)

    with pytest.raises(ModelError, match=r"it called sys\.exit\(4\)"):
        build_model(exits)


@pytest.mark.parametrize(("factory", "config"), [(None, None), (_build_block, "model.py")])
def test_build_network_takes_a_factory_or_a_config(factory, config):
    with pytest.raises(ModelError, match="either a model factory or an mmengine config"):
        build_network(factory, config=config)


def test_user_code_shims_and_current_directory_only_inside():
    was_installed = shims.is_installed()
    had_cwd = "" in sys.path or "." in sys.path
    with user_code():
        assert shims.is_installed()
        assert "" in sys.path or "." in sys.path
        from mmcv.ops import ModulatedDeformConv2dPack as Shimmed

        assert Shimmed is ModulatedDeformConv2dPack
    assert shims.is_installed() == was_installed
    assert ("" in sys.path or "." in sys.path) == had_cwd


def test_fit_state_dict_strips_trainer_prefixes_and_loads_strictly():
    source, target = _build_block(), _Block()
    wrapped = {f"model.module.{key}": value for key, value in source.state_dict().items()}
    keys, notes = fit_state_dict(target, wrapped)
    assert notes == [
        "stripped the 'model.' prefix to match the model's keys",
        "stripped the 'module.' prefix to match the model's keys",
    ]
    assert set(keys) == set(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_fit_state_dict_lists_what_does_not_fit():
    state = _build_block().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["offset.bias"]
    state["dcn.weight"] = torch.zeros(4, 4, 5, 5)
    with pytest.raises(ModelError) as raised:
        fit_state_dict(_Block(), state)
    assert str(raised.value) == (
        "the checkpoint does not fit the model: 1 missing keys (offset.bias); 1 unexpected keys "
        "(extra.weight); 1 tensors of another shape (dcn.weight: checkpoint [4, 4, 5, 5], model "
        "[4, 4, 3, 3])"
    )


def test_load_model_swaps_in_deformcli_layers_with_the_file_weights(tmp_path):
    original = _build_block().eval()
    path = save_safetensors(
        {f"module.{key}": value for key, value in original.state_dict().items()},
        tmp_path / "block.safetensors",
        {},
    )
    loaded = load_model(path, _Block)
    assert isinstance(loaded.dcn, deformcli.DeformConv2d) and not loaded.training
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        assert_close_scaled(loaded(x), original(x), 1e-5)
