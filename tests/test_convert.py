"""The conversion pipeline as a library (deformcli.convert, deformcli.user_model)."""

import json
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import deformcli
from deformcli.convert import convert
from deformcli.errors import ModelError
from deformcli.families import db
from deformcli.families.legacy_dcn import KernelReadWarning
from deformcli.verify import END_TO_END, WEIGHTS_ONLY
from tests.families.standins import DB

# DB-style layers whose offset conv has stride 1 while the deformable conv has stride 2: the
# non-modulated CUDA op rejects this (and so does ours), naming the layer.
STRIDE_MISMATCH = textwrap.dedent(
    """
    from torch import nn


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            from assets.ops.dcn import DeformConv

            self.conv2_offset = nn.Conv2d(4, 18, 3, padding=1)
            self.conv2 = DeformConv(4, 4, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv2(x, self.conv2_offset(x))


    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 1), Block())
    """
)


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "stride_mismatch.py").write_text(STRIDE_MISMATCH)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in ("stride_mismatch", "assets"):
        sys.modules.pop(name, None)


class DbStyleBlock(torch.nn.Module):
    """DB's Bottleneck in small: a stride-1 27-channel offset/mask predictor before a modulated
    DCN with the block's stride."""

    def __init__(self, conv_class, stride=1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 1)
        self.conv2_offset = torch.nn.Conv2d(4, 27, 3, padding=1)
        self.conv2 = conv_class(4, 4, 3, stride=stride, padding=1, bias=False)

    def forward(self, x):
        x = self.conv1(x)
        offset_mask = self.conv2_offset(x)
        return self.conv2(x, offset_mask[:, :18], offset_mask[:, -9:].sigmoid())


def build_lazily(stride=1):
    """A factory that imports DB's layer when called, as DB's ResNet does in ``__init__``."""
    from assets.ops.dcn import ModulatedDeformConv

    return DbStyleBlock(ModulatedDeformConv, stride)


def db_block_checkpoint(path, stride=1):
    """The block built with the original (stand-in) layer, trained-like, saved as DB does."""
    model = DbStyleBlock(DB["ModulatedDeformConv"], stride)
    with torch.no_grad():
        model.conv2_offset.weight.normal_(0, 0.3)
    torch.save(model.state_dict(), path)
    return path


def as_spec(factory) -> str:
    """A ``module:function`` spec for a local factory (convert takes specs, as the CLI does)."""
    module = type(sys)("local_factories")
    module.build = factory
    sys.modules["local_factories"] = module
    return "local_factories:build"


def test_without_a_model_the_result_says_the_model_was_not_run(tmp_path):
    source = db_block_checkpoint(tmp_path / "final")
    result = convert(source)
    assert result.verification.checked == WEIGHTS_ONLY
    assert result.verification.input_shape is None
    with safe_open(str(result.output), "pt") as file:
        recorded = json.loads(file.metadata()["verification"])
    assert recorded["checked"] == WEIGHTS_ONLY and recorded["input_shape"] is None
    assert recorded["layers"][0]["path"] == "conv2"


def test_a_failing_layer_is_named_with_its_class_and_a_hint(tmp_path, user_dir):
    torch.save(
        {
            "0.weight": torch.randn(4, 3, 1, 1),
            "0.bias": torch.randn(4),
            "1.conv2_offset.weight": torch.randn(18, 4, 3, 3),
            "1.conv2_offset.bias": torch.randn(18),
            "1.conv2.weight": torch.randn(4, 4, 3, 3),
        },
        tmp_path / "ckpt.pth",
    )
    with pytest.raises(ModelError) as error:
        convert(tmp_path / "ckpt.pth", model="stride_mismatch:build", input_shape=(1, 3, 8, 8))
    message = str(error.value)
    assert "failed in 1.conv2 (DeformConv)" in message
    assert "invalid spatial size of offset [1, 18, 8, 8]: expected 4x4" in message
    assert "compare the stride of the layer that computes them" in message
    assert not (tmp_path / "ckpt.deformcli.safetensors").exists()


def test_factory_errors_and_sys_exit_are_model_errors(user_dir):
    (user_dir / "exits.py").write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(ModelError, match=r"cannot import 'exits': it called sys.exit\(0\)"):
        deformcli.user_model.build_model("exits:build")
    sys.modules.pop("exits", None)

    def broken():
        raise ValueError("no")

    with pytest.raises(ModelError, match=r"calling broken\(\*\*\{\}\) failed: ValueError: no"):
        deformcli.user_model.build_model(broken)


@pytest.mark.parametrize("stride", [1, 2])
def test_load_model_from_a_callable_and_a_plain_load_state_dict(tmp_path, stride):
    source = db_block_checkpoint(tmp_path / "final", stride)
    factory = as_spec(lambda: build_lazily(stride))
    result = convert(source, model=factory, input_shape=(2, 3, 9, 8))
    assert result.verification.checked == END_TO_END and result.verification.passed
    assert result.verification.max_rel < 1e-5
    model = deformcli.load_model(result.output, lambda: build_lazily(stride))
    assert not model.training and type(model.conv2) is db.ModulatedDeformConv
    assert model.conv2.layer_path == "conv2"
    # Without deformcli.load_model: a model built under the shims loads the file directly.
    with deformcli.shims.activated():
        again = build_lazily(stride)
    again.load_state_dict(load_file(str(result.output)), strict=True)
    x = torch.randn(1, 3, 9, 8)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        output = model(x)
        torch.testing.assert_close(again.eval()(x), output, rtol=0, atol=0)
    messages = [str(w.message) for w in caught if w.category is KernelReadWarning]
    if stride == 1:
        # torchvision's kernel takes these offsets as they are.
        reference = DbStyleBlock(DB["ModulatedDeformConv"], stride).eval()
        reference.load_state_dict(torch.load(source))
        torch.testing.assert_close(output, reference(x).detach(), rtol=0, atol=1e-5)
        assert messages == []
    else:
        # The loaded model names its layer; the one built by hand knows only its class.
        layers = [message.split(":")[0] for message in messages]
        assert layers == ["conv2 (ModulatedDeformConv)", "ModulatedDeformConv"]


def test_a_file_converted_without_a_model_loads_into_the_factory_model(tmp_path):
    # The no-model path keeps the checkpoint's keys (a trainer's model.module.*); load_model
    # strips them as convert --model does.
    model = DbStyleBlock(DB["ModulatedDeformConv"])
    torch.save({f"model.module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "final")
    output = convert(tmp_path / "final").output
    loaded = deformcli.load_model(output, build_lazily)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
