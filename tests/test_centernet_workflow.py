"""CharlesShang's DCNv2 as CenterNet vendors it (tests/centernet_standin): a checkpoint saved by
CenterNet's saver converts with a factory that never mentions deformcli, and the converted model
matches the original (run on its compiled kernel, played by torchvision's, tests/dcn_v2_kernel.py)
to 1e-5; the top-level ``from dcn_v2 import DCN`` of YOLACT++ works too; the offset gradient
follows the original kernel's rule at integer border points."""

import copy
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import deformcli
import deformcli.shims
from deformcli.families import dcn_v2
from tests.families.test_gradient_conventions import (
    MODULATED_OFFSET_BIAS_GRAD,
    MODULATED_OFFSET_WEIGHT_GRAD,
)
from tests.helpers import assert_close_scaled
from tests.test_db_workflow import imported_from, run

HERE = Path(__file__).parent
FACTORY = textwrap.dedent(
    """
    from lib.models.networks.pose_dla_dcn import get_pose_net


    def build():
        return get_pose_net(34, {"hm": 2, "wh": 2, "reg": 2}, head_conv=16)
    """
)
MODULES = ("lib", "_ext", "centerfactory", "dcn_v2")
DCN_LAYERS = [f"ida_up.{kind}_{index}.conv" for index in (1, 2) for kind in ("proj", "node")]


def centernet_checkout(directory: Path, compiled: bool) -> Path:
    shutil.copytree(HERE / "centernet_standin", directory, ignore=shutil.ignore_patterns("*.md"))
    (directory / "centerfactory.py").write_text(FACTORY)
    if compiled:
        shutil.copy(HERE / "dcn_v2_kernel.py", directory / "_ext.py")
    return directory


def forget_modules():
    for name in list(sys.modules):
        if name.split(".")[0] in MODULES:
            del sys.modules[name]


def test_centernet_checkpoint_converts_and_loads(tmp_path, monkeypatch):
    image = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(3))
    gpu = centernet_checkout(tmp_path / "CenterNet-on-gpu", compiled=True)
    with imported_from(gpu):
        import centerfactory
        from lib.models.networks.pose_dla_dcn import save_model

        model = centerfactory.build()
        generator = torch.Generator().manual_seed(4)
        with torch.no_grad():  # trained offsets and masks, not the zero init
            for path in DCN_LAYERS:
                conv = model.get_submodule(path).conv_offset_mask
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
        model = torch.nn.DataParallel(model).eval()
        with torch.no_grad():
            reference = model(image)[0]
            # swap() recognises the original classes wherever the file is vendored.
            swapped = copy.deepcopy(model)
            records = deformcli.swap(swapped)
            assert [r.path for r in records if r.swapped] == [f"module.{p}" for p in DCN_LAYERS]
            assert_close_scaled(swapped(image)[0]["hm"], reference["hm"], 1e-5, "swapped")
        checkpoint = tmp_path / "model_last.pth"
        with monkeypatch.context() as patch:  # saved on a GPU: storages tagged cuda:0
            patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
            save_model(checkpoint, 140, model, torch.optim.Adam(model.parameters()))
    forget_modules()

    checkout = centernet_checkout(tmp_path / "CenterNet", compiled=False)
    executable = Path(sys.executable).parent / "deformcli"
    command = [str(executable), "convert", str(checkpoint), "--model", "centerfactory:build"]
    converted = run([*command, "--input-shape", "1,3,64,80"], checkout)
    assert converted.returncode == 0, converted.stdout + converted.stderr
    text = " ".join(converted.stdout.split())
    assert "4 deformable layer(s) already deformcli's" in text and "Verification passed" in text
    output = tmp_path / "model_last.deformcli.safetensors"
    with imported_from(checkout):
        loaded = deformcli.load_model(output, "centerfactory:build")
        assert all(type(loaded.get_submodule(p)) is dcn_v2.DCN for p in DCN_LAYERS)
        with torch.no_grad():
            result = loaded(image)[0]
    forget_modules()
    for head in ("hm", "wh", "reg"):
        assert_close_scaled(result[head], reference[head], 1e-5, head)


def test_the_top_level_dcn_v2_of_yolact(tmp_path, monkeypatch):
    (tmp_path / "yolact_like.py").write_text(
        "import torch.nn as nn\nfrom dcn_v2 import DCN\n\n\n"
        "def build():\n    return nn.Sequential(nn.Conv2d(3, 8, 1), DCN(8, 8, 3, 1, 1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="dcn_v2"):
        import yolact_like
    with deformcli.shims.activated():
        import yolact_like

        model = yolact_like.build()
    sys.modules.pop("yolact_like", None)
    assert type(model[1]) is dcn_v2.DCN
    assert sorted(model[1].state_dict()) == [
        "bias", "conv_offset_mask.bias", "conv_offset_mask.weight", "weight"
    ]  # fmt: skip
    assert deformcli.swap(model) == []  # already ours


def test_offset_gradient_at_integer_border_points_follows_the_original_kernel():
    """The DCNv2 CUDA kernel's dmcn_get_coordinate_weight returns 0 for any point with
    h <= -1, h >= H, w <= -1 or w >= W, the rule of mmcv's kernel (same MSRA lineage), so mmcv's
    published fixture numbers are the original kernel's: DCN(1, 1, 2, stride 1, padding 1),
    input rows [1, 2, 3], weight 1, zero offsets (every border sample exactly on -1 or H)."""
    layer = dcn_v2.DCN(1, 1, (2, 2), 1, 1).double()
    with torch.no_grad():
        layer.weight.fill_(1.0)
    x = torch.tensor([[[[1.0, 2.0, 3.0]] * 3]], dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(
        layer.conv_offset_mask.weight.grad.view(12, 4),
        torch.tensor(MODULATED_OFFSET_WEIGHT_GRAD, dtype=torch.float64).view(12, 4),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(
        layer.conv_offset_mask.bias.grad,
        torch.tensor(MODULATED_OFFSET_BIAS_GRAD, dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )


def test_pooling_imports_and_refuses_to_run():
    with pytest.raises(NotImplementedError, match=r"dcn_v2\.DCNPooling is not available"):
        dcn_v2.DCNPooling(1.0 / 16, 7, 256, False)
