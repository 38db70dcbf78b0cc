"""ONNX export of models with deformable layers, with dynamic batch, height and width.

Two graphs are on offer:

* ``standard`` (default): deformcli's op is made of standard operators (``GridSample``,
  ``MatMul``, ``Gather``...), so the graph runs on any ONNX runtime that has opset 20.
* ``native``: every deformable layer becomes one ONNX ``DeformConv`` node (opset 19), for
  runtimes that implement it (onnxruntime does, on CPU). Needs torchvision at export time: the
  layers are traced through torchvision's op, which has a one-to-one ONNX translation.

Requires the ``onnx`` extra (``pip install 'deformcli[onnx]'``).
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from deformcli.errors import DeformcliError, first_line

__all__ = ["ONNX_OPSET", "ExportError", "ExportResult", "export_checkpoint", "export_onnx"]

ONNX_OPSET = 20
GRAPHS = ("standard", "native")


class ExportError(DeformcliError):
    """The model could not be exported, or the export does not match it."""


@dataclass
class ExportResult:
    """A written ONNX file and how it was checked against PyTorch in onnxruntime."""

    output: Path
    graph: str
    opset: int
    onnxruntime_max_abs_error: float
    checked_shapes: list[list[int]]
    dynamic_axes: tuple[str, ...] = ("batch", "height", "width")

    def to_dict(self) -> dict:
        return {**asdict(self), "output": str(self.output), "dynamic_axes": list(self.dynamic_axes)}


def _deform_conv_translation():
    """onnxscript function for ``torchvision::deform_conv2d`` -> ONNX ``DeformConv``."""
    from onnxscript import opset20 as op

    def deform_conv(
        input,
        weight,
        offset,
        mask,
        bias,
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        dilation_h: int,
        dilation_w: int,
        groups: int,
        offset_groups: int,
        use_mask: bool,
    ):
        # torchvision passes a zero-size mask when there is none; ONNX's mask is optional.
        return op.DeformConv(
            input,
            weight,
            offset,
            bias,
            mask if use_mask else None,
            dilations=[dilation_h, dilation_w],
            group=groups,
            offset_group=offset_groups,
            pads=[pad_h, pad_w, pad_h, pad_w],
            strides=[stride_h, stride_w],
        )

    return deform_conv


def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    output: str | Path,
    graph: str = "standard",
    check: bool = True,
) -> Path:
    """Export ``model`` (deformcli layers, or foreign ones to be swapped first) to ONNX.

    Batch, height and width are dynamic. The example input's batch should be >= 2 (torch.export
    treats sizes 0 and 1 as constants). The model is not modified.

    Args:
        model: a model whose deformable layers are deformcli's (see :func:`deformcli.swap`).
        example_input: ``(N, C, H, W)`` tensor used for tracing.
        output: the ``.onnx`` path to write.
        graph: ``"standard"`` or ``"native"`` (see the module docstring).
        check: run ``onnx.checker`` on the result.
    """
    if graph not in GRAPHS:
        raise DeformcliError(f"graph {graph!r}: choose from {', '.join(GRAPHS)}")
    try:
        import onnx
    except ImportError:
        raise DeformcliError(
            "ONNX export needs the onnx extra: pip install 'deformcli[onnx]'"
        ) from None
    output = Path(output)
    translation = None
    if graph == "native":
        import torchvision  # noqa: F401  (registers torch.ops.torchvision.deform_conv2d)

        from deformcli.verify import reference_model

        model = reference_model(model, refuse_non_finite=False)
        translation = {torch.ops.torchvision.deform_conv2d.default: _deform_conv_translation()}
    dynamic = {0: "batch", 2: "height", 3: "width"}
    model = model.eval()
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (example_input,),
            dynamo=True,
            opset_version=ONNX_OPSET,
            dynamic_shapes=(dynamic,),
            custom_translation_table=translation,
            verbose=False,
        )
    program.save(str(output))
    if check:
        onnx.checker.check_model(str(output))
    return output


def onnxruntime_max_error(path: str | Path, model: nn.Module, inputs: list[Tensor]) -> float:
    """Max abs difference between onnxruntime (CPU) and PyTorch over ``inputs``, over every
    output (a model may return a tensor, or tuples, lists and dicts of them, flattened in
    order as the exporter flattens them)."""
    try:
        import onnxruntime
    except ImportError:
        raise DeformcliError(
            "checking the export needs onnxruntime: pip install 'deformcli[onnx]'"
        ) from None
    from deformcli.verify import as_tensors

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    with torch.no_grad():
        for sample in inputs:
            expected = as_tensors(model.eval()(sample))
            actual = session.run(None, {name: sample.numpy()})
            if len(actual) != len(expected):
                raise ExportError(
                    f"the ONNX graph has {len(actual)} outputs, the model {len(expected)}"
                )
            for ours, theirs in zip(actual, expected, strict=True):
                worst = max(worst, (torch.from_numpy(ours) - theirs).abs().max().item())
    return worst


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    model: str | None,
    model_kwargs: str | None = None,
    input_shape: tuple[int, ...] = (2, 3, 640, 640),
    graph: str = "standard",
    trust_pickle: bool = False,
    force: bool = False,
    tolerance: float = 1e-4,
    config: str | Path | None = None,
) -> "ExportResult":
    """``deformcli export``: checkpoint (or converted safetensors) + model factory -> ONNX,
    checked in onnxruntime against PyTorch on the example shape and a second, different one."""
    from deformcli.checkpoint import load_checkpoint
    from deformcli.output_file import check_output, writing
    from deformcli.surgery import swap
    from deformcli.user_model import build_network, fit_state_dict, user_code
    from deformcli.validation import check_allocation
    from deformcli.verify import naming_failures

    output = check_output(output, replace=force, inputs=(checkpoint,))
    if len(input_shape) != 4:
        raise DeformcliError(f"input shape {list(input_shape)}: expected N,C,H,W")
    batch, channels, height, width = input_shape
    check_allocation((max(batch, 2), channels, height, width), torch.float32, "input shape")
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(max(batch, 2), channels, height, width, generator=generator)
    with user_code():
        network = build_network(model, model_kwargs, config)
        fit_state_dict(network, load_checkpoint(checkpoint, trust_pickle=trust_pickle).state_dict)
        swap(network)
        network = network.to("cpu", torch.float32).eval()
        # Run it once first: a model that cannot take the example fails here, named, not
        # hundreds of lines deep inside the exporter.
        with torch.no_grad(), naming_failures(network, "the model", example):
            network(example)
        with writing(output, replace=force, inputs=(checkpoint,)) as temporary:
            try:
                export_onnx(network, example, temporary, graph=graph)
            except DeformcliError:
                raise
            except Exception as error:
                raise ExportError(
                    f"torch.onnx.export failed: {type(error).__name__}: {first_line(error)}"
                ) from None
            other = torch.randn(1, channels, height + 32, width + 64, generator=generator)
            error = onnxruntime_max_error(temporary, network, [example, other])
            if error > tolerance:
                raise ExportError(
                    f"onnxruntime differs from PyTorch by {error:.2e} (> {tolerance:g}); "
                    "nothing written"
                )
    return ExportResult(
        output=output,
        graph=graph,
        opset=ONNX_OPSET,
        onnxruntime_max_abs_error=error,
        checked_shapes=[list(example.shape), list(other.shape)],
    )
