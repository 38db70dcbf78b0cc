"""DeformConv2d: a drop-in for torchvision.ops.DeformConv2d."""

import pytest
import torch
import torchvision

from deformcli import DeformConv2d
from tests.helpers import assert_close_scaled

CONFIGS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(
        in_channels=6,
        out_channels=4,
        kernel_size=(3, 2),
        stride=(2, 1),
        padding=(1, 0),
        dilation=(2, 1),
        groups=2,
        bias=False,
    ),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_same_parameters_and_initialisation(config):
    torch.manual_seed(3)
    theirs = torchvision.ops.DeformConv2d(**config)
    torch.manual_seed(3)
    ours = DeformConv2d(**config)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [
        (n, p.shape) for n, p in theirs.named_parameters()
    ]
    for (_, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b)
    assert repr(ours).replace("deformcli.", "") == repr(theirs).replace("torchvision.ops.", "")


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_round_trips_strictly(config):
    theirs = torchvision.ops.DeformConv2d(**config)
    ours = DeformConv2d(**config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = torchvision.ops.DeformConv2d(**config)
    back.load_state_dict(ours.state_dict(), strict=True)

    x = torch.randn(2, config["in_channels"], 7, 8)
    kh, kw = theirs.weight.shape[2:]
    probe = torch.nn.functional.conv2d(
        x, theirs.weight, None, theirs.stride, theirs.padding, theirs.dilation, theirs.groups
    )
    out_h, out_w = probe.shape[2:]
    offset = torch.randn(2, 2 * 2 * kh * kw, out_h, out_w)
    mask = torch.rand(2, 2 * kh * kw, out_h, out_w)
    expected = theirs(x, offset, mask)
    assert_close_scaled(ours(x, offset, mask), expected, 1e-5)
    assert_close_scaled(back(x, offset, mask), expected, 1e-5)


def test_constructor_rejects_bad_groups():
    with pytest.raises(ValueError, match=r"in_channels \(5\) must be divisible by groups \(2\)"):
        DeformConv2d(5, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"out_channels \(5\) must be divisible by groups \(2\)"):
        DeformConv2d(4, 5, 3, groups=2)


def test_torchscript_module():
    layer = DeformConv2d(4, 6, 3, padding=1)
    scripted = torch.jit.script(layer)
    x = torch.randn(1, 4, 5, 5)
    offset = torch.randn(1, 18, 5, 5)
    assert_close_scaled(scripted(x, offset), layer(x, offset), 1e-6)
