"""deformcli.plot: the comparison picture and the bench chart (need matplotlib)."""

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import deformcli.plot
from deformcli.bench import LayerTiming
from deformcli.cli import app
from deformcli.models.dbnet import build_dbnet
from deformcli.output_file import OutputExistsError
from deformcli.plot import MatplotlibMissingError, is_image_map, plot_comparison, plot_timings


def test_plot_comparison_writes_a_png_of_four_panels_once(tmp_path):
    image = torch.randn(2, 3, 24, 32)
    reference = torch.rand(2, 1, 24, 32)
    converted = reference + 1e-3
    path = plot_comparison(image, reference, converted, tmp_path / "maps.png", title="t")
    picture = Image.open(path)
    picture.verify()
    assert picture.format == "PNG" and picture.size[0] > 3 * picture.size[1]  # side by side
    with pytest.raises(OutputExistsError):
        plot_comparison(image, reference, converted, path)
    single_channel = image[:, :1]
    plot_comparison(single_channel, reference, converted, path, replace=True)
    Image.open(path).verify()


def test_without_matplotlib_nothing_is_written(tmp_path, monkeypatch):
    def missing():
        raise MatplotlibMissingError("pictures need matplotlib: pip install")

    monkeypatch.setattr(deformcli.plot, "_pyplot", missing)
    maps = torch.rand(1, 1, 8, 8)
    with pytest.raises(MatplotlibMissingError, match="pip install"):
        plot_comparison(maps, maps, maps, tmp_path / "maps.png")
    assert list(tmp_path.iterdir()) == []


def test_plot_timings_writes_a_png_once(tmp_path):
    timing = LayerTiming((1, 8, 8, 8), "float32", "cpu", False, 3, 2.0, 6.0, 1.0)
    rows = [timing.to_dict()]
    path = plot_timings(rows, tmp_path / "chart.png", "title")
    Image.open(path).verify()
    with pytest.raises(OutputExistsError):
        plot_timings(rows, path, "title")
    plot_timings(rows, path, "again", replace=True)


def test_verify_plot(tmp_path):
    torch.save(build_dbnet("torchvision").state_dict(), tmp_path / "m.pth")
    args = ["verify", str(tmp_path / "m.pth"), "--model", "deformcli.models.dbnet:build_dbnet"]
    args += ["--input-shape", "1,3,64,64", "--plot", str(tmp_path / "v.png")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    Image.open(tmp_path / "v.png").verify()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.parametrize("shape", [[2, 10], [1, 1, 1, 5]])
def test_only_image_maps_are_drawn(shape):
    assert not is_image_map(torch.zeros(shape))
    assert is_image_map(torch.zeros(1, 1, 2, 2))
