"""mmocr's DBNet R50-DCNv2 and mmdet's Faster R-CNN DCN, from the configs their wheels ship,
built and run on CPU with the shims (no compiled mmcv); a checkpoint saved with mmengine's own
API converted with --config and no --trust-pickle."""

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import deformcli
import deformcli.cli
from deformcli.families import mmcv as mmcv_family
from deformcli.mmlab import build_from_config
from deformcli.verify import compare_models, reference_model

pytestmark = pytest.mark.mmlab
runner = CliRunner()


def shipped_config(package: str, relative: str) -> Path:
    module = __import__(package)
    return Path(os.path.dirname(module.__file__)) / ".mim" / "configs" / relative


DBNET = ("mmocr", "textdet/dbnet/dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015.py")
FASTER_RCNN = ("mmdet", "dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py")


def train_like(model: torch.nn.Module) -> list[str]:
    """Non-zero offset predictors (mmcv zero-initialises them, which hides how offsets are
    sampled); returns the deformable layers' paths."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, mmcv_family.ModulatedDeformConv2dPack):
                weight = module.conv_offset.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.01)
                paths.append(path)
    return paths


@pytest.fixture(scope="module")
def dbnet():
    model = build_from_config(shipped_config(*DBNET))
    return model, train_like(model)


def test_dbnet_r50_dcnv2_matches_torchvision_and_predicts(dbnet):
    from mmocr.structures import TextDetDataSample

    model, paths = dbnet
    assert len(paths) == 13  # stages 2-4 of ResNet-50 (4 + 6 + 3 blocks)
    image = torch.randn(1, 3, 640, 640, generator=torch.Generator().manual_seed(1))
    comparison = compare_models(reference_model(model), model, image, paths, tolerance=1e-5)
    assert comparison.passed, comparison
    assert comparison.max_rel <= 1e-5 and len(comparison.layers) == 13
    sample = TextDetDataSample(
        metainfo=dict(img_shape=(640, 640), ori_shape=(640, 640), scale_factor=(1.0, 1.0))
    )
    with torch.no_grad():
        (result,) = model.predict(image, [sample])
    assert "polygons" in result.pred_instances and "scores" in result.pred_instances


def test_faster_rcnn_dconv_builds_and_predicts_with_roi_align_and_nms():
    from mmdet.structures import DetDataSample

    model = build_from_config(shipped_config(*FASTER_RCNN))
    assert sum(isinstance(m, mmcv_family.ModulatedDeformConv2dPack) for m in model.modules()) == 0
    assert sum(isinstance(m, mmcv_family.DeformConv2dPack) for m in model.modules()) == 13
    model.test_cfg.rcnn.score_thr = 0.0  # keep every box: the RoI head's NMS runs on them
    image = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(2))
    sample = DetDataSample(
        metainfo=dict(img_shape=(320, 320), ori_shape=(320, 320), scale_factor=(1.0, 1.0))
    )
    with torch.no_grad():
        (result,) = model.predict(image, [sample])
    boxes = result.pred_instances.bboxes
    assert boxes.shape[0] > 0 and boxes.shape[1] == 4
    assert bool(torch.isfinite(boxes).all())


def test_an_mmengine_checkpoint_converts_with_its_config_and_no_trust_pickle(
    dbnet, tmp_path, monkeypatch
):
    import numpy as np
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import save_checkpoint

    model, _ = dbnet
    hub = MessageHub.get_instance("deformcli-test")
    hub.update_scalar("train/loss", 0.5)
    hub.update_scalar("train/loss", 0.25)
    checkpoint = {
        "meta": {"epoch": 1200, "iter": 9, "seed": np.int64(42), "lr": np.float32(0.007)},
        "state_dict": model.state_dict(),
        "message_hub": hub.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.007, "momentum": 0.9}]},
        "param_schedulers": [{"last_epoch": 1200, "base_lrs": [0.007]}],
    }
    path = tmp_path / "epoch_1200.pth"
    with monkeypatch.context() as patch:  # saved as on a GPU: storages tagged cuda:0
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_checkpoint(checkpoint, str(path))
    config = str(shipped_config(*DBNET))
    inspected = runner.invoke(deformcli.cli.app, ["inspect", str(path), "--config", config])
    assert inspected.exit_code == 0, inspected.output
    assert "HistoryBuffer as inert data" in " ".join(inspected.output.split())
    assert "ModulatedDeformConv2dPack" in inspected.output
    output = tmp_path / "dbnet.safetensors"
    args = ["convert", str(path), "--config", config, "--input-shape", "1,3,320,320"]
    converted = runner.invoke(deformcli.cli.app, [*args, "-o", str(output), "--json"])
    assert converted.exit_code == 0, converted.output
    payload = json.loads(converted.output)
    assert payload["verification"]["passed"] and len(payload["deformcli_layers"]) == 13
    loaded = deformcli.load_model(output, config=config)
    image = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model.eval()(image), rtol=0, atol=0)
    # A pickle that would run code is still refused, with the framework objects beside it.
    checkpoint["meta"]["hook"] = os.system
    evil = tmp_path / "evil.pth"
    save_checkpoint(checkpoint, str(evil))
    refused = runner.invoke(deformcli.cli.app, ["inspect", str(evil)])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output
