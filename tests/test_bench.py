"""deformcli.bench as a library."""

import pytest
import torch

import deformcli.bench
from deformcli.bench import (
    _quartiles,
    check_benchmark,
    make_layer_inputs,
    peak_memory_mib,
    run_benchmark,
    time_layer,
    time_model,
)
from deformcli.validation import InputError


def test_a_layer_timing_has_medians_and_the_spread_of_the_same_rounds():
    timing = time_layer((1, 8, 12, 12), rounds=5, warmup=1)
    assert set(timing.spread_ms) == {"deformcli", "torchvision", "dense"}
    for name, median in (("deformcli", timing.deformcli_ms), ("dense", timing.dense_ms)):
        low, high = timing.spread_ms[name]
        assert 0 < low <= median <= high
    assert timing.to_dict()["ratio_to_dense"] == pytest.approx(timing.ratio_to_dense)


def test_run_benchmark_times_each_layer_and_reports_progress():
    steps = []
    timings = run_benchmark(
        [(1, 4, 6, 6), (1, 8, 5, 7)], rounds=1, memory=True, on_step=lambda: steps.append(1)
    )
    assert [t.shape for t in timings] == [(1, 4, 6, 6), (1, 8, 5, 7)] and len(steps) == 2
    assert all(t.deformcli_ms > 0 and t.dense_ms > 0 for t in timings)
    assert set(timings[0].peak_mib) == {"deformcli", "torchvision", "dense"}
    assert "peak_mib" in timings[0].to_dict()
    assert "peak_mib" not in run_benchmark([(1, 4, 6, 6)], rounds=1)[0].to_dict()


def test_peak_memory_of_a_training_pass_counts_its_gradients():
    # Forward and backward hold the output, its gradient and the input's: more than the
    # inference forward's output alone (4 MiB here).
    shape = (1, 32, 128, 128)
    inference = peak_memory_mib("dense", shape)
    training = peak_memory_mib("dense", shape, backward=True)
    if inference is None:
        pytest.skip("no /proc to read peak memory from")
    assert 2 <= inference < training


def test_channels_last_layers_and_model(monkeypatch):
    tensors = make_layer_inputs((1, 8, 5, 7), channels_last=True)
    assert all(
        t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        for t in tensors.values()
    )
    assert time_layer((1, 8, 5, 7), rounds=1, channels_last=True).channels_last
    # The model and its image go channels-last too: every convolution of ours and of the dense
    # model sees it so. (torchvision's op returns contiguous outputs, whatever its input.)
    monkeypatch.setattr(deformcli.bench, "torchvision_available", lambda: False)
    seen = []
    conv2d = torch.nn.functional.conv2d

    def recording_conv2d(input, *args, **kwargs):
        seen.append(input.is_contiguous(memory_format=torch.channels_last))
        return conv2d(input, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording_conv2d)
    timing = time_model(rounds=1, warmup=0, size=64, channels_last=True)
    assert timing.channels_last and seen and all(seen)


def test_grouped_layers():
    # ResNeXt-style layers: the weight is (C, C / groups, 3, 3) and all three implementations
    # (dense conv2d too) run it in groups; channels that do not split are refused.
    tensors = make_layer_inputs((1, 8, 5, 7), groups=4)
    assert tensors["weight"].shape == (8, 2, 3, 3)
    timing = time_layer((1, 8, 5, 7), rounds=1, groups=4)
    assert timing.groups == 4 and timing.to_dict()["groups"] == 4
    assert set(timing.spread_ms) == {"deformcli", "torchvision", "dense"}
    [with_memory] = run_benchmark([(1, 8, 5, 7)], rounds=1, memory=True, groups=4)
    assert with_memory.groups == 4 and set(with_memory.peak_mib) == set(timing.spread_ms)
    with pytest.raises(InputError, match="8 channels do not split into 3 groups"):
        make_layer_inputs((1, 8, 5, 7), groups=3)
    # Refused before any timing, the whole model's too.
    with pytest.raises(InputError, match="8 channels do not split into 3 groups"):
        check_benchmark([(1, 6, 5, 7), (1, 8, 5, 7)], torch.float32, groups=3)
    with pytest.raises(InputError, match="not to the example DBNet"):
        run_benchmark(None, groups=2)


def test_quartiles():
    assert _quartiles([5.0]) == [5.0, 5.0]
    assert _quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == [2.0, 4.0]


def test_layer_inputs_refuse_what_cannot_fit():
    tensors = make_layer_inputs((2, 4, 5, 6), torch.float64)
    assert tensors["offset"].shape == (2, 18, 5, 6) and tensors["weight"].dtype == torch.float64
    with pytest.raises(InputError, match="weight"):
        make_layer_inputs((1, 10**6, 4, 4))
    with pytest.raises(InputError, match="between 1 and"):
        make_layer_inputs((1, 0, 4, 4))
