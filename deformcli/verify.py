"""Numerical verification: the op against torchvision's kernel, and a converted model against
its original.

``run_conformance`` is ``deformcli verify`` with no argument: forward and backward over a grid
of configurations on this machine. ``compare_models`` runs a reference and a converted model on
the same inputs and reports per-layer and end-to-end errors.
"""

import contextlib
import copy
import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from deformcli.errors import ModelError, first_line
from deformcli.families._base import DeformableConvBase
from deformcli.ops.deform_conv import DeformConv2d, deform_conv2d

__all__ = [
    "ConformanceCase",
    "ModelComparison",
    "compare_models",
    "reference_model",
    "run_conformance",
]


@dataclass
class ConformanceCase:
    """Max errors of one configuration, relative to the reference's output scale."""

    name: str
    device: str
    dtype: str
    forward_error: float
    backward_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.forward_error <= self.tolerance and self.backward_error <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _scaled_error(actual: Tensor, expected: Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    scale = max(1.0, expected.abs().max().item())
    return (actual.double() - expected.double()).abs().max().item() / scale


_CONFIGS = {
    "3x3 pad 1": dict(
        kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, offset_groups=1
    ),
    "3x2 stride 2,1 dilation 2,1": dict(
        kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=1, offset_groups=1
    ),
    "groups 2, offset groups 3": dict(
        kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2, offset_groups=3
    ),
    "1x1 groups 4": dict(
        kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=4, offset_groups=1
    ),
}


def run_conformance(
    devices: list[str] | None = None, progress: Callable[[], None] | None = None
) -> list[ConformanceCase]:
    """Our op against ``torchvision.ops.deform_conv2d``: every configuration with and without
    mask, float64 (tolerance 1e-10) and float32 (1e-5), forward and all five gradients.

    ``devices`` defaults to CPU plus CUDA when available. ``progress`` is called per case.
    """
    import torchvision.ops

    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = []
    for device, (name, config), with_mask, (dtype, tolerance) in itertools.product(
        devices, _CONFIGS.items(), (True, False), ((torch.float64, 1e-10), (torch.float32, 1e-5))
    ):
        generator = torch.Generator().manual_seed(0)
        tensors = _random_problem(config, with_mask, generator)
        tensors = [t.to(device=device, dtype=dtype) if t is not None else None for t in tensors]
        geometry = (config["stride"], config["padding"], config["dilation"])
        expected = _forward_backward(torchvision.ops.deform_conv2d, tensors, geometry)
        actual = _forward_backward(deform_conv2d, tensors, geometry)
        cases.append(
            ConformanceCase(
                name=f"{name}{', mask' if with_mask else ''}",
                device=device,
                dtype=str(dtype).removeprefix("torch."),
                forward_error=_scaled_error(actual[0], expected[0]),
                backward_error=max(
                    _scaled_error(a, e) for a, e in zip(actual[1:], expected[1:], strict=True)
                ),
                tolerance=tolerance,
            )
        )
        if progress is not None:
            progress()
    return cases


def conformance_case_count(devices: list[str] | None = None) -> int:
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return len(devices) * len(_CONFIGS) * 2 * 2


def _random_problem(config: dict, with_mask: bool, generator: torch.Generator) -> list:
    batch, channels, out_channels, height, width = 2, 12, 8, 9, 11
    kernel_h, kernel_w = config["kernel"]
    stride_h, stride_w = config["stride"]
    padding_h, padding_w = config["padding"]
    dilation_h, dilation_w = config["dilation"]
    out_h = (height + 2 * padding_h - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = (width + 2 * padding_w - dilation_w * (kernel_w - 1) - 1) // stride_w + 1
    points = config["offset_groups"] * kernel_h * kernel_w
    offset = torch.randn(batch, 2 * points, out_h, out_w, generator=generator, dtype=torch.float64)
    # Half the offsets integer-valued: exact grid points exercise the one-sided gradients.
    offset[:, ::2] = (offset[:, ::2] * 2).round()
    return [
        torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64),
        offset * 2,
        torch.randn(
            out_channels,
            channels // config["groups"],
            kernel_h,
            kernel_w,
            generator=generator,
            dtype=torch.float64,
        ),
        torch.randn(out_channels, generator=generator, dtype=torch.float64),
        torch.rand(batch, points, out_h, out_w, generator=generator, dtype=torch.float64)
        if with_mask
        else None,
    ]


def _forward_backward(op, tensors: list, geometry: tuple) -> list[Tensor]:
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    x, offset, weight, bias, mask = leaves
    out = op(x, offset, weight, bias, *geometry, mask)
    upstream = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, present, upstream.to(out.dtype).to(out.device))
    return [out.detach(), *grads]


# ------------------------------------------------------------------------ model comparison


@dataclass
class LayerError:
    path: str
    max_abs: float
    max_rel: float


#: What :func:`compare_models` checks.
END_TO_END = "the model run end to end, deformcli's layers against torchvision's kernel"
#: What :func:`check_layer_weights` checks.
WEIGHTS_ONLY = "per-layer weight check on synthetic inputs; the model was not run"


@dataclass
class ModelComparison:
    """Reference vs converted model on the same inputs (``input_shape``), or each layer's
    weights on synthetic inputs (``input_shape`` None); ``checked`` says which.

    Errors are over the finite values; ``problems`` names every tensor with NaN or infinite
    values (weights, input, outputs) and everything that could not be compared. Any problem
    fails the verification.
    """

    input_shape: list[int] | None
    max_abs: float
    max_rel: float
    tolerance: float
    layers: list[LayerError] = field(default_factory=list)
    checked: str = END_TO_END
    problems: list[str] = field(default_factory=list)
    #: The sample and each model's first output tensor (for pictures; not in ``to_dict``).
    outputs: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return not self.problems and self.max_rel <= self.tolerance

    def to_dict(self) -> dict:
        fields = {name: value for name, value in vars(self).items() if name != "outputs"}
        fields["layers"] = [asdict(layer) for layer in self.layers]
        return {**fields, "passed": self.passed}


class NonFiniteOffsetsError(Exception):
    """Raised instead of running torchvision's CPU kernel on NaN or infinite offsets (on which
    it reads out of bounds and crashes the process)."""


def _finite_torchvision_deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask):
    import torchvision.ops

    if not bool(torch.isfinite(offset).all()):
        raise NonFiniteOffsetsError(f"offset {list(offset.shape)}: {_count_non_finite(offset)}")
    return torchvision.ops.deform_conv2d(
        input, offset, weight, bias, stride, padding, dilation, mask
    )


def _torchvision_forward(self, input, offset, mask=None, *, kernel):
    return kernel(
        input,
        offset,
        self.weight,
        self.bias,
        _as_pair(self.stride),
        _as_pair(self.padding),
        _as_pair(self.dilation),
        mask,
    )


def _as_pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def reference_model(model: nn.Module, refuse_non_finite: bool = True) -> nn.Module:
    """A copy of ``model`` whose deformable layers run torchvision's compiled kernel.

    deformcli's layers get torchvision's kernel in their place, and torchvision's own layers
    keep it; with ``refuse_non_finite`` (not for tracing or export, which see no data) behind a
    check that refuses non-finite offsets. This is the reference against which a converted
    model is verified, whichever family its layers came from: every family's forward is
    torchvision's forward.
    """
    try:
        import torchvision.ops
    except ImportError:
        raise ModelError(
            "verification needs torchvision's kernel as the reference; install torchvision or "
            "skip verification"
        ) from None
    kernel = (
        _finite_torchvision_deform_conv2d if refuse_non_finite else torchvision.ops.deform_conv2d
    )
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, DeformableConvBase):
            module.kernel_override = kernel
        elif isinstance(module, DeformConv2d) or (
            refuse_non_finite and isinstance(module, torchvision.ops.DeformConv2d)
        ):
            module.forward = functools.partial(_torchvision_forward, module, kernel=kernel)
    return reference


def as_tensors(output) -> list[Tensor]:
    """Every tensor in a model's output (a tensor, or tuples, lists and dicts of them), in
    order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in as_tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in as_tensors(value)]
    return []


def _count_non_finite(tensor: Tensor) -> str:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return ", ".join(part for part in (f"{nan} NaN" * bool(nan), f"{inf} inf" * bool(inf)) if part)


def non_finite_tensors(named: dict[str, Tensor]) -> list[str]:
    """``"name (3 NaN, 1 inf)"`` for every floating tensor holding non-finite values."""
    return [
        f"{name} ({_count_non_finite(tensor)})"
        for name, tensor in named.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def _errors(
    actual: list[Tensor], expected: list[Tensor], label: str, problems: list[str]
) -> tuple[float, float]:
    """Max abs and relative error over the values finite in both; non-finite values and shape
    mismatches are added to ``problems``, named by ``label`` and output index."""
    max_abs = max_rel = 0.0
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        name = f"{label} output {index}" if len(expected) > 1 else f"{label} output"
        if a.shape != e.shape:
            problems.append(f"{name}: shape {list(a.shape)}, reference {list(e.shape)}")
            continue
        a, e = a.double(), e.double()
        for side, tensor in (("converted", a), ("reference", e)):
            if not bool(torch.isfinite(tensor).all()):
                problems.append(f"{name}: the {side} model gives {_count_non_finite(tensor)}")
        finite = torch.isfinite(a) & torch.isfinite(e)
        if not bool(finite.any()):
            continue
        difference = (a - e).abs()[finite].max().item()
        scale = e.abs()[finite].max().item()
        max_abs = max(max_abs, difference)
        max_rel = max(max_rel, difference / max(scale, 1e-12))
    return max_abs, max_rel


def compare_models(
    reference: nn.Module,
    converted: nn.Module,
    inputs: Tensor,
    layer_paths: list[str],
    tolerance: float = 1e-4,
) -> ModelComparison:
    """Run both models (eval, no grad) on ``inputs``; errors end to end and at ``layer_paths``.

    Relative errors are max abs error over the reference's max magnitude. Non-finite weights or
    inputs fail the comparison without running anything; non-finite offsets stop the reference
    before torchvision's kernel sees them; non-finite outputs fail it too.
    """
    problems = non_finite_tensors(dict(converted.state_dict())) + non_finite_tensors(
        {"the input": inputs}
    )
    if problems:
        return ModelComparison(list(inputs.shape), 0.0, 0.0, tolerance, [], problems=problems)
    captured: dict[str, dict[str, list[Tensor]]] = {"reference": {}, "converted": {}}
    handles = []
    for label, model in (("reference", reference), ("converted", converted)):
        for path in layer_paths:
            module = model.get_submodule(path)

            def hook(_module, _inputs, output, label=label, path=path):
                captured[label][path] = [t.detach() for t in as_tensors(output)]

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            with naming_failures(reference, "the reference model (torchvision's kernel)", inputs):
                expected = as_tensors(reference.eval()(inputs))
            with naming_failures(converted, "the converted model", inputs):
                actual = as_tensors(converted.eval()(inputs))
    except NonFiniteOffsetsError as stopped:
        return ModelComparison(list(inputs.shape), 0.0, 0.0, tolerance, [], problems=[str(stopped)])
    finally:
        for handle in handles:
            handle.remove()
    if len(actual) != len(expected) or not expected:
        raise ModelError("the model returned no tensors to compare")
    max_abs, max_rel = _errors(actual, expected, "end-to-end", problems)
    layers = [
        LayerError(
            path,
            *_errors(captured["converted"][path], captured["reference"][path], path, problems),
        )
        for path in layer_paths
        if path in captured["reference"] and path in captured["converted"]
    ]
    return ModelComparison(
        list(inputs.shape),
        max_abs,
        max_rel,
        tolerance,
        layers,
        problems=problems,
        outputs=(inputs, expected[0], actual[0]),
    )


@contextlib.contextmanager
def naming_failures(model: nn.Module, label: str, inputs: Tensor) -> Iterator[None]:
    """An exception inside ``model`` becomes a ModelError naming the innermost module that was
    running (its path and class) and a hint that fits the failure."""
    running: list[tuple[str, nn.Module]] = []
    handles = []
    for path, module in model.named_modules():

        def enter(module, _inputs, path=path):
            running.append((path, module))

        def leave(_module, _inputs, _output):
            running.pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    except (Exception, SystemExit) as error:
        path, module = running[-1] if running else ("", model)
        where = f"in {path or '(the model itself)'} ({type(module).__name__})"
        if isinstance(error, NonFiniteOffsetsError):
            raise NonFiniteOffsetsError(
                f"{where.removeprefix('in ')}: the {error} computed from the input; "
                "torchvision's kernel was not run on them"
            ) from None
        message = first_line(error)
        raise ModelError(
            f"{label} failed {where} on an input of shape {list(inputs.shape)}: "
            f"{type(error).__name__}: {message}{_hint(module, message, inputs)}"
        ) from None
    finally:
        for handle in handles:
            handle.remove()


def _hint(module: nn.Module, message: str, inputs: Tensor) -> str:
    text = message.lower()
    if isinstance(module, (DeformableConvBase, DeformConv2d)) and (
        "offset" in text or "mask" in text
    ):
        return (
            " (the offset or mask this layer was given does not fit its output size: compare "
            "the stride of the layer that computes them with this layer's stride)"
        )
    if "channel" in text or "size" in text or "shape" in text:
        return f" (is the input shape right? the sample was {list(inputs.shape)})"
    return ""


def check_layer_weights(
    state_dict: dict[str, Tensor], layer_names: list[str], padding: int = 1, tolerance: float = 1e-4
) -> ModelComparison:
    """Without a model: each named layer's weight through our op and torchvision's kernel on a
    random ``(1, C_in, 16, 16)`` input with random offsets and mask (fixed seed), padding 1.

    This checks the weights, not the model (which was not run): ``checked`` says so and
    ``input_shape`` is None. Non-finite weights and weights the op cannot run are problems
    naming the layer (the layer is not run).
    """
    import torchvision.ops

    generator = torch.Generator().manual_seed(0)
    layers: list[LayerError] = []
    problems: list[str] = []
    for name in layer_names:
        weight = state_dict[f"{name}.weight"].detach().to("cpu", torch.float32)
        bias = state_dict.get(f"{name}.bias")
        bias = None if bias is None else bias.detach().to("cpu", torch.float32)
        named = {f"{name}.weight": weight, **({f"{name}.bias": bias} if bias is not None else {})}
        bad = non_finite_tensors(named)
        if bad:
            problems.extend(bad)
            continue
        _, in_channels, kernel_h, kernel_w = weight.shape  # as one conv group
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            problems.append(
                f"{name}.bias: shape {list(bias.shape)} does not fit {name}.weight "
                f"{list(weight.shape)} (expected [{weight.shape[0]}])"
            )
            continue
        out_h, out_w = 16 + 2 * padding - kernel_h + 1, 16 + 2 * padding - kernel_w + 1
        if min(in_channels, kernel_h, kernel_w, weight.shape[0]) == 0 or min(out_h, out_w) < 1:
            problems.append(f"{name}.weight: shape {list(weight.shape)} cannot be a convolution")
            continue
        x = torch.randn(1, in_channels, 16, 16, generator=generator)
        offset = torch.randn(1, 2 * kernel_h * kernel_w, out_h, out_w, generator=generator) * 2
        mask = torch.rand(1, kernel_h * kernel_w, out_h, out_w, generator=generator)
        args = (x, offset, weight, bias, (1, 1), (padding, padding), (1, 1), mask)
        ours = deform_conv2d(*args)
        theirs = torchvision.ops.deform_conv2d(*args)
        layers.append(LayerError(name, *_errors([ours], [theirs], name, problems)))
    max_abs = max((layer.max_abs for layer in layers), default=0.0)
    max_rel = max((layer.max_rel for layer in layers), default=0.0)
    return ModelComparison(
        None, max_abs, max_rel, tolerance, layers, checked=WEIGHTS_ONLY, problems=problems
    )
