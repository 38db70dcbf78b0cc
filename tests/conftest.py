import pytest
import torch

import deformcli.ops.deform_conv


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["gather", "grid_sample"])
def formulation(request, monkeypatch) -> str:
    """Run a test on both formulations of the op: the CPU gather kernel, and the grid_sample
    one (GPUs, exported graphs, autograd under TorchScript or torch.compile), forced on CPU
    so it is covered without a GPU."""
    if request.param == "grid_sample":
        monkeypatch.setattr(deformcli.ops.deform_conv, "_grid_sample_for_autograd", lambda *a: True)
    return request.param
