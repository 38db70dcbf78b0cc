"""Pictures (need the ``plot`` extra: matplotlib): the bar chart of a ``deformcli bench`` table,
and an input beside the two models' output maps and their difference (``demo``,
``verify --plot``)."""

from pathlib import Path

from torch import Tensor

from deformcli.errors import DeformcliError
from deformcli.output_file import check_output, writing

IMPLEMENTATION_COLUMNS = (
    ("deformcli_ms", "deformcli"),
    ("torchvision_ms", "torchvision"),
    ("dense_ms", "dense conv2d"),
)


class MatplotlibMissingError(DeformcliError):
    """A picture was asked for where matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MatplotlibMissingError(
            "pictures need matplotlib: pip install 'deformcli[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def is_image_map(output: Tensor) -> bool:
    """Whether a model output can be drawn as a map: ``(N, C, H, W)`` with H, W > 1."""
    return output.dim() == 4 and output.shape[-1] > 1 and output.shape[-2] > 1


def plot_comparison(
    image: Tensor,
    reference: Tensor,
    converted: Tensor,
    output: str | Path,
    labels: tuple[str, str] = ("torchvision's kernel", "deformcli"),
    replace: bool = False,
    title: str | None = None,
) -> Path:
    """One PNG, side by side: the input image (first sample, first three channels), the first
    channel of the reference's and the converted model's output maps ``(N, C, H, W)``, and their
    absolute difference with its maximum in the title."""
    plt = _pyplot()
    output = check_output(output, replace=replace)
    picture = image[0, :3].detach().float()
    picture = (picture - picture.min()) / (picture.max() - picture.min()).clamp_min(1e-12)
    first, second = reference[0, 0].detach().float(), converted[0, 0].detach().float()
    difference = (first - second).abs()
    low, high = min(first.min(), second.min()).item(), max(first.max(), second.max()).item()
    figure, axes = plt.subplots(1, 4, figsize=(16, 4.4), dpi=72)
    axes[0].imshow(picture.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
    axes[0].set_title("input")
    for axis, values, label in ((axes[1], first, labels[0]), (axes[2], second, labels[1])):
        axis.imshow(values.numpy(), cmap="magma", vmin=low, vmax=high)
        axis.set_title(label)
    shown = axes[3].imshow(difference.numpy(), cmap="viridis")
    axes[3].set_title(f"|difference|, max {difference.max().item():.2e}")
    figure.colorbar(shown, ax=axes[3], fraction=0.046)
    for axis in axes:
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    try:
        with writing(output, replace=replace) as temporary:
            figure.savefig(temporary, format="png")
    finally:
        plt.close(figure)
    return output


def plot_timings(rows: list[dict], output: str | Path, title: str, replace: bool = False) -> Path:
    """Grouped bars, one group per shape, median milliseconds of each implementation, with the
    speedup over torchvision written above each group. Writes a PNG (or any format matplotlib
    infers from the suffix)."""
    plt = _pyplot()
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
