"""``deformcli demo``: the main job end to end on the bundled example DBNet."""

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from deformcli.bench import time_model
from deformcli.checkpoint import find_deformable_layers, load_checkpoint
from deformcli.convert import convert
from deformcli.errors import CheckpointError
from deformcli.models.dbnet import build_dbnet
from deformcli.output_file import writing

MODEL_SPEC = "deformcli.models.dbnet:build_dbnet"


def run_demo(out_dir: Path, step: Callable[[str], None] | None = None, size: int = 320) -> dict:
    """Save the example DBNet as a GPU training script would (torchvision layers, DataParallel
    ``module.`` prefix, inside a training-state container), convert it with verification, and
    time the whole model briefly. Returns a JSON-able report; files go to ``out_dir``.
    """
    step = step or (lambda _message: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    step("building the example DBNet with torchvision's DeformConv2d")
    model = build_dbnet("torchvision")
    checkpoint = out_dir / "dbnet_cuda_style.pth"
    step(f"saving {checkpoint.name} as a training script would")
    with writing(checkpoint, replace=True) as temporary:
        torch.save(
            {
                "epoch": 1200,
                "state_dict": nn.DataParallel(model).state_dict(),
                "optimizer": {"lr": 0.007, "momentum": 0.9},
            },
            temporary,
        )
    layers = find_deformable_layers(load_checkpoint(checkpoint).state_dict)
    output = out_dir / "dbnet.deformcli.safetensors"
    result = convert(
        checkpoint,
        output,
        model=MODEL_SPEC,
        input_shape=(1, 3, size, size),
        force=True,
        step=step,
    )
    step("timing the whole model")
    timing = time_model(rounds=3, size=size)
    return {
        "checkpoint": str(checkpoint),
        "layers_found": len(layers),
        "conversion": result.to_dict(),
        "bench": timing.to_dict(),
    }
