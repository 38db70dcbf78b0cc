"""The deformcli command line: thin Typer commands over library functions, Rich output.

Exit codes: 0 ok, 1 verification failed, 2 bad input (one line naming the file, key or
shape), 3 unexpected internal error (one line), 130 interrupted; ``--debug`` anywhere on the
command line adds the traceback and keeps the code.
"""

import contextlib
import functools
import json
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from deformcli import __version__
from deformcli.errors import DeformcliError, first_line
from deformcli.output_file import check_output
from deformcli.validation import parse_device, parse_dtype, parse_shape

if TYPE_CHECKING:  # the commands import their library modules where they use them
    from deformcli.bench import LayerTiming
    from deformcli.checkpoint import DeformableLayerInfo
    from deformcli.demo import DemoResult
    from deformcli.verify import ConformanceCase, ModelComparison

EXIT_OK, EXIT_VERIFICATION_FAILED, EXIT_BAD_INPUT = 0, 1, 2

app = typer.Typer(
    help="Deformable convolution with no compiled extension: take CUDA-trained checkpoints to "
    "any device.\n\nExit codes: 0 ok, 1 verification failed, 2 bad input, 3 internal error, "
    "130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: flags without "<bool>" metavars, docstrings rewrapped to the terminal.
    rich_markup_mode=None,
)
console = Console()
error_console = Console(stderr=True)
_state = {"debug": False}


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"deformcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Add tracebacks to errors (anywhere on the line).")
    ] = False,
) -> None:
    """deformcli: run models with deformable convolution anywhere torch runs."""
    _state["debug"] = debug
    if not debug:
        warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, without the source line Python shows (--debug keeps it)."""
    error_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)


EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 3, 130


def _command(function: Callable) -> Callable:
    """Run a command so that it never ends in a traceback (unless --debug): bad input is one
    line and exit 2, Ctrl-C exit 130, anything unexpected one line and exit 3. With --json the
    error is a JSON object on stdout."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except DeformcliError as error:
            _fail(str(error) + _flag_hint(error), EXIT_BAD_INPUT, kwargs)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED, kwargs)
        except (Exception, SystemExit) as error:
            if type(error).__module__.split(".")[0] in ("click", "typer"):
                raise  # usage errors: the command line's own message and exit code
            _fail(
                f"internal error: {type(error).__name__}: {first_line(error)} (rerun with "
                "--debug for the traceback, and please report it)",
                EXIT_INTERNAL_ERROR,
                kwargs,
            )

    return run


def _flag_hint(error: DeformcliError) -> str:
    """The library's errors state facts; the command line says which flag changes them."""
    from deformcli.checkpoint import PickledObjectsError
    from deformcli.output_file import OutputExistsError

    if isinstance(error, OutputExistsError):
        return "; pass --force to replace it"
    if isinstance(error, PickledObjectsError):
        return (
            ". If you trust this file, pass --trust-pickle: unpickling can run arbitrary code "
            "from the file"
        )
    return ""


def _fail(message: str, code: int, options: dict) -> None:
    if _state["debug"]:
        traceback.print_exc()
    if options.get("as_json"):
        typer.echo(json.dumps({"error": message, "exit_code": code}))
    else:
        error_console.print(
            f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True
        )
    raise typer.Exit(code)


@contextlib.contextmanager
def _steps(enabled: bool) -> Iterator:
    """A spinner naming the current step; silent with --json."""
    if not enabled:
        yield lambda _message: None
        return
    with console.status("starting") as status:
        yield lambda message: status.update(f"{escape(message)}...")


def _print_json(payload: object) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


# ------------------------------------------------------------------ options shared by commands

JsonFlag = Annotated[
    bool, typer.Option("--json", help="Machine-readable output (errors too, as a JSON object).")
]
TrustPickleFlag = Annotated[
    bool,
    typer.Option(
        "--trust-pickle", help="Allow unpickling arbitrary objects (runs code from the file)."
    ),
]
ForceFlag = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]
ModelOption = Annotated[
    str | None,
    typer.Option("--model", help="Model factory 'package.module:function' to build."),
]
ModelKwargsOption = Annotated[
    str | None, typer.Option("--model-kwargs", help="JSON keyword arguments for --model.")
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", help="Build the model from an mmengine config file instead of --model."
    ),
]
InputShapeOption = Annotated[
    str, typer.Option("--input-shape", help="Sample input N,C,H,W (a fixed-seed randn).")
]
InputFileOption = Annotated[
    Path | None,
    typer.Option("--input", help="A saved tensor to verify on instead of a random sample."),
]


# ---------------------------------------------------------------------------------- inspect


@app.command()
@_command
def inspect(
    checkpoint: Annotated[
        Path, typer.Argument(help="A torch checkpoint (any name) or a .safetensors file.")
    ],
    config: ConfigOption = None,
    trust_pickle: TrustPickleFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """List a checkpoint's deformable layers (no pickled code runs).

    Example: deformcli inspect model_final.pth
    Example: deformcli inspect epoch_1200.pth --config dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015.py
    """
    from deformcli.checkpoint import load_checkpoint, summarize

    with _steps(not as_json) as step:
        step(f"loading {checkpoint.name}")
        loaded = load_checkpoint(checkpoint, trust_pickle=trust_pickle)
        model = None
        if config is not None and loaded.module is None:
            # The config's model names layers by class, which says more than the tensors.
            from deformcli.mmlab import build_from_config

            step(f"building the model of {config.name}")
            model = build_from_config(config)
    summary = summarize(loaded, model)
    if as_json:
        _print_json(summary.to_dict())
        return
    console.print(
        f"[bold]{escape(str(summary.path))}[/] ({summary.format}, {summary.tensors} tensors, "
        f"{summary.parameters:,} values, {summary.bytes / 2**20:.1f} MiB, saved on "
        f"{', '.join(summary.saved_on)})",
        highlight=False,
    )
    for note in summary.notes:
        console.print(f"  - {escape(note)}", highlight=False)
    if summary.deformable_layers:
        console.print(_layers_table(summary.deformable_layers))
    else:
        console.print("No deformable layers recognised from the tensors alone.")


def _layers_table(layers: list["DeformableLayerInfo"]) -> Table:
    """Inspect's layers as a Rich table, one row per layer, never cut when piped."""
    table = Table(title=f"{len(layers)} deformable layer(s)", box=None, pad_edge=False)
    rows = [
        (
            layer.name,
            layer.family,
            layer.kind,
            "x".join(map(str, layer.weight_shape)),
            str(layer.offset_groups),
            layer.dtype,
            layer.saved_on,
        )
        for layer in layers
    ]
    headers = ("name", "family", "kind", "weight", "groups", "dtype", "saved on")
    widths = [max(len(header), *(len(row[i]) for row in rows)) for i, header in enumerate(headers)]
    for header, width in zip(headers, widths, strict=True):
        table.add_column(header, no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*map(escape, row))
    if not console.is_terminal:
        # Piped output is not cut to 80 columns: it is as wide as the table's content.
        console.width = max(console.width, sum(widths) + table.padding[1] * 2 * len(widths))
    return table


# ---------------------------------------------------------------------------------- convert


CastDtypeOption = Annotated[
    str | None, typer.Option("--dtype", help="Cast weights to float32/float16/bfloat16/float64.")
]
ConvertForceFlag = Annotated[
    bool,
    typer.Option(
        "--force", help="Replace an existing output; write it even if verification fails."
    ),
]
NoVerifyFlag = Annotated[bool, typer.Option("--no-verify", help="Skip numerical verification.")]


@app.command()
@_command
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="The CUDA-trained checkpoint.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Output .safetensors (default: <name>.deformcli.safetensors)."
        ),
    ] = None,
    model: ModelOption = None,
    model_kwargs: ModelKwargsOption = None,
    config: ConfigOption = None,
    input_shape: InputShapeOption = "1,3,640,640",
    input_file: InputFileOption = None,
    dtype: CastDtypeOption = None,
    trust_pickle: TrustPickleFlag = False,
    force: ConvertForceFlag = False,
    no_verify: NoVerifyFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Convert a checkpoint into a verified, CPU-ready .safetensors.

    Builds the model from --model with the import shims active, loads the weights strictly,
    swaps the deformable layers and compares with torchvision's kernel; writes nothing if
    verification fails (unless --force).

    Example: deformcli convert dbnet.pth --model mypkg.model:build --input-shape 1,3,640,640
    """
    from deformcli.convert import convert as run_convert

    with _steps(not as_json) as step:
        result = run_convert(
            checkpoint,
            output,
            model=model,
            config=config,
            model_kwargs=model_kwargs,
            input_shape=parse_shape(input_shape, "--input-shape"),
            input_path=input_file,
            dtype=dtype,
            trust_pickle=trust_pickle,
            force=force,
            verify=not no_verify,
            step=step,
        )
    if as_json:
        _print_json(result.to_dict())
    else:
        _print_conversion(result)
    if not result.verified:
        raise typer.Exit(EXIT_VERIFICATION_FAILED)


def _print_conversion(result) -> None:
    for note in result.notes:
        console.print(f"  - {escape(note)}", highlight=False)
    swapped = [r for r in result.swapped if r.swapped]
    for record in result.swapped:
        if not record.swapped:
            console.print(
                f"  [yellow]skipped[/] {escape(record.path)}: {escape(record.skipped_reason)}"
            )
    if swapped:
        console.print(
            f"Swapped {len(swapped)} layer(s): {escape(swapped[0].source)} -> "
            f"{escape(str(swapped[0].target))}" + (" ..." if len(swapped) > 1 else ""),
            highlight=False,
        )
    elif result.deformcli_layers:
        console.print(
            f"{len(result.deformcli_layers)} deformable layer(s) already deformcli's (the model "
            "was built with the import shims): nothing to swap."
        )
    elif result.layers:
        console.print(f"{len(result.layers)} deformable layer(s) found in the tensors.")
    verification = result.verification
    if verification is not None:
        _print_comparison(verification)
    else:
        console.print("Verification skipped.")
    if result.output is not None:
        console.print(f"Wrote [bold]{escape(str(result.output))}[/]", highlight=False)
    else:
        console.print("Nothing written (verification failed; --force writes anyway).")


def _print_comparison(verification: "ModelComparison", picture: Path | None = None) -> None:
    from deformcli.verify import WEIGHTS_ONLY

    weights_only = verification.checked == WEIGHTS_ONLY
    title = (
        "per-layer weight check: each layer's weights through deformcli and torchvision's "
        "kernel on synthetic inputs"
        if weights_only
        else "verification (deformcli vs torchvision's kernel)"
    )
    table = Table(title=title)
    for column in ("layer", "max abs error", "max rel error"):
        table.add_column(column)
    for layer in verification.layers:
        table.add_row(escape(layer.path), f"{layer.max_abs:.3e}", f"{layer.max_rel:.3e}")
    if not weights_only and (verification.layers or not verification.problems):
        table.add_row(
            "[bold]end to end[/]", f"{verification.max_abs:.3e}", f"{verification.max_rel:.3e}"
        )
    if table.row_count:
        console.print(table)
    for problem in verification.problems:
        console.print(f"[bold red]problem:[/] {escape(problem)}", highlight=False)
    verdict = "[green]passed[/]" if verification.passed else "[bold red]FAILED[/]"
    if weights_only:
        console.print(
            f"Per-layer weight check {verdict} (tolerance {verification.tolerance:g} relative). "
            "The model was not run: pass --model to verify it end to end."
        )
    else:
        console.print(f"Verification {verdict} (tolerance {verification.tolerance:g} relative).")
    if picture is not None:
        console.print(f"Wrote [bold]{escape(str(picture))}[/]", highlight=False)


# ----------------------------------------------------------------------------------- verify


@app.command()
@_command
def verify(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="A converted file to check against its model (needs --model/--config)."
        ),
    ] = None,
    model: ModelOption = None,
    model_kwargs: ModelKwargsOption = None,
    config: ConfigOption = None,
    input_shape: InputShapeOption = "1,3,640,640",
    input_file: InputFileOption = None,
    trust_pickle: TrustPickleFlag = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also draw input, both output maps and their difference (PNG; matplotlib).",
        ),
    ] = None,
    force: ForceFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Prove equivalence with torchvision's kernel (op or file).

    With no argument: our op against torchvision's over a grid of configurations on this
    machine (CPU, and CUDA when present). With PATH and --model: the file in your model.

    \b
    Example: deformcli verify
    Example: deformcli verify dbnet.deformcli.safetensors --model mypkg.model:build
    Example: deformcli verify dbnet.safetensors --model mypkg.model:build --plot dbnet.png
    """
    if path is None:
        _verify_op(as_json)
    if model is None and config is None:
        raise DeformcliError("verify PATH needs --model or --config to build the model to check")
    from deformcli.convert import verify_file

    if plot is not None:
        check_output(plot, replace=force)  # before the model runs, not after
    comparison = verify_file(
        path,
        model,
        model_kwargs,
        parse_shape(input_shape, "--input-shape"),
        trust_pickle=trust_pickle,
        input_path=input_file,
        config=config,
    )
    if plot is not None:
        _plot_comparison(comparison, plot, force)
    if as_json:
        _print_json(comparison.to_dict())
    else:
        _print_comparison(comparison, picture=plot)
    raise typer.Exit(EXIT_OK if comparison.passed else EXIT_VERIFICATION_FAILED)


def _verify_op(as_json: bool) -> None:
    """``verify`` with no file: the op against torchvision's over the conformance grid."""
    from deformcli.verify import conformance_case_count, run_conformance

    with _progress(not as_json, "conformance", conformance_case_count()) as advance:
        cases = run_conformance(progress=advance)
    passed = all(case.passed for case in cases)
    if as_json:
        _print_json({"passed": passed, "cases": [case.to_dict() for case in cases]})
    else:
        console.print(_conformance_table(cases))
        console.print("[green]all passed[/]" if passed else "[bold red]FAILED[/]")
    raise typer.Exit(EXIT_OK if passed else EXIT_VERIFICATION_FAILED)


def _conformance_table(cases: list["ConformanceCase"]) -> Table:
    table = Table(title="deformcli vs torchvision.ops.deform_conv2d (error / output scale)")
    for column in ("configuration", "device", "dtype", "forward", "all gradients", "ok"):
        table.add_column(column)
    for case in cases:
        table.add_row(
            case.name,
            case.device,
            case.dtype,
            f"{case.forward_error:.1e}",
            f"{case.backward_error:.1e}",
            "yes" if case.passed else "[red]NO[/]",
        )
    return table


def _plot_comparison(comparison, path: Path, replace: bool) -> None:
    from deformcli.plot import is_image_map, plot_comparison

    if comparison.outputs is None or not is_image_map(comparison.outputs[1]):
        shape = None if comparison.outputs is None else list(comparison.outputs[1].shape)
        raise DeformcliError(
            f"--plot {path}: the model's output {shape} is not an image-shaped map (N, C, H, W)"
        )
    plot_comparison(*comparison.outputs, path, replace=replace)


@contextlib.contextmanager
def _progress(enabled: bool, label: str, total: int) -> Iterator:
    if not enabled:
        yield lambda: None
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda: progress.advance(task)


# ------------------------------------------------------------------------------------ bench


PresetOption = Annotated[
    str, typer.Option("--preset", help="dbnet-layers (four DBNet layers) or dbnet (whole model).")
]
LayerShapeOption = Annotated[
    str | None, typer.Option("--shape", help="One layer N,C,H,W instead of a preset.")
]
BenchDtypeOption = Annotated[
    str, typer.Option("--dtype", help="float32, float16, bfloat16, float64.")
]
ChannelsLastFlag = Annotated[
    bool, typer.Option("--channels-last", help="Lay tensors (and the model) out channels-last.")
]
RoundsOption = Annotated[
    int, typer.Option("--rounds", min=1, help="Timed rounds (median reported).")
]
GroupsOption = Annotated[
    int,
    typer.Option("--groups", min=1, help="Conv groups of the layers (ResNeXt's: 32)."),
]
MemoryFlag = Annotated[
    bool,
    typer.Option("--memory", help="Also measure peak memory, of the timed pass (CPU, slower)."),
]
PlotOption = Annotated[
    Path | None,
    typer.Option("--plot", help="Also draw the table as a bar chart (PNG; needs matplotlib)."),
]


@app.command()
@_command
def bench(
    preset: PresetOption = "dbnet-layers",
    shape: LayerShapeOption = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, mps...")] = "cpu",
    dtype: BenchDtypeOption = "float32",
    backward: Annotated[bool, typer.Option("--backward", help="Time forward + backward.")] = False,
    channels_last: ChannelsLastFlag = False,
    groups: GroupsOption = 1,
    rounds: RoundsOption = 7,
    memory: MemoryFlag = False,
    plot: PlotOption = None,
    force: ForceFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Time deformcli vs torchvision's kernel and dense conv2d.

    Medians of interleaved rounds, all three measured in the same run.

    Example: deformcli bench --preset dbnet-layers --backward
    """
    from deformcli import bench as benchmarks

    torch_dtype = parse_dtype(dtype)
    device = str(parse_device(device))
    if plot is not None:
        check_output(plot, replace=force)  # before minutes of timing, not after
    shapes = _bench_shapes(preset, shape)
    benchmarks.check_benchmark(shapes, torch_dtype, groups)
    with _progress(not as_json, "bench", len(shapes) if shapes else 1) as advance:
        timings = benchmarks.run_benchmark(
            shapes,
            torch_dtype,
            device,
            backward,
            rounds,
            memory,
            on_step=advance,
            channels_last=channels_last,
            groups=groups,
        )
    rows = [timing.to_dict() for timing in timings]
    title = (
        f"median ms over {rounds} rounds, {device}, {dtype}"
        f"{', channels-last' if channels_last else ''}"
        f"{f', {groups} groups' if groups != 1 else ''}, "
        f"{'forward+backward' if backward else 'forward'}"
    )
    if plot is not None:
        from deformcli.plot import plot_timings

        plot_timings(rows, plot, f"{_machine(device)}: {title}", replace=force)
    if as_json:
        _print_json(rows)
        return
    console.print(_timing_table(timings, title, memory))


def _bench_shapes(preset: str, shape: str | None) -> list[tuple[int, int, int, int]] | None:
    """The layer shapes to time (``--shape``, else the preset's), or None for the whole model."""
    from deformcli.bench import DBNET_LAYER_SHAPES

    if shape is not None:
        return [parse_shape(shape, "--shape")]
    if preset == "dbnet-layers":
        return DBNET_LAYER_SHAPES
    if preset == "dbnet":
        return None
    raise DeformcliError(f"--preset {preset!r}: choose dbnet-layers or dbnet")


def _timing_table(timings: list["LayerTiming"], title: str, memory: bool) -> Table:
    """Bench results as a Rich table: one row per layer (or model) timing."""
    from deformcli.bench import IMPLEMENTATIONS

    table = Table(title=title)
    for column in (
        "shape",
        "deformcli",
        "torchvision",
        "dense conv2d",
        "vs torchvision",
        "x dense",
    ):
        table.add_column(column, justify="right")
    if memory:
        table.add_column("peak MiB (ours / tv / dense)", justify="right")
    for timing in timings:
        speedup = timing.speedup_vs_torchvision
        cells = [
            str(tuple(timing.shape)),
            f"{timing.deformcli_ms:.1f}",
            "n/a" if timing.torchvision_ms is None else f"{timing.torchvision_ms:.1f}",
            f"{timing.dense_ms:.1f}",
            "n/a" if speedup is None else f"{speedup:.2f}x",
            f"{timing.ratio_to_dense:.2f}",
        ]
        if memory:
            peaks = timing.peak_mib or {}
            cells.append(
                " / ".join(
                    "n/a" if peaks.get(name) is None else f"{peaks[name]:.0f}"
                    for name in IMPLEMENTATIONS
                )
            )
        table.add_row(*cells)
    return table


# ----------------------------------------------------------------------------------- export


@app.command("export")
@_command
def export_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint or a converted .safetensors file.")
    ],
    model: ModelOption = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="The .onnx to write.")] = Path(
        "model.onnx"
    ),
    model_kwargs: ModelKwargsOption = None,
    config: ConfigOption = None,
    input_shape: Annotated[
        str, typer.Option("--input-shape", help="Example input N,C,H,W.")
    ] = "2,3,640,640",
    graph: Annotated[
        str,
        typer.Option(
            "--graph", help="standard (GridSample, MatMul...) or native (ONNX DeformConv)."
        ),
    ] = "standard",
    trust_pickle: TrustPickleFlag = False,
    force: ForceFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Export to ONNX, checked in onnxruntime.

    Batch, height and width stay dynamic.

    Example: deformcli export dbnet.pth --model mypkg.model:build -o dbnet.onnx
    """
    from deformcli.export import export_checkpoint

    with _steps(not as_json) as step:
        step("exporting to ONNX")
        if model is None and config is None:
            raise DeformcliError("export needs --model or --config to build the model")
        report = export_checkpoint(
            checkpoint,
            output,
            model,
            model_kwargs=model_kwargs,
            input_shape=parse_shape(input_shape, "--input-shape"),
            graph=graph,
            trust_pickle=trust_pickle,
            force=force,
            config=config,
        )
    if as_json:
        _print_json(report.to_dict())
    else:
        console.print(
            f"Wrote [bold]{escape(str(report.output))}[/] (opset {report.opset}, {graph} graph, "
            "dynamic batch/height/width); onnxruntime vs PyTorch max abs error "
            f"{report.onnxruntime_max_abs_error:.2e}",
            highlight=False,
        )


# ------------------------------------------------------------------------------------- demo


@app.command()
@_command
def demo(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where files go.")] = Path(
        "deformcli-demo"
    ),
    as_json: JsonFlag = False,
) -> None:
    """The whole job on the bundled example DBNet.

    Saves it as a GPU training script would, converts, verifies, benchmarks briefly.

    Example: deformcli demo --out-dir /tmp/deformcli-demo
    """
    from deformcli.demo import run_demo

    with _steps(not as_json) as step:
        report = run_demo(out_dir, step=step)
    if as_json:
        _print_json(report.to_dict())
    else:
        _print_demo(report, out_dir)
    if not report.conversion.verified:
        raise typer.Exit(EXIT_VERIFICATION_FAILED)


def _print_demo(report: "DemoResult", out_dir: Path) -> None:
    """The demo's four steps, one numbered line (or two) each."""
    console.print(
        f"1. Saved a CUDA-style DBNet checkpoint: [bold]{escape(str(report.checkpoint))}[/]",
        highlight=False,
    )
    console.print(f"   ({report.layers_found} deformable layers found in its tensors)")
    conversion = report.conversion
    verification = conversion.verification
    console.print(
        f"2. Converted to [bold]{escape(str(conversion.output))}[/]: "
        f"{len(conversion.deformcli_layers)} deformcli layers, end-to-end max "
        "rel error "
        f"{verification.max_rel:.2e} ({'passed' if verification.passed else 'FAILED'})",
        highlight=False,
    )
    if report.picture is not None:
        console.print(
            f"3. Both models on an image with text: [bold]{escape(str(report.picture))}[/] "
            "(input, torchvision's map, deformcli's map, their difference: max "
            f"{report.map_max_abs_difference:.1e})",
            highlight=False,
        )
    else:
        console.print(f"3. No picture: {escape(str(report.picture_note))}", highlight=False)
    timing = report.bench

    def timed(name: str, median_ms: float) -> str:
        low, high = timing.spread_ms[name]
        return f"{name} {median_ms:.0f} ms ({low:.0f}-{high:.0f})"

    console.print(
        f"4. Whole model forward, {tuple(timing.shape)}, median and interquartile range "
        f"of {timing.rounds} interleaved rounds: {timed('deformcli', timing.deformcli_ms)}, "
        f"{timed('torchvision', timing.torchvision_ms)}, "
        f"{timed('dense', timing.dense_ms)} (dense convolutions in place of the deformable "
        "ones: the floor)",
        highlight=False,
    )
    console.print(
        "Next: deformcli inspect / convert your own checkpoint, with "
        "--model deformcli.models.dbnet:build_dbnet as a pattern. Files are in "
        f"{escape(str(out_dir))}/",
        highlight=False,
    )


def _machine(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    """The ``deformcli`` executable. ``--debug`` may stand anywhere on the command line (before
    a ``--``): it is moved to the front, where the root callback takes it."""
    arguments = sys.argv[1:]
    end = arguments.index("--") if "--" in arguments else len(arguments)
    if "--debug" in arguments[:end]:
        arguments = ["--debug", *(a for a in arguments[:end] if a != "--debug"), *arguments[end:]]
    try:
        app(args=arguments, prog_name="deformcli")
    except KeyboardInterrupt:
        error_console.print("[bold red]error:[/] interrupted", highlight=False)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
