"""deformcli.models.dbnet: the example DBNet, built three ways with the same weights."""

import pytest
import torch
import torchvision
from torch import nn

from deformcli import DeformConv2d
from deformcli.models.dbnet import build_dbnet
from tests.helpers import assert_close_scaled


def _deformable_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name.endswith("conv2")]


@pytest.mark.parametrize(
    ("deform_layer", "layer_type"),
    [("torchvision", torchvision.ops.DeformConv2d), ("deformcli", DeformConv2d)],
)
def test_stages_two_to_four_are_deformable_with_db_key_names(deform_layer, layer_type):
    model = build_dbnet(deform_layer)
    layers = dict(model.named_modules())
    deformable = [
        name for name in _deformable_layers(model) if isinstance(layers[name], layer_type)
    ]
    assert deformable == [
        f"backbone.layer{stage}.{block}.conv2" for stage in (2, 3, 4) for block in (0, 1)
    ]
    assert isinstance(layers["backbone.layer1.0.conv2"], nn.Conv2d)
    # DB's layout: a 27-channel offset-and-mask conv beside each deformable conv2.
    assert layers["backbone.layer2.0.conv2_offset"].out_channels == 27
    assert not model.training


def test_torchvision_and_deformcli_builds_share_weights_and_outputs():
    original, ours = build_dbnet("torchvision"), build_dbnet("deformcli")
    assert original.state_dict().keys() == ours.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (2, 1, 64, 96) and ((out >= 0) & (out <= 1)).all()
        assert_close_scaled(out, original(x), 1e-5)


def test_seeded_offsets_are_not_trivial_and_the_global_generator_is_untouched():
    state = torch.random.get_rng_state()
    model = build_dbnet("deformcli", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.backbone.layer2[0].conv2_offset.bias.abs().mean() > 0.5  # pixels, not zeros
    again = build_dbnet("deformcli", seed=3)
    pairs = zip(model.parameters(), again.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_dense_build_has_no_deformable_layers():
    model = build_dbnet("dense")
    assert not any(name.endswith("conv2_offset") for name, _ in model.named_modules())
    assert all(type(model.get_submodule(name)) is nn.Conv2d for name in _deformable_layers(model))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_unknown_deform_layer():
    with pytest.raises(ValueError, match="'deformcli', 'torchvision' or 'dense', got 'mmcv'"):
        build_dbnet("mmcv")
