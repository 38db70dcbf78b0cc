"""Bar chart of a ``deformcli bench`` table (needs the ``plot`` extra: matplotlib)."""

from pathlib import Path

from deformcli.errors import DeformcliError
from deformcli.output_file import check_output, writing

IMPLEMENTATION_COLUMNS = (
    ("deformcli_ms", "deformcli"),
    ("torchvision_ms", "torchvision"),
    ("dense_ms", "dense conv2d"),
)


def plot_timings(rows: list[dict], output: str | Path, title: str, replace: bool = False) -> Path:
    """Grouped bars, one group per shape, median milliseconds of each implementation, with the
    speedup over torchvision written above each group. Writes a PNG (or any format matplotlib
    infers from the suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DeformcliError("--plot needs matplotlib: pip install 'deformcli[plot]'") from None
    output = check_output(output, replace=replace)
    figure, axes = plt.subplots(figsize=(1.8 + 2.2 * len(rows), 4.2), dpi=120)
    width = 0.8 / len(IMPLEMENTATION_COLUMNS)
    for index, (key, label) in enumerate(IMPLEMENTATION_COLUMNS):
        values = [row[key] if row[key] is not None else 0.0 for row in rows]
        positions = [group + (index - 1) * width for group in range(len(rows))]
        axes.bar(positions, values, width, label=label)
    for group, row in enumerate(rows):
        if row.get("speedup_vs_torchvision"):
            top = max(row[key] or 0.0 for key, _ in IMPLEMENTATION_COLUMNS)
            axes.annotate(
                f"{row['speedup_vs_torchvision']:.1f}x vs torchvision",
                (group, top),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    axes.set_xticks(range(len(rows)), [str(tuple(row["shape"])) for row in rows], fontsize=8)
    axes.set_ylabel("median ms (lower is better)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    try:
        with writing(output, replace=replace) as temporary:
            try:
                figure.savefig(temporary)  # the format follows the suffix
            except ValueError as error:
                raise DeformcliError(f"{output}: {error}") from None
    finally:
        plt.close(figure)
    return output
