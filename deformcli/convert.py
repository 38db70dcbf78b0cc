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
    LoadedCheckpoint,
    find_deformable_layers,
    load_checkpoint,
    load_tensor,
    save_safetensors,
)
from deformcli.families.legacy_dcn import KernelReadWarning
from deformcli.output_file import check_output
from deformcli.surgery import SwapRecord, is_deformcli_layer, swap
from deformcli.user_model import build_network, fit_state_dict, name_layers, user_code
from deformcli.validation import InputError, check_allocation, parse_dtype
from deformcli.verify import ModelComparison, check_layer_weights, compare_models, reference_model

__all__ = [
    "ConversionResult",
    "convert",
    "default_output_path",
    "swap_and_compare",
    "verify_file",
]


@dataclass
class ConversionResult:
    source: Path
    output: Path | None
    layers: list[DeformableLayerInfo]
    swapped: list[SwapRecord]
    verification: ModelComparison | None
    notes: list[str] = field(default_factory=list)
    #: Paths of the model's deformcli layers after conversion (swapped, or built as ours under
    #: the import shims); empty without a model.
    deformcli_layers: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "output": str(self.output) if self.output else None,
            "layers": [layer.to_dict() for layer in self.layers],
            "swapped": [record.to_dict() for record in self.swapped],
            "deformcli_layers": self.deformcli_layers,
            "verification": self.verification.to_dict() if self.verification else None,
            "notes": self.notes,
        }


def default_output_path(checkpoint: Path) -> Path:
    """``<name>.deformcli.safetensors`` beside ``checkpoint``."""
    return checkpoint.with_name(f"{checkpoint.stem}.deformcli.safetensors")


def _sample_input(input_shape: tuple[int, ...], input_path: Path | None, dtype) -> Tensor:
    """The verification sample: a fixed-seed ``randn`` of ``input_shape``, or the saved tensor."""
    if input_path is None:
        check_allocation(input_shape, dtype, "input shape")
        generator = torch.Generator().manual_seed(0)
        return torch.randn(input_shape, generator=generator, dtype=torch.float32).to(dtype)
    loaded = load_tensor(input_path)
    if not loaded.is_floating_point():
        raise InputError(f"{input_path}: the input tensor has dtype {loaded.dtype}, not floating")
    return loaded.to(dtype)


def convert(
    checkpoint: str | Path,
    output: str | Path | None = None,
    *,
    model: str | None = None,
    model_kwargs: str | None = None,
    config: str | Path | None = None,
    input_shape: tuple[int, ...] = (1, 3, 640, 640),
    input_path: str | Path | None = None,
    dtype: str | None = None,
    trust_pickle: bool = False,
    force: bool = False,
    verify: bool = True,
    tolerance: float | None = None,
    step: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Convert ``checkpoint`` into a CPU-ready safetensors file; see the module docstring.

    Returns the result; ``output`` is None when verification failed and ``force`` is not set
    (nothing is written then). Bad input raises :class:`deformcli.errors.DeformcliError`.
    """
    step = step or (lambda _message: None)
    checkpoint = Path(checkpoint)
    output = Path(output) if output is not None else default_output_path(checkpoint)
    check_output(output, replace=force, inputs=(checkpoint,))
    target_dtype = parse_dtype(dtype) if dtype else None

    step(f"loading {checkpoint.name}")
    loaded = load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    result = ConversionResult(checkpoint, None, [], [], None, list(loaded.notes))
    result.layers = find_deformable_layers(loaded.state_dict, loaded.saved_devices, result.notes)
    devices = sorted(set(loaded.saved_devices.values()))
    if devices and devices != ["cpu"]:
        result.notes.append(f"tensors were saved on {', '.join(devices)}; loaded on the CPU")

    if model is not None or config is not None or loaded.module is not None:
        sample_path = Path(input_path) if input_path else None
        state_dict = _convert_in_model(
            loaded,
            result,
            (model, model_kwargs, config),
            target_dtype,
            (input_shape, sample_path) if verify else None,
            tolerance,
            step,
        )
    else:
        state_dict = _cast(loaded.state_dict, target_dtype)
        if verify and result.layers:
            result.verification = _check_weights(state_dict, result.layers, tolerance, step)

    if not result.verified and not force:
        return result
    step(f"writing {output.name}")
    result.output = save_safetensors(
        state_dict, output, _metadata(result, loaded.sha256), force=force, protect=(checkpoint,)
    )
    return result


def _check_weights(
    state_dict: dict[str, Tensor],
    layers: list[DeformableLayerInfo],
    tolerance: float | None,
    step: Callable[[str], None],
) -> ModelComparison:
    """Without a model to run: each deformable layer's weights through both kernels."""
    step("checking each deformable layer's weights against torchvision's kernel")
    names = [layer.name for layer in layers]
    return check_layer_weights(state_dict, names, tolerance=tolerance or 1e-4)


def _convert_in_model(
    checkpoint: LoadedCheckpoint,
    result: ConversionResult,
    factory: tuple[str | None, str | None, str | Path | None],
    target_dtype: torch.dtype | None,
    sample: tuple[tuple[int, ...], Path | None] | None,
    tolerance: float | None,
    step: Callable[[str], None],
) -> dict[str, Tensor]:
    """Build the model (``factory``: model spec, its kwargs, config; or the pickled one), load
    the checkpoint into it, swap its layers and, with ``sample`` (shape, saved input), verify.
    Fills ``result``; returns the state_dict to write."""
    model, model_kwargs, config = factory
    with user_code():
        if model is not None or config is not None:
            step(f"building {model or Path(config).name}")
            network = build_network(model, model_kwargs, config)
        else:
            network = checkpoint.module
            result.notes.append("using the model pickled in the checkpoint")
        result.notes.extend(fit_state_dict(network, checkpoint.state_dict)[1])
        network = network.to("cpu", _verification_dtype(target_dtype, network)).eval()
        step("swapping deformable layers" + (" and verifying" if sample else ""))
        inputs = None
        if sample is not None:
            inputs = _sample_input(sample[0], sample[1], _floating_dtype(network))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", KernelReadWarning)
            result.swapped, result.verification = swap_and_compare(network, inputs, tolerance)
        result.notes.extend(_kernel_read_notes(caught))
    result.deformcli_layers = _deformcli_layer_paths(network)
    if not result.deformcli_layers:
        result.notes.append("the model has no deformable layers that deformcli recognises")
    if target_dtype is not None and target_dtype != _floating_dtype(network):
        result.notes.append(
            f"verified in {_dtype_name(_floating_dtype(network))} (torchvision's CPU kernel, "
            f"the reference, has no {_dtype_name(target_dtype)}); weights written as "
            f"{_dtype_name(target_dtype)}"
        )
    return _cast(network.state_dict(), target_dtype)


def _metadata(result: ConversionResult, source_sha256: str) -> dict[str, object]:
    """What the written file records of its making."""
    return {
        "format": "pt",
        "deformcli_version": deformcli.__version__,
        "torch_version": torch.__version__,
        "source_file": result.source.name,
        "source_sha256": source_sha256,
        "deformable_layers": [layer.to_dict() for layer in result.layers],
        "swapped_layers": [r.path for r in result.swapped if r.swapped],
        "deformcli_layers": result.deformcli_layers,
        "verification": result.verification.to_dict() if result.verification else "skipped",
    }


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
    checkpoint: str | Path,
    model: str | None = None,
    model_kwargs: str | None = None,
    input_shape: tuple[int, ...] = (1, 3, 640, 640),
    trust_pickle: bool = False,
    input_path: str | Path | None = None,
    config: str | Path | None = None,
) -> ModelComparison:
    """``deformcli verify PATH --model``: a converted (or original) file in the user's model,
    deformcli's layers against torchvision's kernel on a fixed-seed sample of ``input_shape``
    (or the tensor saved at ``input_path``)."""
    with user_code():
        network = build_network(model, model_kwargs, config)
        fit_state_dict(network, load_checkpoint(checkpoint, trust_pickle=trust_pickle).state_dict)
        network = network.to("cpu").eval()
        sample = _sample_input(
            input_shape, Path(input_path) if input_path else None, _floating_dtype(network)
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", KernelReadWarning)
            _, comparison = swap_and_compare(network, sample)
        for note in _kernel_read_notes(caught):
            warnings.warn(note, KernelReadWarning, stacklevel=2)
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


def _verification_dtype(target: torch.dtype | None, model: nn.Module) -> torch.dtype:
    """The dtype to verify in: the target, except half precision, which torchvision's CPU
    kernel lacks (bfloat16) or runs at a crawl (float16): verify in float32, then cast."""
    if target in (torch.float16, torch.bfloat16):
        return torch.float32
    return target or _floating_dtype(model)


def _cast(state_dict: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    if dtype is None:
        return state_dict
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _floating_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _tolerance(model: nn.Module) -> float:
    return 1e-4 if _floating_dtype(model) in (torch.float32, torch.float64) else 2e-2


def _deformcli_layer_paths(model: nn.Module) -> list[str]:
    return [path for path, module in model.named_modules() if is_deformcli_layer(module)]
