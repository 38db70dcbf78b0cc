"""Property-based comparison with torchvision over random small configurations."""

import torch
import torchvision
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from deformcli import deform_conv2d
from tests.helpers import assert_close_scaled, forward_and_grads, make_problem, names_for

pair = st.tuples(st.integers(1, 2), st.integers(1, 2))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(0, 2),
    groups=st.sampled_from([1, 2]),
    offset_groups=st.sampled_from([1, 2, 3]),
    channels_per_block=st.integers(1, 2),
    out_per_group=st.integers(1, 2),
    size=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=pair,
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=pair,
    with_mask=st.booleans(),
    with_bias=st.booleans(),
    integer_offsets=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_configurations_match_torchvision(
    batch,
    groups,
    offset_groups,
    channels_per_block,
    out_per_group,
    size,
    kernel,
    stride,
    padding,
    dilation,
    with_mask,
    with_bias,
    integer_offsets,
    seed,
):
    for axis in range(2):
        span = dilation[axis] * (kernel[axis] - 1) + 1
        assume(size[axis] + 2 * padding[axis] >= span)
    torch.manual_seed(seed)
    in_channels = groups * offset_groups * channels_per_block
    problem = make_problem(
        batch=batch,
        in_channels=in_channels,
        out_channels=groups * out_per_group,
        size=size,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        offset_groups=offset_groups,
        with_mask=with_mask,
        with_bias=with_bias,
        integer_offsets=integer_offsets,
        offset_scale=2.0,
    )
    expected = forward_and_grads(torchvision.ops.deform_conv2d, problem)
    actual = forward_and_grads(deform_conv2d, problem)
    for name, a, e in zip(names_for(problem), actual, expected, strict=True):
        assert_close_scaled(a, e, 1e-10, name)
