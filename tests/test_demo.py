"""``deformcli demo``: the picture's panels come from the two models."""

import pytest
import torch
from PIL import Image

import deformcli.demo
import deformcli.plot
from deformcli.models.dbnet import build_dbnet
from deformcli.output_file import OutputError
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


def test_an_out_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(OutputError, match="taken: exists and is not a directory"):
        deformcli.demo.run_demo(taken, size=64, rounds=1)
    assert taken.read_text() == "a file"
