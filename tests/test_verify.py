"""deformcli.verify as a library: the comparison cannot pass a broken model."""

import pytest
import torch
from torch import nn

from deformcli import DeformConv2d
from deformcli.errors import ModelError
from deformcli.verify import (
    END_TO_END,
    as_tensors,
    compare_models,
    reference_model,
)


class Block(nn.Module):
    """A conv predicting offsets for a deformable layer, then a head returning two maps."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Conv2d(4, 18, 3, padding=1)
        self.deform = DeformConv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.deform(x, self.offset(x))
        return {"map": y, "pooled": [y.mean((2, 3))]}


def compare(converted: nn.Module, inputs: torch.Tensor):
    return compare_models(reference_model(converted), converted, inputs, ["deform"], 1e-5)


def test_a_sound_model_passes_end_to_end_and_per_layer():
    model = Block().eval()
    result = compare(model, torch.randn(1, 4, 8, 8))
    assert result.passed and result.checked == END_TO_END and not result.problems
    assert result.max_rel < 1e-6 and [layer.path for layer in result.layers] == ["deform"]
    assert "outputs" not in result.to_dict()


def test_non_finite_weights_and_inputs_fail_without_running_anything():
    model = Block().eval()
    with torch.no_grad():
        model.deform.weight[0, 0, 0, 0] = float("nan")
    result = compare(model, torch.randn(1, 4, 8, 8))
    assert not result.passed and result.problems == ["deform.weight (1 NaN)"]
    result = compare(Block().eval(), torch.full((1, 4, 8, 8), float("inf")))
    assert not result.passed and result.problems == ["the input (256 inf)"]


def test_non_finite_offsets_stop_the_reference_before_torchvisions_kernel():
    model = Block().eval()
    with torch.no_grad():
        model.offset.bias.fill_(3e38)
        model.offset.weight.fill_(3e38)  # finite weights, offsets overflow to inf
    result = compare(model, torch.ones(1, 4, 8, 8))
    assert not result.passed
    assert result.problems[0].startswith("deform (DeformConv2d): the offset [1, 18, 8, 8]")


def test_non_finite_outputs_and_mismatches_fail_and_nan_is_not_dropped():
    class Broken(Block):
        def forward(self, x):
            out = super().forward(x)
            out["map"] = out["map"].clone()
            out["map"][0, 0, 0, 0] = float("nan")
            return out

    model = Broken().eval()
    reference = Block().eval()
    reference.load_state_dict(model.state_dict())
    result = compare_models(reference_model(reference), model, torch.randn(1, 4, 8, 8), [], 1e-5)
    assert not result.passed
    assert result.problems == ["end-to-end output 0: the converted model gives 1 NaN"]
    assert result.max_rel < 1e-6  # the finite values agree; the NaN alone fails it


def test_failures_name_the_module_and_outputs_are_flattened_in_order():
    model = Block().eval()
    with pytest.raises(ModelError, match=r"failed in offset \(Conv2d\) on an input of shape"):
        compare(model, torch.randn(1, 3, 8, 8))
    tensors = as_tensors({"a": torch.zeros(1), "b": [torch.ones(2), (torch.ones(3),)]})
    assert [t.numel() for t in tensors] == [1, 2, 3]
