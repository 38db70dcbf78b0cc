"""Unmodified model code that imports a compiled DCN extension runs with the import shims."""

import importlib
import sys
import textwrap

import pytest
import torch
from torch import nn

import deformcli.mmcv_ops
import deformcli.shims
from deformcli.families import legacy_dcn, mmcv
from tests.families.standins import DB
from tests.helpers import assert_close_scaled

# A block written the way DB's backbones/resnet.py writes its BasicBlock with DCN.
DB_STYLE_MODEL = textwrap.dedent(
    """
    import torch.nn as nn
    from assets.ops.dcn import DeformConv, ModulatedDeformConv


    class BasicBlock(nn.Module):
        def __init__(self, planes, modulated=True, deformable_groups=1):
            super().__init__()
            self.with_modulated_dcn = modulated
            self.conv1 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            conv_op = ModulatedDeformConv if modulated else DeformConv
            offset_channels = 27 if modulated else 18
            self.conv2_offset = nn.Conv2d(
                planes, deformable_groups * offset_channels, kernel_size=3, padding=1
            )
            self.conv2 = conv_op(planes, planes, kernel_size=3, padding=1,
                                 deformable_groups=deformable_groups, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            if self.with_modulated_dcn:
                offset_mask = self.conv2_offset(out)
                offset = offset_mask[:, :18, :, :]
                mask = offset_mask[:, -9:, :, :].sigmoid()
                out = self.conv2(out, offset, mask)
            else:
                offset = self.conv2_offset(out)
                out = self.conv2(out, offset)
            return self.relu(self.bn2(out) + x)
    """
)

MMCV_STYLE_MODEL = textwrap.dedent(
    """
    import torch.nn as nn
    from mmcv.ops import ModulatedDeformConv2dPack
    from mmcv.ops.deform_conv import DeformConv2dPack


    def build(channels):
        return nn.Sequential(ModulatedDeformConv2dPack(channels, channels, 3, padding=1),
                             DeformConv2dPack(channels, channels, 3, padding=1))
    """
)

BASICSR_STYLE_MODEL = textwrap.dedent(
    """
    from basicsr.ops.dcn import ModulatedDeformConvPack, modulated_deform_conv


    def build(channels):
        return ModulatedDeformConvPack(channels, channels, 3, padding=1, deformable_groups=1)
    """
)


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    (tmp_path / "db_style_model.py").write_text(DB_STYLE_MODEL)
    (tmp_path / "mmcv_style_model.py").write_text(MMCV_STYLE_MODEL)
    (tmp_path / "basicsr_style_model.py").write_text(BASICSR_STYLE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in (
        "db_style_model",
        "mmcv_style_model",
        "basicsr_style_model",
        "assets",
        "assets.ops",
    ):
        sys.modules.pop(name, None)
    deformcli.shims.uninstall()


def _reference_block(block: nn.Module) -> nn.Module:
    """The same block with DB's layer replaced by the stand-in running torchvision's kernel."""
    reference = type(block)(8)
    reference.conv2 = DB["ModulatedDeformConv"](
        8, 8, kernel_size=3, padding=1, deformable_groups=1, bias=False
    )
    reference.load_state_dict(block.state_dict(), strict=True)
    return reference.eval()


def test_db_style_model_fails_without_shims(model_dir):
    with pytest.raises(ModuleNotFoundError, match="assets"):
        importlib.import_module("db_style_model")


def test_db_style_model_runs_with_shims(model_dir):
    with deformcli.shims.activated():
        module = importlib.import_module("db_style_model")
    block = module.BasicBlock(8).eval()
    assert type(block.conv2) is legacy_dcn.ModulatedDeformConv
    with torch.no_grad():
        block.conv2_offset.weight.normal_(0, 0.1)
        block.conv2_offset.bias.normal_(0, 0.5)
    x = torch.randn(2, 8, 12, 10)
    assert_close_scaled(block(x), _reference_block(block)(x), 1e-5)
    non_modulated = module.BasicBlock(8, modulated=False)
    assert non_modulated(x).shape == x.shape
    # The shims are gone again, and so are the modules they made.
    assert "assets.ops.dcn" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("assets.ops.dcn")


def test_real_parent_package_is_kept(model_dir):
    # DB's repository has a real assets/ package whose dcn subpackage needs the compiled op.
    package = model_dir / "assets"
    (package / "ops" / "dcn").mkdir(parents=True)
    (package / "__init__.py").write_text("REAL = True\n")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "dcn" / "__init__.py").write_text(
        "raise ImportError('compiled extension missing')\n"
    )
    with deformcli.shims.activated():
        import assets
        from assets.ops.dcn import ModulatedDeformConv

        assert assets.REAL
    assert ModulatedDeformConv is legacy_dcn.ModulatedDeformConv


def test_mmcv_and_basicsr_style_models(model_dir):
    with deformcli.shims.activated():
        mmcv_model = importlib.import_module("mmcv_style_model").build(4)
        basicsr_layer = importlib.import_module("basicsr_style_model").build(4)
    assert [type(m) for m in mmcv_model] == [mmcv.ModulatedDeformConv2dPack, mmcv.DeformConv2dPack]
    assert type(basicsr_layer) is legacy_dcn.ModulatedDeformConvPack
    x = torch.randn(1, 4, 6, 6)
    assert mmcv_model(x).shape == basicsr_layer(x).shape == x.shape


def test_every_mmcv_ops_name_imports_and_fails_only_when_used():
    with deformcli.shims.activated():
        from assets.ops.dcn import DeformRoIPooling
        from mmcv.ops import CARAFEPack, nms
        from mmcv.ops.merge_cells import ConcatCell
        from mmcv.ops.nms import batched_nms
    assert nms is deformcli.mmcv_ops.nms and batched_nms is deformcli.mmcv_ops.batched_nms
    for placeholder, name in (
        (CARAFEPack, "mmcv.ops.CARAFEPack"),
        (ConcatCell, "mmcv.ops.merge_cells.ConcatCell"),
        (DeformRoIPooling, "assets.ops.dcn.DeformRoIPooling"),
    ):
        with pytest.raises(NotImplementedError, match=rf"{name} is not available.*provides only"):
            placeholder(16)
