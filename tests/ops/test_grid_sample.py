"""The grid_sample formulation (deformcli.ops._grid_sample), forced on CPU: split channels and
kept sampling points (GPUs, exported graphs and autograd under TorchScript or torch.compile
run it; tests/ops/test_deform_conv.py runs the whole op on both formulations)."""

import pytest
import torchvision

import deformcli.ops._grid_sample
import deformcli.ops.deform_conv
from deformcli.ops._grid_sample import _MIN_CHANNELS_PER_THREAD, _channel_splits
from tests.helpers import GEOMETRIES, check_against, check_kept_sampling_points, make_problem

TV = torchvision.ops.deform_conv2d


@pytest.mark.parametrize("splits", [2, 4])
def test_split_channels_match_torchvision(monkeypatch, splits):
    # On GPUs grid_sample's channels are split across threads; the split must not change a
    # value or a gradient (batch 2 and 3 offset groups: the points are copied per split).
    monkeypatch.setattr(deformcli.ops.deform_conv, "_grid_sample_for_autograd", lambda *a: True)
    monkeypatch.setattr(deformcli.ops._grid_sample, "_channel_splits", lambda *a: splits)
    problem = make_problem(in_channels=24, groups=2, offset_groups=3, **GEOMETRIES["asymmetric"])
    check_against(TV, problem, 1e-10)


def test_kept_sampling_points_serve_inference_then_training(monkeypatch):
    monkeypatch.setattr(deformcli.ops.deform_conv, "_grid_sample_for_autograd", lambda *a: True)
    check_kept_sampling_points(TV)


def test_channel_splits_fill_the_gpu_threads_and_stop_at_the_floor():
    # (1, 512, 20, 20), 3x3: 3600 points. Splits double until a thread has 8 channels left.
    assert _channel_splits(512, 3600, "cuda") == 64
    assert _MIN_CHANNELS_PER_THREAD == 512 // 64
    assert _channel_splits(512, 2**18, "cuda") == 1  # enough threads already
    assert _channel_splits(24, 3600, "cuda") == 2  # 24 -> 12 (12 -> 6 is below 8)
    assert _channel_splits(9, 3600, "cuda") == 1  # no power of two divides it
    assert _channel_splits(512, 3600, "cpu") == 1  # CPU kernels vectorise over points
