"""Deployment benchmark: one DBNet-style DCNv2 layer, and the whole example DBNet, run as

* PyTorch eager with deformcli's op, and with torchvision's compiled CPU kernel,
* torch.compile of deformcli's op,
* onnxruntime (CPU) on our standard-operator export and on our native ``DeformConv`` export,
* onnxruntime on the graph of the ``deform-conv2d-onnx-exporter`` package (PyPI) for
  torchvision's layer, when that package is installed (it is not a dependency:
  ``pip install deform-conv2d-onnx-exporter`` in the benchmark environment).

Median milliseconds over interleaved rounds, all in one run. Run:

    python benchmarks/bench_deploy.py [--rounds 9] [--size 640]
"""

import argparse
import contextlib
import io
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from deformcli import DeformConv2d
from deformcli.export import export_onnx
from deformcli.models.dbnet import build_dbnet


class Layer(nn.Module):
    """(1, 256, 40, 40)-style DCNv2 layer with its offset conv, as in DBNet's stage 3."""

    def __init__(self, channels: int, layer_class: type[nn.Module]):
        super().__init__()
        self.offset = nn.Conv2d(channels, 27, 3, padding=1)
        self.dcn = layer_class(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.offset.weight.normal_(0, 0.05)

    def forward(self, x):
        offset_mask = self.offset(x)
        return self.dcn(x, offset_mask[:, :18], offset_mask[:, 18:].sigmoid())


def _median_ms(runs: dict, rounds: int) -> dict:
    times = {name: [] for name in runs}
    for index in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def _session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # onnxruntime's idle threads spin after each run and would slow the next runtime timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def _third_party_export(model_tv: nn.Module, example: torch.Tensor, path: Path) -> str | None:
    """Export with deform-conv2d-onnx-exporter; None on success, else why it could not."""
    try:
        import deform_conv2d_onnx_exporter
    except ImportError:
        return "not installed"
    deform_conv2d_onnx_exporter.register_deform_conv2d_onnx_op()
    # Its symbolic needs static spatial sizes (it fails on dynamic height/width).
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(
                model_tv,
                (example,),
                str(path),
                opset_version=12,
                dynamo=False,
                input_names=["x"],
                dynamic_axes={"x": {0: "batch"}},
            )
    except Exception as error:  # reported in the table, not hidden
        return f"export failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return None


def bench(
    name: str, ours: nn.Module, theirs: nn.Module, example: torch.Tensor, rounds: int
) -> None:
    theirs.load_state_dict(ours.state_dict())
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp = Path(tmp)
        standard = _session(export_onnx(ours, example.repeat(2, 1, 1, 1), tmp / "s.onnx"))
        native = _session(
            export_onnx(ours, example.repeat(2, 1, 1, 1), tmp / "n.onnx", graph="native")
        )
        compiled = torch.compile(ours)
        compiled(example)
        array = example.numpy()
        runs = {
            "deformcli eager": lambda: ours(example),
            "torchvision eager": lambda: theirs(example),
            "deformcli torch.compile": lambda: compiled(example),
            "onnxruntime, deformcli standard ops": lambda: standard(array),
            "onnxruntime, deformcli native DeformConv": lambda: native(array),
        }
        failure = _third_party_export(theirs, example, tmp / "t.onnx")
        if failure is None:
            third = _session(tmp / "t.onnx")
            runs["onnxruntime, deform-conv2d-onnx-exporter"] = lambda: third(array)
        medians = _median_ms(runs, rounds)
    print(f"### {name}, input {tuple(example.shape)}\n")
    print("| runtime | median ms | vs torchvision eager |")
    print("|---|---:|---:|")
    for runtime, ms in medians.items():
        print(f"| {runtime} | {ms:.1f} | {medians['torchvision eager'] / ms:.2f}x |")
    if failure is not None:
        print(f"| onnxruntime, deform-conv2d-onnx-exporter | {failure} | |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--size", type=int, default=640, help="DBNet input size")
    args = parser.parse_args()
    import torchvision

    print(
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
        f"float32, median of {args.rounds} rounds\n"
    )
    torch.manual_seed(0)
    layer = Layer(256, DeformConv2d).eval()
    bench(
        "DCNv2 layer (256 channels)",
        layer,
        Layer(256, torchvision.ops.DeformConv2d).eval(),
        torch.randn(1, 256, 40, 40),
        args.rounds,
    )
    bench(
        "example DBNet",
        build_dbnet("deformcli"),
        build_dbnet("torchvision"),
        torch.randn(1, 3, args.size, args.size),
        args.rounds,
    )


if __name__ == "__main__":
    main()
