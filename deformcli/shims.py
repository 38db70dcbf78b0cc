"""Opt-in import shims: run unmodified model code that imports a compiled DCN extension.

Model files import ``mmcv.ops``, ``assets.ops.dcn`` (the DB text detector), ``basicsr.ops.dcn``
or CharlesShang's ``dcn_v2`` (any module named ``dcn_v2``: the top-level one YOLACT++ installs,
CenterNet's ``...networks.DCNv2.dcn_v2``), which fail on a machine without the compiled
extension. While the shims are installed, those imports (and their submodules
``mmcv.ops.deform_conv``, ``assets.ops.dcn.modules.deform_conv``, ...) resolve to deformcli's
drop-in layers instead, whatever is on ``sys.path``. Parent packages (``mmcv``, ``assets``,
``basicsr``...) still import from disk when they exist there, and are empty stand-ins when they
do not.

    import deformcli.shims
    deformcli.shims.install()                      # for the rest of the process
    from my_project.model import build_model       # imports assets.ops.dcn
    model = build_model()                          # DB imports it here, inside __init__

or, scoped, with everything that touches the model's code inside the block:

    with deformcli.shims.activated():
        from my_project.model import build_model
        model = build_model()

Model code may import the extension lazily (DB does it inside ``BasicBlock.__init__``), so the
shims must be active while the model is *built*, not only while its module is imported.

Every other name of those modules (``mmcv.ops.CARAFEPack``...) imports as a placeholder that
fails, naming itself, when it is constructed or called; ``mmcv.ops`` itself also provides the
detection ops DCN detectors run (:mod:`deformcli.mmcv_ops`: ``nms``, ``batched_nms``,
``RoIAlign``...) and registers ``DCN``/``DCNv2`` in mmengine's ``MODELS`` as mmcv does.
"""

import contextlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Iterator

from deformcli import mmcv_ops
from deformcli.families import basicsr, db, dcn_v2

__all__ = ["SHIMMED_MODULES", "activated", "install", "is_installed", "uninstall"]

#: Shimmed module name -> the deformcli module whose public names it provides. Every other
#: submodule of ``mmcv.ops`` (``mmcv.ops.nms``, ``mmcv.ops.carafe``...) is ``mmcv_ops`` too.
SHIMMED_MODULES: dict[str, types.ModuleType] = {
    "mmcv.ops": mmcv_ops,
    "assets.ops.dcn": db,
    "assets.ops.dcn.modules": db,
    "assets.ops.dcn.modules.deform_conv": db,
    "assets.ops.dcn.functions": db,
    "assets.ops.dcn.functions.deform_conv": db,
    "basicsr.ops.dcn": basicsr,
    "basicsr.ops.dcn.deform_conv": basicsr,
}

_PARENT_PACKAGES = frozenset({"mmcv", "assets", "assets.ops", "basicsr", "basicsr.ops"})


def _source_of(name: str) -> types.ModuleType | None:
    if name.startswith("mmcv.ops."):
        return mmcv_ops
    if name.rpartition(".")[2] == "dcn_v2":
        # CharlesShang's DCNv2 wherever it is vendored: CenterNet's
        # lib.models.networks.DCNv2.dcn_v2, SMOKE's smoke.layers.dcn_v2, the top-level dcn_v2.
        return dcn_v2
    return SHIMMED_MODULES.get(name)


class _ShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if _source_of(fullname) is not None:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        if fullname in _PARENT_PACKAGES:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    return spec
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []
        source = _source_of(module.__name__)
        if source is None:
            return  # an empty parent package
        for name in source.__all__:
            setattr(module, name, getattr(source, name))
        module.__doc__ = f"deformcli shim for {module.__name__}: {', '.join(source.__all__)}."
        module.__getattr__ = _placeholders(module, source.__all__)
        if module.__name__ == "mmcv.ops":
            mmcv_ops.register_in_mmengine()


def _placeholders(module: types.ModuleType, provided: list[str]):
    """Any other public name imports as a placeholder that fails when used (model packages
    import dozens of ops at module level that a DCN model never runs)."""

    def placeholder(name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        stand_in = mmcv_ops.unavailable(module.__name__, name, provided)
        setattr(module, name, stand_in)
        return stand_in

    return placeholder


_finder = _ShimFinder()
# Who holds the shims: an explicit install() holds them until uninstall(); each open
# activated() block holds them until it exits. They go away when nobody holds them, so a block
# never undoes an install() made before or inside it, and nested blocks compose.
_holders = {"installed": False, "blocks": 0}


def install() -> None:
    """Make the shimmed imports resolve to deformcli's layers until :func:`uninstall`
    (idempotent; ``activated()`` blocks never undo it)."""
    _holders["installed"] = True
    _insert_finder()


def uninstall() -> None:
    """Remove the shims and forget the modules they created (classes already imported stay)."""
    _holders["installed"] = False
    _holders["blocks"] = 0
    _remove_finder()


def is_installed() -> bool:
    return _finder in sys.meta_path


@contextlib.contextmanager
def activated() -> Iterator[None]:
    """Install the shims for the duration of a ``with`` block.

    Imports made inside keep the classes they got. Build the model inside the block too when
    its code imports the extension lazily (in ``__init__``, as DB does). The shims stay if
    :func:`install` was called before or inside the block.
    """
    _holders["blocks"] += 1
    _insert_finder()
    try:
        yield
    finally:
        _holders["blocks"] = max(0, _holders["blocks"] - 1)
        if not _holders["installed"] and _holders["blocks"] == 0:
            _remove_finder()


def _insert_finder() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def _remove_finder() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    for name, module in list(sys.modules.items()):
        if getattr(module, "__spec__", None) is not None and module.__spec__.loader is _finder:
            del sys.modules[name]
