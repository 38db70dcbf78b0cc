"""Benchmark deformcli.deform_conv2d against torchvision's kernel and dense conv2d.

Prints Markdown tables (median times over interleaved rounds, ratios from the same run) and the
peak extra memory of one inference forward, and of one forward and backward, on a large layer.
Run:

    python benchmarks/bench_ops.py [--rounds 7] [--device cpu] [--skip-memory] [--compile]
        [--model-batches 1,8] [--threads 1] [--forward-only] [--channels-last]

``--compile`` adds ``torch.compile`` of our op to the forward table (and of the whole model to
the DBNet table); ``--model-batches`` adds the example DBNet at 640x640 for each batch size.
"""

import argparse
import platform

import torch

from deformcli.bench import (
    DBNET_LAYER_SHAPES,
    LayerTiming,
    peak_memory_mib,
    time_layer,
    time_model,
)

MEMORY_SHAPE = (1, 128, 256, 256)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--compile", action="store_true", help="add torch.compile (forward)")
    parser.add_argument("--model-batches", default="", help="e.g. 1,8: the whole example DBNet")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--forward-only", action="store_true", help="skip forward + backward")
    parser.add_argument("--channels-last", action="store_true", help="channels-last tensors")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {args.device}, {args.dtype}, "
        f"{'channels-last, ' if args.channels_last else ''}"
        f"3x3 DCNv2 (mask), padding 1, median of {args.rounds} rounds\n"
    )
    digits = 1 if args.device == "cpu" else 3
    for backward in (False,) if args.forward_only else (False, True):
        compiled = args.compile and not backward
        print(f"### {'forward + backward' if backward else 'forward'}\n")
        _print_header("layer (N, C, H, W)", compiled)
        for shape in DBNET_LAYER_SHAPES:
            timing = time_layer(
                shape,
                dtype,
                args.device,
                backward=backward,
                rounds=args.rounds,
                compiled=compiled,
                channels_last=args.channels_last,
            )
            _print_row(timing, compiled, digits)
        print()
    for batch in [int(b) for b in args.model_batches.split(",") if b]:
        print(f"### example DBNet forward, batch {batch}, 640x640\n")
        _print_header("input (N, C, H, W)", args.compile)
        timing = time_model(
            dtype,
            args.device,
            rounds=args.rounds,
            batch=batch,
            compiled=args.compile,
            channels_last=args.channels_last,
        )
        _print_row(timing, args.compile, digits)
        print()

    if not args.skip_memory and args.device == "cpu":
        print(f"### peak extra memory, {MEMORY_SHAPE}\n")
        print("| implementation | inference forward MiB | forward + backward MiB |")
        print("|---|---:|---:|")
        for name in ("deformcli", "torchvision", "dense"):
            peaks = [
                _fmt(peak_memory_mib(name, MEMORY_SHAPE, args.dtype, backward), 0)
                for backward in (False, True)
            ]
            print(f"| {name} | {' | '.join(peaks)} |")


def _print_header(first_column: str, compiled: bool) -> None:
    print(
        f"| {first_column} | deformcli ms | torchvision ms | dense conv2d ms "
        "| speedup vs torchvision | x dense |"
        + (" compiled ms | compiled / torchvision |" if compiled else "")
    )
    print("|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if compiled else ""))


def _print_row(timing: LayerTiming, compiled: bool, digits: int) -> None:
    row = (
        f"| {timing.shape} | {timing.deformcli_ms:.{digits}f} | "
        f"{_fmt(timing.torchvision_ms, digits)} | {timing.dense_ms:.{digits}f} | "
        f"{_fmt(timing.speedup_vs_torchvision, 2)}x | {timing.ratio_to_dense:.2f} |"
    )
    if compiled:
        ratio = None
        if timing.compiled_ms is not None and timing.torchvision_ms is not None:
            ratio = timing.compiled_ms / timing.torchvision_ms
        row += f" {_fmt(timing.compiled_ms, digits)} | {_fmt(ratio, 2)} |"
    print(row)


if __name__ == "__main__":
    main()
