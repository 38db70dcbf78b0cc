"""Convert a CUDA-trained checkpoint into a verified, CPU-ready safetensors file.

The pipeline behind ``deformcli convert``: load safely, build the user's model (with the import
shims active, so model code that imports a compiled DCN extension still imports), load the
weights strictly, keep the original as the reference, swap every deformable layer for
deformcli's, verify on sample inputs, and write safetensors atomically with metadata.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import deformcli
from deformcli.checkpoint import (
    DeformableLayerInfo,
    find_deformable_layers,
    load_checkpoint,
    save_safetensors,
)
from deformcli.errors import CheckpointError
from deformcli.families.legacy_dcn import KernelReadWarning
from deformcli.output_file import check_output
from deformcli.surgery import SwapRecord, swap
from deformcli.user_model import build_model, fit_state_dict, name_layers, user_code
from deformcli.verify import ModelComparison, check_layer_weights, compare_models, reference_model

__all__ = [
    "ConversionResult",
    "convert",
    "default_output_path",
    "swap_and_compare",
    "verify_file",
]

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass
class ConversionResult:
    source: Path
    output: Path | None
    layers: list[DeformableLayerInfo]
    swapped: list[SwapRecord]
    verification: ModelComparison | None
    notes: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "output": str(self.output) if self.output else None,
            "layers": [layer.to_dict() for layer in self.layers],
            "swapped": [vars(record) for record in self.swapped],
            "verification": self.verification.to_dict() if self.verification else None,
            "notes": self.notes,
        }


def default_output_path(source: Path) -> Path:
    return source.with_name(f"{source.stem}.deformcli.safetensors")


def _sample_input(input_shape: tuple[int, ...], input_path: Path | None, dtype) -> Tensor:
    if input_path is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(input_shape, generator=generator).to(dtype)
    loaded = load_checkpoint_tensor(input_path)
    return loaded.to(dtype)


def load_checkpoint_tensor(path: Path) -> Tensor:
    """A single tensor saved with ``torch.save`` (or a safetensors file with one tensor)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such input file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = list(load_file(str(path)).values())
            value = tensors[0] if len(tensors) == 1 else None
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read the input tensor ({error})") from None
    if not isinstance(value, Tensor):
        raise CheckpointError(f"{path}: expected one saved tensor, found {type(value).__name__}")
    return value


def convert(
    source: str | Path,
    output: str | Path | None = None,
    *,
    model: str | None = None,
    model_kwargs: str | None = None,
    input_shape: tuple[int, ...] = (1, 3, 640, 640),
    input_path: str | Path | None = None,
    dtype: str | None = None,
    trust_pickle: bool = False,
    force: bool = False,
    verify: bool = True,
    tolerance: float | None = None,
    step: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Convert ``source`` into a CPU-ready safetensors file; see the module docstring.

    Returns the result; ``output`` is None when verification failed and ``force`` is not set
    (nothing is written then). Bad input raises :class:`deformcli.errors.DeformcliError`.
    """
    step = step or (lambda _message: None)
    source = Path(source)
    output = Path(output) if output is not None else default_output_path(source)
    check_output(output, replace=force, inputs=(source,))
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    target_dtype = DTYPES[dtype] if dtype else None

    step(f"loading {source.name}")
    checkpoint = load_checkpoint(source, trust_pickle=trust_pickle)
    notes = list(checkpoint.notes)
    layers = find_deformable_layers(checkpoint.state_dict, checkpoint.saved_devices)
    devices = sorted(set(checkpoint.saved_devices.values()))
    if devices and devices != ["cpu"]:
        notes.append(f"tensors were saved on {', '.join(devices)}; loaded on the CPU")

    swapped: list[SwapRecord] = []
    verification = None
    if model is not None or checkpoint.module is not None:
        with user_code():
            if model is not None:
                step(f"building {model}")
                network = build_model(model, model_kwargs)
            else:
                network = checkpoint.module
                notes.append("using the model pickled in the checkpoint")
            _, fit_notes = fit_state_dict(network, checkpoint.state_dict)
            notes.extend(fit_notes)
            network = network.to("cpu", target_dtype or _floating_dtype(network)).eval()
            step("swapping deformable layers" + (" and verifying" if verify else ""))
            sample = None
            if verify:
                sample = _sample_input(
                    input_shape, Path(input_path) if input_path else None, _floating_dtype(network)
                )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", KernelReadWarning)
                swapped, verification = swap_and_compare(network, sample, tolerance)
            notes.extend(_kernel_read_notes(caught))
        if not any(r.swapped for r in swapped) and not _deformcli_layer_paths(network):
            notes.append("the model has no deformable layers that deformcli recognises")
        state_dict = network.state_dict()
    else:
        state_dict = checkpoint.state_dict
        if target_dtype is not None:
            state_dict = {
                k: v.to(target_dtype) if v.is_floating_point() else v for k, v in state_dict.items()
            }
        if verify and layers:
            step("checking each deformable layer's weights against torchvision's kernel")
            verification = check_layer_weights(
                state_dict, [layer.name for layer in layers], tolerance=tolerance or 1e-4
            )

    result = ConversionResult(source, None, layers, swapped, verification, notes)
    if not result.verified and not force:
        return result
    step(f"writing {output.name}")
    metadata = {
        "format": "pt",
        "deformcli_version": deformcli.__version__,
        "torch_version": torch.__version__,
        "source_file": source.name,
        "source_sha256": checkpoint.sha256,
        "deformable_layers": [layer.to_dict() for layer in layers],
        "swapped_layers": [r.path for r in swapped if r.swapped],
        "verification": verification.to_dict() if verification else "skipped",
    }
    result.output = save_safetensors(state_dict, output, metadata, force=force, protect=(source,))
    return result


def swap_and_compare(
    network: nn.Module, sample: Tensor | None, tolerance: float | None = None
) -> tuple[list[SwapRecord], ModelComparison | None]:
    """Swap ``network``'s deformable layers in place; with a ``sample``, first keep a reference
    on torchvision's kernel and compare the two on it (per swapped layer and end to end)."""
    reference = reference_model(network) if sample is not None else None
    swapped = swap(network)
    name_layers(network)
    if reference is None:
        return swapped, None
    paths = [r.path for r in swapped if r.swapped] or _deformcli_layer_paths(network)
    comparison = compare_models(reference, network, sample, paths, tolerance or _tolerance(network))
    return swapped, comparison


def verify_file(
    path: str | Path,
    model: str,
    model_kwargs: str | None = None,
    input_shape: tuple[int, ...] = (1, 3, 640, 640),
    trust_pickle: bool = False,
) -> ModelComparison:
    """``deformcli verify PATH --model``: a converted (or original) file in the user's model,
    deformcli's layers against torchvision's kernel on a fixed-seed sample."""
    with user_code():
        network = build_model(model, model_kwargs)
        fit_state_dict(network, load_checkpoint(path, trust_pickle=trust_pickle).state_dict)
        network = network.to("cpu").eval()
        sample = _sample_input(input_shape, None, _floating_dtype(network))
        _, comparison = swap_and_compare(network, sample)
    return comparison


def _kernel_read_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    """The layers that read their offsets as DB's CUDA kernel did, once each (the reference
    and the converted model both warn); other warnings are passed on."""
    notes: list[str] = []
    for warning in caught:
        if not issubclass(warning.category, KernelReadWarning):
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
        elif str(warning.message) not in notes:
            notes.append(str(warning.message))
    return notes


def _floating_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _tolerance(model: nn.Module) -> float:
    return 1e-4 if _floating_dtype(model) in (torch.float32, torch.float64) else 2e-2


def _deformcli_layer_paths(model: nn.Module) -> list[str]:
    from deformcli.families._base import DeformableConvBase
    from deformcli.ops.deform_conv import DeformConv2d

    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, (DeformConv2d, DeformableConvBase))
    ]
