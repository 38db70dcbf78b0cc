"""deformcli.swap and convert_layer on whole models (per-family cases: tests/families)."""

import pytest
import torch
import torchvision
from torch import nn

from deformcli import DeformConv2d, convert_layer, swap
from deformcli.families import legacy_dcn
from tests.families.standins import DB
from tests.helpers import assert_close_scaled


class DBBlock(nn.Module):
    """DB's BasicBlock with modulated DCN (backbones/resnet.py), built with the original layer."""

    def __init__(self, planes: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2_offset = nn.Conv2d(planes, 27, kernel_size=3, padding=1)
        self.conv2 = DB["ModulatedDeformConv"](
            planes, planes, kernel_size=3, padding=1, deformable_groups=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        offset_mask = self.conv2_offset(out)
        out = self.conv2(out, offset_mask[:, :18], offset_mask[:, -9:].sigmoid())
        return torch.relu(self.bn2(out) + x)


def test_swap_db_block():
    block = DBBlock().eval()
    with torch.no_grad():
        block.conv2_offset.weight.normal_(0, 0.1)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    x = torch.randn(2, 8, 12, 10)
    expected = block(x)
    report = swap(block)
    assert [(r.path, r.swapped) for r in report] == [("conv2", True)]
    assert type(block.conv2) is legacy_dcn.ModulatedDeformConv
    assert_close_scaled(block(x), expected, 1e-5)
    # The swapped model loads the original checkpoint strictly, and its state_dict is the same.
    block.load_state_dict(state, strict=True)
    assert block.state_dict().keys() == state.keys()


def test_swap_torchvision_layers_by_identity():
    model = nn.Sequential(torchvision.ops.DeformConv2d(4, 4, 3, padding=1)).train()
    report = swap(model)
    assert report[0].source == "torchvision.ops.deform_conv.DeformConv2d"
    assert type(model[0]) is DeformConv2d and model[0].training


def test_swap_reports_nothing_for_a_plain_model():
    assert swap(nn.Sequential(nn.Conv2d(3, 3, 3))) == []


def test_swap_of_a_bare_layer_points_to_convert_layer():
    layer = torchvision.ops.DeformConv2d(4, 4, 3)
    with pytest.raises(ValueError, match=r"use deformcli\.convert_layer"):
        swap(layer)
    assert type(convert_layer(layer)) is DeformConv2d


def test_convert_layer_rejects_unknown_and_mismatched_layers():
    with pytest.raises(ValueError, match="is not a recognised deformable layer"):
        convert_layer(nn.Conv2d(3, 3, 3))
    odd = DB["ModulatedDeformConv"](4, 4, 3)
    odd.extra = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="do not match"):
        convert_layer(odd)
