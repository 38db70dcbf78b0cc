"""Side-by-side timing of deformcli's op, torchvision's kernel and dense conv2d.

All three run in the same process, interleaved round by round so machine noise hits them
alike; each reported time is the median over rounds. Peak memory is measured in a fresh
subprocess per implementation: the resident high-water mark during one forward minus the
resident size before it.
"""

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from deformcli.ops import deform_conv2d
from deformcli.validation import InputError, check_allocation

# The deformable layers of DBNet (ResNet stages 2-4 at 640x640 input, and a larger map).
DBNET_LAYER_SHAPES: list[tuple[int, int, int, int]] = [
    (1, 128, 80, 80),
    (1, 256, 40, 40),
    (1, 512, 20, 20),
    (1, 128, 128, 128),
]

IMPLEMENTATIONS = ("deformcli", "torchvision", "dense")


@dataclass
class LayerTiming:
    """Median milliseconds of one 3x3, padding-1, modulated layer of ``shape`` (N, C, H, W), or
    of the whole example DBNet on an input of ``shape``."""

    shape: tuple[int, int, int, int]
    dtype: str
    device: str
    backward: bool
    rounds: int
    deformcli_ms: float
    torchvision_ms: float | None
    dense_ms: float
    #: ``torch.compile`` of deformcli's op, when asked for.
    compiled_ms: float | None = None
    #: Per implementation, the 25th and 75th percentile of the rounds (ms): the spread.
    spread_ms: dict[str, list[float]] = field(default_factory=dict)
    #: Per implementation, peak extra MiB of one inference forward, when measured.
    peak_mib: dict[str, float | None] | None = None
    #: Whether the tensors (and models) were laid out channels-last.
    channels_last: bool = False
    #: The layer's conv groups (1 for the whole model).
    groups: int = 1

    @property
    def speedup_vs_torchvision(self) -> float | None:
        if self.torchvision_ms is None:
            return None
        return self.torchvision_ms / self.deformcli_ms

    @property
    def ratio_to_dense(self) -> float:
        return self.deformcli_ms / self.dense_ms

    def to_dict(self) -> dict:
        row = asdict(self)
        if self.peak_mib is None:
            del row["peak_mib"]
        row["speedup_vs_torchvision"] = self.speedup_vs_torchvision
        row["ratio_to_dense"] = self.ratio_to_dense
        return row


def make_layer_inputs(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    requires_grad: bool = False,
    seed: int = 0,
    channels_last: bool = False,
    groups: int = 1,
) -> dict[str, torch.Tensor]:
    """Input, offset, mask and weight of a DBNet-style 3x3 DCNv2 layer (C_in = C_out) in
    ``groups`` conv groups (as in ResNeXt's), laid out channels-last when ``channels_last``.

    Raises InputError when the shape is not four positive sizes, its channels do not split
    into ``groups``, or its tensors (the input, or the ``(C, C / groups, 3, 3)`` weight) would
    not fit in memory.
    """
    batch, channels, height, width = shape
    weight_shape = _checked_weight_shape(shape, dtype, groups)
    group_channels = weight_shape[1]
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "input": torch.randn(batch, channels, height, width, generator=generator),
        "offset": torch.randn(batch, 18, height, width, generator=generator),
        "mask": torch.rand(batch, 9, height, width, generator=generator),
        "weight": torch.randn(weight_shape, generator=generator) / (9 * group_channels) ** 0.5,
    }
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return {
        name: t.to(device=device, dtype=dtype, memory_format=layout).requires_grad_(requires_grad)
        for name, t in tensors.items()
    }


def _checked_weight_shape(
    shape: tuple[int, int, int, int], dtype: torch.dtype, groups: int
) -> tuple[int, int, int, int]:
    """The ``(C, C / groups, 3, 3)`` weight of a layer of ``shape``, once the layer's input and
    weight are known to fit in memory and its channels to split into ``groups``."""
    check_allocation(shape, dtype, "layer shape")
    channels = shape[1]
    if groups < 1 or channels % groups:
        raise InputError(
            f"layer shape {list(shape)}: its {channels} channels do not split into {groups} groups"
        )
    weight_shape = (channels, channels // groups, 3, 3)
    check_allocation(weight_shape, dtype, f"layer shape {list(shape)}: weight")
    return weight_shape


def check_benchmark(
    shapes: list[tuple[int, int, int, int]] | None, dtype: torch.dtype, groups: int = 1
) -> None:
    """Raise InputError for what :func:`run_benchmark` cannot time (before minutes of timing,
    not after): a layer shape that does not fit in memory or split into ``groups``, or
    ``groups`` with the whole model, whose layers have theirs."""
    if shapes is None and groups != 1:
        raise InputError(
            f"groups={groups}: conv groups apply to single layers, not to the example DBNet"
        )
    for shape in shapes or []:
        _checked_weight_shape(shape, dtype, groups)


def layer_callable(
    implementation: str, tensors: dict[str, torch.Tensor], backward: bool
) -> Callable[[], None]:
    """A zero-argument function running one forward (and backward) of ``implementation``."""
    if implementation in ("deformcli", "deformcli-compiled"):
        op = (
            torch.compile(deform_conv2d)
            if implementation == "deformcli-compiled"
            else deform_conv2d
        )

        def forward() -> torch.Tensor:
            return op(
                tensors["input"],
                tensors["offset"],
                tensors["weight"],
                padding=1,
                mask=tensors["mask"],
            )
    elif implementation == "torchvision":
        from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

        def forward() -> torch.Tensor:
            return torchvision_deform_conv2d(
                tensors["input"],
                tensors["offset"],
                tensors["weight"],
                padding=1,
                mask=tensors["mask"],
            )
    elif implementation == "dense":
        groups = tensors["input"].shape[1] // tensors["weight"].shape[1]

        def forward() -> torch.Tensor:
            return F.conv2d(tensors["input"], tensors["weight"], padding=1, groups=groups)
    else:
        raise ValueError(
            f"unknown implementation {implementation!r}; choose from {IMPLEMENTATIONS}"
        )

    def run() -> None:
        if backward:
            forward().sum().backward()
        else:
            with torch.no_grad():
                forward()

    return run


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def torchvision_available() -> bool:
    try:
        import torchvision.ops  # noqa: F401
    except ImportError:
        return False
    return True


def _interleaved_times(
    runs: dict[str, Callable[[], None]], device: str, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds of every timed round of each run, the runs interleaved round by round (so
    that a machine getting busier slows them all alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(warmup + rounds):
        for name, run in runs.items():
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            if round_index >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _runs(run: Callable[[], None]) -> bool:
    """Whether ``run`` is implemented for these inputs (dtype/device coverage differs)."""
    try:
        run()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _timing(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: str,
    backward: bool,
    rounds: int,
    times: dict[str, list[float]],
    channels_last: bool,
    groups: int = 1,
) -> LayerTiming:
    medians = {name: statistics.median(values) for name, values in times.items()}
    return LayerTiming(
        shape=shape,
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        backward=backward,
        rounds=rounds,
        deformcli_ms=medians["deformcli"],
        torchvision_ms=medians.get("torchvision"),
        dense_ms=medians["dense"],
        compiled_ms=medians.get("deformcli-compiled"),
        spread_ms={name: _quartiles(values) for name, values in times.items()},
        channels_last=channels_last,
        groups=groups,
    )


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return [first, third]


def time_layer(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    backward: bool = False,
    rounds: int = 7,
    warmup: int = 2,
    compiled: bool = False,
    channels_last: bool = False,
    groups: int = 1,
) -> LayerTiming:
    """Median time of deformcli, torchvision and dense conv2d on one layer, interleaved; with
    ``compiled``, also ``torch.compile`` of deformcli's op (compiled during warm-up); with
    ``channels_last``, on channels-last tensors; ``groups``: the layer's conv groups."""
    tensors = make_layer_inputs(
        shape, dtype, device, requires_grad=backward, channels_last=channels_last, groups=groups
    )
    names = [n for n in IMPLEMENTATIONS if n != "torchvision" or torchvision_available()]
    if compiled:
        names.append("deformcli-compiled")
    runs = {name: layer_callable(name, tensors, backward) for name in names}
    if "torchvision" in runs and not _runs(runs["torchvision"]):
        del runs["torchvision"]  # e.g. its CPU kernel has no bfloat16: reported as n/a
    times = _interleaved_times(runs, device, rounds, warmup)
    return _timing(shape, dtype, device, backward, rounds, times, channels_last, groups)


def run_benchmark(
    shapes: list[tuple[int, int, int, int]] | None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    backward: bool = False,
    rounds: int = 7,
    memory: bool = False,
    on_step: Callable[[], None] | None = None,
    channels_last: bool = False,
    groups: int = 1,
) -> list[LayerTiming]:
    """Time each layer of ``shapes`` (:func:`time_layer`), or the example DBNet when ``shapes``
    is None (:func:`time_model`). ``memory``: also the peak memory of each layer's timed pass
    (CPU only). ``on_step`` is called after each timing (progress). ``channels_last``: the
    tensors and models laid out channels-last. ``groups``: the layers' conv groups.

    Raises InputError first for what cannot be timed (:func:`check_benchmark`).
    """
    check_benchmark(shapes, dtype, groups)
    if shapes is None:
        timings = [
            time_model(dtype, device, backward=backward, rounds=rounds, channels_last=channels_last)
        ]
        if on_step is not None:
            on_step()
        return timings
    timings = []
    for shape in shapes:
        timing = time_layer(
            shape,
            dtype,
            device,
            backward=backward,
            rounds=rounds,
            channels_last=channels_last,
            groups=groups,
        )
        if memory and device == "cpu":
            dtype_name = str(dtype).removeprefix("torch.")
            timing.peak_mib = {
                name: peak_memory_mib(name, shape, dtype_name, backward, groups)
                for name in IMPLEMENTATIONS
            }
        timings.append(timing)
        if on_step is not None:
            on_step()
    return timings


def time_model(
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    backward: bool = False,
    rounds: int = 5,
    warmup: int = 1,
    size: int = 640,
    batch: int = 1,
    compiled: bool = False,
    channels_last: bool = False,
) -> LayerTiming:
    """The example DBNet on ``(batch, 3, size, size)``: with our layers, torchvision's, and
    dense convolutions in their place (the speed floor); with ``compiled``, also
    ``torch.compile`` of the model with our layers (compiled during warm-up); with
    ``channels_last``, the models and the image channels-last."""
    from deformcli.models.dbnet import build_dbnet

    names = [n for n in IMPLEMENTATIONS if n != "torchvision" or torchvision_available()]
    generator = torch.Generator().manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    image = torch.randn(batch, 3, size, size, generator=generator)
    image = image.to(device=device, dtype=dtype, memory_format=layout)
    if compiled:
        names.append("deformcli-compiled")
    runs = {}
    for name in names:
        network = build_dbnet(name.removesuffix("-compiled"))
        network = network.to(device=device, dtype=dtype, memory_format=layout)
        if backward:
            network.train()
        if name == "deformcli-compiled":
            network = torch.compile(network)
        runs[name] = _model_run(network, image, backward)
    times = _interleaved_times(runs, device, rounds, max(warmup, 2 if compiled else 0))
    return _timing((batch, 3, size, size), dtype, device, backward, rounds, times, channels_last)


def _model_run(network: torch.nn.Module, image: torch.Tensor, backward: bool) -> Callable[[], None]:
    def run() -> None:
        if backward:
            network(image).sum().backward()
        else:
            with torch.no_grad():
                network(image)

    return run


def peak_memory_mib(
    implementation: str,
    shape: tuple[int, int, int, int],
    dtype: str = "float32",
    backward: bool = False,
    groups: int = 1,
) -> float | None:
    """Peak extra resident memory (MiB) of one inference forward, or with ``backward`` of one
    forward and backward, of a layer in ``groups`` conv groups, in a fresh subprocess.

    Returns None where the platform cannot report it (it needs Linux's ``/proc``).
    """
    code = (
        "import sys, json; from deformcli.bench import _measure_peak_in_this_process as m; "
        "print(json.dumps(m(sys.argv[1], tuple(map(int, sys.argv[2].split(','))), sys.argv[3], "
        "sys.argv[4] == 'backward', int(sys.argv[5]))))"
    )
    mode = "backward" if backward else "forward"
    shape_arg = ",".join(map(str, shape))
    result = subprocess.run(
        [sys.executable, "-c", code, implementation, shape_arg, dtype, mode, str(groups)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _measure_peak_in_this_process(
    implementation: str,
    shape: tuple[int, int, int, int],
    dtype: str,
    backward: bool = False,
    groups: int = 1,
) -> float | None:
    """Peak resident memory (MiB) above the level before one forward (and backward), via
    Linux's VmHWM."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets the high-water mark VmHWM to the current resident size
    except OSError:
        return None
    tensors = make_layer_inputs(shape, getattr(torch, dtype), requires_grad=backward, groups=groups)
    # Warm up on a tiny layer so lazily loaded kernels do not count as the op's memory.
    tiny = make_layer_inputs((1, 8, 8, 8), requires_grad=backward)
    layer_callable(implementation, tiny, backward=backward)()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    layer_callable(implementation, tensors, backward=backward)()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")
