"""``deformcli demo``: the main job end to end on the bundled example DBNet, with a picture."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deformcli.bench import LayerTiming, time_model
from deformcli.checkpoint import find_deformable_layers, load_checkpoint
from deformcli.convert import ConversionResult, convert
from deformcli.models.dbnet import build_dbnet
from deformcli.output_file import OutputError, writing
from deformcli.plot import MatplotlibMissingError, plot_comparison
from deformcli.user_model import load_model

MODEL_SPEC = "deformcli.models.dbnet:build_dbnet"


@dataclass
class DemoResult:
    """What ``deformcli demo`` made: the files, the conversion, the picture and the timing."""

    checkpoint: Path
    layers_found: int
    conversion: ConversionResult
    #: ``demo.png``, or None (and ``picture_note`` says why) without matplotlib.
    picture: Path | None
    picture_note: str | None
    map_max_abs_difference: float
    bench: LayerTiming

    def to_dict(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "layers_found": self.layers_found,
            "conversion": self.conversion.to_dict(),
            "picture": None if self.picture is None else str(self.picture),
            "picture_note": self.picture_note,
            "map_max_abs_difference": self.map_max_abs_difference,
            "bench": self.bench.to_dict(),
        }


def run_demo(
    out_dir: Path,
    step: Callable[[str], None] | None = None,
    size: int = 320,
    rounds: int = 9,
) -> DemoResult:
    """Save the example DBNet as a GPU training script would (torchvision layers, DataParallel
    ``module.`` prefix, inside a training-state container), convert it with verification, run
    the original and the converted model on an image with text drawn on it and draw their
    probability maps side by side (``demo.png``, needs matplotlib), and time the whole model
    (``rounds`` interleaved rounds, median and interquartile range). Files go to ``out_dir``.
    """
    step = step or (lambda _message: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    step("building the example DBNet with torchvision's DeformConv2d")
    model = build_dbnet("torchvision")
    checkpoint = out_dir / "dbnet_cuda_style.pth"
    step(f"saving {checkpoint.name} as a training script would")
    _save_as_training_script(model, checkpoint)
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
    step("running both models on an image with text")
    image = text_image(size)
    converted = load_model(output, MODEL_SPEC)
    with torch.no_grad():
        reference_map, converted_map = model(image), converted(image)
    picture, picture_note = _draw_maps(image, reference_map, converted_map, out_dir / "demo.png")
    step("timing the whole model")
    timing = time_model(rounds=rounds, size=size)
    return DemoResult(
        checkpoint=checkpoint,
        layers_found=len(layers),
        conversion=result,
        picture=picture,
        picture_note=picture_note,
        map_max_abs_difference=(reference_map - converted_map).abs().max().item(),
        bench=timing,
    )


def _save_as_training_script(model: nn.Module, path: Path) -> None:
    """``model`` saved as a CUDA training script saves it: wrapped in DataParallel (``module.``
    keys), inside a training-state container with its epoch and optimizer settings."""
    with writing(path, replace=True) as temporary:
        torch.save(
            {
                "epoch": 1200,
                "state_dict": nn.DataParallel(model).state_dict(),
                "optimizer": {"lr": 0.007, "momentum": 0.9},
            },
            temporary,
        )


def _draw_maps(
    image: torch.Tensor, reference_map: torch.Tensor, converted_map: torch.Tensor, path: Path
) -> tuple[Path | None, str | None]:
    """Draw both models' maps to ``path``: ``(path, None)``, or ``(None, how to get it)``
    without matplotlib."""
    try:
        plot_comparison(
            image,
            reference_map,
            converted_map,
            path,
            replace=True,
            title="the example DBNet (untrained weights: the maps are not meant to find the "
            "text, only to be the same with both kernels)",
        )
    except MatplotlibMissingError as error:  # say how to get the picture instead
        return None, str(error)
    return path, None


def text_image(size: int) -> torch.Tensor:
    """A ``(1, 3, size, size)`` input that looks like a text detector's: dark words on a light,
    slightly noisy page, normalised with ImageNet's mean and std as DB's preprocessing does."""
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("RGB", (size, size), (232, 228, 218))
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=max(8, size // 12))
    lines = ("deformcli", "DEFORMABLE", "convolution", "NO CUDA 2026", "text here")
    for index, line in enumerate(lines):
        left = size // 14 + (index % 2) * size // 10
        draw.text((left, size // 14 + index * size // 6), line, fill=(25, 25, 35), font=font)
    pixels = torch.frombuffer(bytearray(page.tobytes()), dtype=torch.uint8)
    image = pixels.view(size, size, 3).permute(2, 0, 1).float() / 255
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(0)) * 0.02
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((image + noise - mean) / std).unsqueeze(0)
