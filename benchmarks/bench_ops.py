"""Benchmark deformcli.deform_conv2d against torchvision's kernel and dense conv2d.

Prints Markdown tables (median times over interleaved rounds, ratios from the same run) and the
peak extra memory of one inference forward on a large layer. Run:

    python benchmarks/bench_ops.py [--rounds 7] [--device cpu] [--skip-memory]
"""

import argparse
import platform

import torch

from deformcli.bench import DBNET_LAYER_SHAPES, peak_memory_mib, time_layer

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
    parser.add_argument("--compile", action="store_true", help="add torch.compile of our op")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {args.device}, {args.dtype}, "
        f"3x3 DCNv2 (mask), padding 1, median of {args.rounds} rounds\n"
    )
    for backward in (False, True):
        title = "forward + backward" if backward else "forward"
        print(f"### {title}\n")
        print(
            "| layer (N, C, H, W) | deformcli ms | torchvision ms | dense conv2d ms "
            "| speedup vs torchvision | x dense |" + (" compiled ms |" if args.compile else "")
        )
        print("|---|---:|---:|---:|---:|---:|" + ("---:|" if args.compile else ""))
        for shape in DBNET_LAYER_SHAPES:
            t = time_layer(
                shape,
                dtype,
                args.device,
                backward=backward,
                rounds=args.rounds,
                compiled=args.compile,
            )
            compiled = f" {_fmt(t.compiled_ms)} |" if args.compile else ""
            print(
                f"| {shape} | {t.deformcli_ms:.1f} | {_fmt(t.torchvision_ms)} | {t.dense_ms:.1f} | "
                f"{_fmt(t.speedup_vs_torchvision, 2)}x | {t.ratio_to_dense:.2f} |{compiled}"
            )
        print()

    if not args.skip_memory and args.device == "cpu":
        print(f"### peak extra memory of one inference forward, {MEMORY_SHAPE}\n")
        print("| implementation | peak MiB |")
        print("|---|---:|")
        for name in ("deformcli", "torchvision", "dense"):
            print(f"| {name} | {_fmt(peak_memory_mib(name, MEMORY_SHAPE, args.dtype), 0)} |")


if __name__ == "__main__":
    main()
