"""Every family module against a stand-in of the original: names, shapes, strict loading both
ways, outputs, and surgery of a model holding it."""

import pytest
import torch
from torch import nn

from deformcli import swap
from deformcli.families import basicsr, db, legacy_dcn, mmcv
from tests.families.standins import BASICSR, DB, MMCV
from tests.helpers import assert_close_scaled

IN, OUT, SIZE = 4, 6, (9, 7)
ARGS = dict(
    in_channels=IN, out_channels=OUT, kernel_size=3, stride=1, padding=1, dilation=1, groups=2
)

# (stand-in class, our class, extra constructor kwargs, how forward is called)
CASES = {
    "mmcv.DeformConv2d": (MMCV["DeformConv2d"], mmcv.DeformConv2d, dict(deform_groups=2), "offset"),
    "mmcv.DeformConv2dPack": (
        MMCV["DeformConv2dPack"],
        mmcv.DeformConv2dPack,
        dict(deform_groups=2),
        "pack",
    ),
    "mmcv.ModulatedDeformConv2d": (
        MMCV["ModulatedDeformConv2d"],
        mmcv.ModulatedDeformConv2d,
        dict(deform_groups=2),
        "mask",
    ),
    "mmcv.ModulatedDeformConv2dPack": (
        MMCV["ModulatedDeformConv2dPack"],
        mmcv.ModulatedDeformConv2dPack,
        dict(deform_groups=2, bias=False),
        "pack",
    ),
    **{
        f"{family}.{name}": (
            standins[name],
            getattr(ours, name),
            dict(deformable_groups=2),
            kind,
        )
        for family, standins, ours in (("db", DB, db), ("basicsr", BASICSR, legacy_dcn))
        for name, kind in (
            ("DeformConv", "offset"),
            ("DeformConvPack", "pack"),
            ("ModulatedDeformConv", "mask"),
            ("ModulatedDeformConvPack", "pack"),
        )
    },
    "basicsr.DCNv2Pack": (
        BASICSR["DCNv2Pack"],
        basicsr.DCNv2Pack,
        dict(deformable_groups=2),
        "feat",
    ),
}


def _randomise(module: nn.Module) -> None:
    # Non-zero offsets (conv_offset is zero-initialised in the originals) and bias.
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)


def _call(module: nn.Module, kind: str, x: torch.Tensor, offset_groups: int = 2) -> torch.Tensor:
    points = offset_groups * 9
    generator = torch.Generator().manual_seed(7)
    offset = (torch.randn(x.shape[0], 2 * points, *SIZE, generator=generator) * 2).to(x.dtype)
    mask = torch.rand(x.shape[0], points, *SIZE, generator=generator).to(x.dtype)
    if kind == "offset":
        return module(x, offset)
    if kind == "mask":
        return module(x, offset, mask)
    if kind == "pack":
        return module(x)
    return module(x, x.flip(-1))  # DCNv2Pack: offsets from a second feature map


@pytest.mark.parametrize("case", list(CASES))
def test_names_shapes_and_strict_loading_both_ways(case):
    standin_cls, ours_cls, extra, kind = CASES[case]
    original = standin_cls(**ARGS, **extra)
    _randomise(original)
    ours = ours_cls(**ARGS, **extra)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in original.state_dict().items()
    }
    ours.load_state_dict(original.state_dict(), strict=True)
    back = standin_cls(**ARGS, **extra)
    back.load_state_dict(ours.state_dict(), strict=True)

    x = torch.randn(2, IN, *SIZE)
    expected = _call(original, kind, x)
    assert_close_scaled(_call(ours, kind, x), expected, 1e-5, case)
    assert_close_scaled(_call(back, kind, x), expected, 1e-5, case)


@pytest.mark.parametrize("case", list(CASES))
def test_swap_in_a_model_keeps_outputs_dtype_and_mode(case):
    standin_cls, ours_cls, extra, kind = CASES[case]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(IN, IN, 1)
            self.blocks = nn.Sequential(nn.Identity(), standin_cls(**ARGS, **extra))
            self.heads = nn.ModuleDict({"a": nn.ModuleList([standin_cls(**ARGS, **extra)])})

        def forward(self, x):
            x = self.stem(x)
            return _call(self.blocks[1], kind, x) + _call(self.heads["a"][0], kind, x)

    model = Model().double().eval()
    _randomise(model)
    x = torch.randn(2, IN, *SIZE, dtype=torch.float64)
    expected = model(x)
    report = swap(model)
    assert [(r.path, r.target) for r in report] == [
        ("blocks.1", f"{ours_cls.__module__}.{ours_cls.__qualname__}"),
        ("heads.a.0", f"{ours_cls.__module__}.{ours_cls.__qualname__}"),
    ]
    assert all(r.swapped and r.source.endswith(standin_cls.__name__) for r in report)
    assert type(model.blocks[1]) is ours_cls and type(model.heads["a"][0]) is ours_cls
    assert not model.blocks[1].training and model.blocks[1].weight.dtype == torch.float64
    assert_close_scaled(model(x), expected, 1e-10, case)


def test_swap_leaves_subclasses_alone_and_says_why():
    class Custom(MMCV["ModulatedDeformConv2dPack"]):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Custom(**ARGS))
    report = swap(model)
    assert type(model[0]) is Custom
    assert len(report) == 1 and not report[0].swapped
    assert (
        "subclass of mmcv.ops.modulated_deform_conv.ModulatedDeformConv2dPack"
        in report[0].skipped_reason
    )


def test_swap_does_not_touch_the_global_rng():
    model = nn.Sequential(MMCV["ModulatedDeformConv2dPack"](**ARGS))
    state = torch.random.get_rng_state()
    swap(model)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_mmcv_pack_renames_version_1_offset_keys():
    parent = nn.Module()
    parent.dcn = mmcv.ModulatedDeformConv2dPack(**ARGS)
    _randomise(parent)
    # A checkpoint from before mmcv's version 2: no version metadata, key "dcn_offset.*".
    old = {k.replace("dcn.conv_offset.", "dcn_offset."): v for k, v in parent.state_dict().items()}
    assert "dcn_offset.weight" in old
    upgraded, renamed = mmcv.rename_version1_offset_keys(old)
    assert renamed == [
        ("dcn_offset.weight", "dcn.conv_offset.weight"),
        ("dcn_offset.bias", "dcn.conv_offset.bias"),
    ]
    assert "dcn_offset.weight" in old  # the input is untouched
    fresh = nn.Module()
    fresh.dcn = mmcv.ModulatedDeformConv2dPack(**ARGS)
    fresh.load_state_dict(upgraded, strict=True)
    assert torch.equal(fresh.dcn.conv_offset.weight, parent.dcn.conv_offset.weight)


@pytest.mark.parametrize(
    ("cls", "kwargs", "pattern"),
    [
        (mmcv.DeformConv2d, dict(bias=True), "bias=True is not supported"),
        (legacy_dcn.DeformConv, dict(bias=True), "bias=True is not supported"),
        (
            mmcv.ModulatedDeformConv2d,
            dict(groups=3),
            r"in_channels \(4\) must be divisible by groups \(3\)",
        ),
    ],
)
def test_constructor_errors(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**{**ARGS, "groups": 1, **kwargs})


def test_offset_channels_must_match_deform_groups():
    layer = mmcv.DeformConv2d(**ARGS, deform_groups=2)
    with pytest.raises(
        RuntimeError, match=r"expects offset with 36 channels, got offset shape \[1, 18, 9, 7\]"
    ):
        layer(torch.randn(1, IN, *SIZE), torch.randn(1, 18, *SIZE))


def test_mmcv_accepts_deprecated_deformable_groups_keyword():
    assert mmcv.ModulatedDeformConv2dPack(**ARGS, deformable_groups=2).deform_groups == 2
