"""The column-memory cap (deformcli.ops._chunking): chunk sizes, and chunked results."""

import pytest
import torch
import torchvision

from deformcli import get_max_column_bytes, set_max_column_bytes
from deformcli.ops import _chunking
from deformcli.ops._chunking import chunk_rows
from tests.helpers import check_chunked_columns, make_problem

TV = torchvision.ops.deform_conv2d
MIB = 2**20


@pytest.fixture
def default_caps(monkeypatch):
    """The default caps, restored after the test whatever it sets."""
    monkeypatch.setattr(_chunking, "_max_column_bytes", [4 * MIB, 512 * MIB])


@pytest.mark.usefixtures("formulation")
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("rows_per_chunk", [1, 3])
def test_chunked_columns_match_torchvision(monkeypatch, rows_per_chunk, groups):
    # 3 rows per chunk over 2 images of 40 rows: chunk 39:42 crosses from one image to the
    # next. With grads, grid_sample uses at most 8 chunks (here 5 rows each); the gather
    # kernel keeps to the cap.
    problem = make_problem(batch=2, in_channels=12, size=(40, 24), groups=groups, offset_groups=3)
    bytes_per_row = 24 * 9 * 12 * problem.input.element_size()  # W_out * K * C_in * 8
    check_chunked_columns(TV, problem, rows_per_chunk * bytes_per_row, monkeypatch)


@pytest.mark.parametrize("chunks_per_block", [1, 2])
def test_sampling_blocks_of_chunks_match_torchvision(monkeypatch, chunks_per_block):
    # The CPU kernel computes corner rows and weights a block of chunks at a time: blocks of
    # one chunk and of two (3 rows each, over 2 images of 40 rows: blocks cross images too).
    problem = make_problem(batch=2, in_channels=12, size=(40, 24), offset_groups=3)
    points_per_row = 24 * 9 * 3  # W_out * K * offset_groups
    monkeypatch.setattr(_chunking, "_MAX_BLOCK_POINTS", chunks_per_block * 3 * points_per_row)
    assert _chunking.block_rows(points_per_row, 3) == chunks_per_block * 3
    bytes_per_row = 24 * 9 * 12 * problem.input.element_size()
    check_chunked_columns(TV, problem, 3 * bytes_per_row, monkeypatch)


def test_set_max_column_bytes_rejects_non_positive():
    with pytest.raises(ValueError, match="positive"):
        set_max_column_bytes(0)


@pytest.mark.usefixtures("default_caps")
def test_cpu_and_other_devices_have_their_own_cap():
    assert get_max_column_bytes("cpu") == 4 * MIB
    assert get_max_column_bytes("cuda") == get_max_column_bytes("mps") == 512 * MIB
    set_max_column_bytes(3 * MIB, "mps")
    assert get_max_column_bytes("cuda") == 3 * MIB and get_max_column_bytes() == 4 * MIB


@pytest.mark.usefixtures("default_caps")
def test_chunk_rows_fills_the_cap_within_its_floors():
    # 4 MiB of 100 KiB rows: 40 rows.
    assert chunk_rows(100, 200, 100 * 1024, False, "cpu") == 40
    # Rows of 1 MiB: 4 by the cap, but at least 1024 positions (6 rows of 200).
    assert chunk_rows(100, 200, MIB, False, "cpu") == 6
    # Rows beyond the cap still come one at a time.
    assert chunk_rows(100, 2048, 64 * MIB, False, "cpu") == 1
    # Training keeps to at most 8 chunks: ceil(100 / 8) rows.
    assert chunk_rows(100, 2048, 64 * MIB, True, "cpu") == 13
    # Never more rows than there are, and the GPU cap is its own.
    assert chunk_rows(30, 200, 100 * 1024, False, "cpu") == 30
    assert chunk_rows(10_000, 200, MIB, False, "cuda") == 512


@pytest.mark.usefixtures("default_caps")
def test_graphs_are_not_chunked(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert chunk_rows(100, 2048, 64 * MIB, False, "cpu") == 100
