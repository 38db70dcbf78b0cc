"""``deformcli demo`` and ``verify --plot``: the picture's panels come from the two models."""

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import deformcli.demo
import deformcli.plot
from deformcli.cli import app
from deformcli.models.dbnet import build_dbnet
from deformcli.user_model import fit_state_dict


def test_demo_draws_both_models_on_a_text_image(tmp_path, monkeypatch):
    drawn = {}
    real_plot = deformcli.demo.plot_comparison

    def capture(image, reference, converted, path, **kwargs):
        drawn.update(image=image, reference=reference, converted=converted)
        return real_plot(image, reference, converted, path, **kwargs)

    monkeypatch.setattr(deformcli.demo, "plot_comparison", capture)
    report = deformcli.demo.run_demo(tmp_path, size=64, rounds=1)
    picture = Image.open(report.picture)
    picture.verify()
    assert picture.format == "PNG" and picture.size[0] > 3 * picture.size[1]
    # The panels are the original (torchvision's kernel) and a deformcli model with its weights.
    image = deformcli.demo.text_image(64)
    assert torch.equal(drawn["image"], image)
    original = build_dbnet("torchvision")
    ours = build_dbnet("deformcli", seed=None)
    fit_state_dict(ours, original.state_dict())
    with torch.no_grad():
        assert torch.equal(drawn["reference"], original(image))
        assert torch.equal(drawn["converted"], ours.eval()(image))
    assert report.map_max_abs_difference < 1e-5
    assert set(report.bench.spread_ms) == {"deformcli", "torchvision", "dense"}
    assert report.to_dict()["picture"] == str(report.picture)


def test_without_matplotlib_the_demo_says_how_to_get_the_picture(tmp_path, monkeypatch):
    def missing():
        raise deformcli.plot.MatplotlibMissingError("pictures need matplotlib: pip install")

    monkeypatch.setattr(deformcli.plot, "_pyplot", missing)
    report = deformcli.demo.run_demo(tmp_path, size=64, rounds=1)
    assert report.picture is None and "pip install" in report.picture_note
    assert not (tmp_path / "demo.png").exists()


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
    assert not deformcli.plot.is_image_map(torch.zeros(shape))
