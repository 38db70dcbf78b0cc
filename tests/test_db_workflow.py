"""The DB text detector end to end: DB's own model structure (tests/db_standin), a checkpoint as
DB's trainer saves it, `deformcli convert` with a factory that never mentions deformcli, and
`deformcli.load_model` on the result with torchvision absent.

The reference is DB's model code running on its compiled kernel, played by torchvision's kernel
with the CUDA entry point's pointer arithmetic (tests/db_kernel.py), so ResNet-50's offsets,
four times larger than the output in the first block of layer2-4, are read as the GPU read them.
"""

import contextlib
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_close_scaled

HERE = Path(__file__).parent
FACTORY = textwrap.dedent(
    """
    from structure.model import BasicModel


    def _args(backbone, in_channels):
        return {
            "backbone": backbone,
            "backbone_args": {"pretrained": False},
            "decoder": "SegDetector",
            "decoder_args": {"adaptive": True, "in_channels": in_channels, "k": 50},
        }


    def build_r18():
        return BasicModel(_args("deformable_resnet18", [64, 128, 256, 512]))


    def build_r50():
        return BasicModel(_args("deformable_resnet50", [256, 512, 1024, 2048]))
    """
)
DB_MODULES = ("backbones", "decoders", "structure", "assets", "dbfactory")
# The deformable layers whose offsets are larger than their output (ResNet-50 only).
R50_STRIDED = ("backbone.layer2.0.conv2", "backbone.layer3.0.conv2", "backbone.layer4.0.conv2")


def db_checkout(directory: Path, compiled: bool) -> Path:
    """DB's code as a user has it; ``compiled``: with the extension built (the GPU machine)."""
    shutil.copytree(HERE / "db_standin", directory, ignore=shutil.ignore_patterns("*.md"))
    (directory / "dbfactory.py").write_text(FACTORY)
    if compiled:
        for name in ("deform_conv_cuda.py", "deform_conv_cpu.py"):
            shutil.copy(HERE / "db_kernel.py", directory / "assets" / "ops" / "dcn" / name)
    return directory


@contextlib.contextmanager
def imported_from(directory: Path):
    """Import DB's top-level packages from ``directory``, and forget them afterwards."""
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path.remove(str(directory))
        for name in list(sys.modules):
            if name.split(".")[0] in DB_MODULES:
                del sys.modules[name]


def save_as_on_cuda(state_dict: dict, path: Path, monkeypatch) -> None:
    """``torch.save`` as on a GPU: every storage tagged ``cuda:0`` in the file."""
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    try:
        torch.save(state_dict, path)
    finally:
        monkeypatch.undo()


def train_like(model: torch.nn.Module) -> None:
    """Weights a trained DB has and a fresh one lacks: non-zero offset predictors (DB zeroes
    them at init, which would hide how offsets are read) and an unsaturated probability map."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "conv2_offset"):
                weight, bias = module.conv2_offset.weight, module.conv2_offset.bias
                fan_in = weight[0].numel()
                weight.copy_(torch.randn(weight.shape, generator=generator) / fan_in**0.5)
                bias.copy_(torch.randn(bias.shape, generator=generator))
        model.model.module.decoder.binarize[6].weight.mul_(0.1)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(2, 3, 192, 256, generator=torch.Generator().manual_seed(2))


def trained_db(tmp_path: Path, factory: str, inputs: torch.Tensor, monkeypatch):
    """Train-like a DB model on the "GPU machine", save ``final`` as DB's trainer does (the
    SegDetectorModel's state_dict: keys ``model.module.*``, storages on cuda:0), and return the
    file and the reference outputs of the model on ``inputs``."""
    gpu_checkout = db_checkout(tmp_path / "DB-on-gpu", compiled=True)
    with imported_from(gpu_checkout):
        import dbfactory
        from structure.model import SegDetectorModel

        with monkeypatch.context() as patch:
            # Build the trainer's model from the factory's arguments.
            captured = {}
            patch.setattr(dbfactory, "BasicModel", lambda args: captured.setdefault("args", args))
            getattr(dbfactory, factory)()
        trainer_model = SegDetectorModel(captured["args"], "cpu")
        train_like(trainer_model)
        trainer_model.eval()
        with torch.no_grad():
            reference = trainer_model.model.module(inputs)
        checkpoint = tmp_path / "final"
        save_as_on_cuda(trainer_model.state_dict(), checkpoint, monkeypatch)
    return checkpoint, reference


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


LOAD_WITHOUT_TORCHVISION = textwrap.dedent(
    """
    import sys
    sys.modules["torchvision"] = None  # torchvision absent
    import torch
    import deformcli

    model = deformcli.load_model(sys.argv[1], sys.argv[2])
    assert not model.training
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[3])), sys.argv[4])
    assert "torchvision" not in {name.split(".")[0] for name in sys.modules if sys.modules[name]}
    """
)


@pytest.mark.parametrize(
    ("factory", "input_shape"),
    [("build_r18", "1,3,320,320"), ("build_r50", "1,3,640,640")],
)
def test_db_checkpoint_converts_and_loads(tmp_path, monkeypatch, inputs, factory, input_shape):
    checkpoint, reference = trained_db(tmp_path, factory, inputs, monkeypatch)
    checkout = db_checkout(tmp_path / "DB", compiled=False)
    executable = Path(sys.executable).parent / "deformcli"
    command = [str(executable), "convert", str(checkpoint), "--model", f"dbfactory:{factory}"]
    converted = run([*command, "--input-shape", input_shape], checkout)
    assert converted.returncode == 0, converted.stdout + converted.stderr
    assert "Traceback" not in converted.stderr
    output = tmp_path / "final.deformcli.safetensors"
    assert output.is_file()
    assert "stripped the 'model.' prefix" in converted.stdout
    assert "Verification passed" in converted.stdout
    notes = " ".join(converted.stdout.split())
    layers = {"build_r18": 6, "build_r50": 13}[factory]
    assert f"{layers} deformable layer(s) already deformcli's (the model was built" in notes
    for layer in R50_STRIDED:
        assert (f"{layer} (ModulatedDeformConv): offset" in notes) == (factory == "build_r50")

    torch.save(inputs, tmp_path / "x.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_TORCHVISION)
    files = [str(output), f"dbfactory:{factory}", str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    loaded = run([sys.executable, str(script), *files], checkout)
    assert loaded.returncode == 0, loaded.stderr
    assert_close_scaled(torch.load(tmp_path / "y.pt"), reference, 1e-5, factory)


def test_db_import_inside_init_fails_without_shims(tmp_path):
    # What the user hits without deformcli: DB's package imports the compiled extension.
    checkout = db_checkout(tmp_path / "DB", compiled=False)
    with imported_from(checkout):
        import dbfactory

        with pytest.raises(ImportError, match=r"deform_conv_cpu|deform_conv_cuda"):
            dbfactory.build_r18()


def test_shims_cover_a_build_inside_the_block_and_an_install_in_user_code(tmp_path):
    import deformcli.shims
    from deformcli.families import db

    checkout = db_checkout(tmp_path / "DB", compiled=False)
    with imported_from(checkout):
        with deformcli.shims.activated():
            import dbfactory

            model = dbfactory.build_r18()
        assert type(model.backbone.layer2[0].conv2) is db.ModulatedDeformConv
        assert not deformcli.shims.is_installed()
        try:
            # A factory module that calls install() keeps it, even inside a block.
            with deformcli.shims.activated():
                deformcli.shims.install()
            assert deformcli.shims.is_installed()
            with deformcli.shims.activated(), deformcli.shims.activated():
                pass
            assert deformcli.shims.is_installed()
            model = dbfactory.build_r18()
            assert type(model.backbone.layer3[1].conv2) is db.ModulatedDeformConv
        finally:
            deformcli.shims.uninstall()
        assert not deformcli.shims.is_installed()
