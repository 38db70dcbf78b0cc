"""Opt-in import shims: run unmodified model code that imports a compiled DCN extension.

Model files import ``mmcv.ops``, ``assets.ops.dcn`` (the DB text detector) or
``basicsr.ops.dcn``, which fail on a machine without the compiled extension. While the shims are
installed, those imports (and their submodules ``mmcv.ops.deform_conv``,
``assets.ops.dcn.modules.deform_conv``, ...) resolve to deformcli's drop-in layers instead,
whatever is on ``sys.path``. Parent packages (``mmcv``, ``assets``, ``basicsr``...) still import
from disk when they exist there, and are empty stand-ins when they do not.

    import deformcli.shims
    with deformcli.shims.activated():
        from my_project.model import build_model   # imports assets.ops.dcn
    model = build_model()

Names the real packages have but the shims do not (``mmcv.ops.nms``...) raise an ImportError
that says so.
"""

import contextlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Iterator

from deformcli.families import basicsr, legacy_dcn, mmcv

__all__ = ["SHIMMED_MODULES", "activated", "install", "is_installed", "uninstall"]

#: Shimmed module name -> the deformcli module whose public names it provides.
SHIMMED_MODULES: dict[str, types.ModuleType] = {
    "mmcv.ops": mmcv,
    "mmcv.ops.deform_conv": mmcv,
    "mmcv.ops.modulated_deform_conv": mmcv,
    "assets.ops.dcn": legacy_dcn,
    "assets.ops.dcn.modules": legacy_dcn,
    "assets.ops.dcn.modules.deform_conv": legacy_dcn,
    "assets.ops.dcn.functions": legacy_dcn,
    "assets.ops.dcn.functions.deform_conv": legacy_dcn,
    "basicsr.ops.dcn": basicsr,
    "basicsr.ops.dcn.deform_conv": basicsr,
}

_PARENT_PACKAGES = frozenset({"mmcv", "assets", "assets.ops", "basicsr", "basicsr.ops"})


class _ShimFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname in SHIMMED_MODULES:
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
        source = SHIMMED_MODULES.get(module.__name__)
        if source is None:
            return  # an empty parent package
        for name in source.__all__:
            setattr(module, name, getattr(source, name))
        module.__doc__ = f"deformcli shim for {module.__name__}: {', '.join(source.__all__)}."
        module.__getattr__ = _missing_name(module.__name__, source.__all__)


def _missing_name(module_name: str, provided: list[str]):
    def missing(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"{module_name}.{name} is not available: deformcli's import shim for {module_name} "
            f"provides only deformable convolution ({', '.join(provided)})"
        )

    return missing


_finder = _ShimFinder()


def install() -> None:
    """Make the shimmed imports resolve to deformcli's layers (idempotent)."""
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Remove the shims and forget the modules they created."""
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    for name, module in list(sys.modules.items()):
        if getattr(module, "__spec__", None) is not None and module.__spec__.loader is _finder:
            del sys.modules[name]


def is_installed() -> bool:
    return _finder in sys.meta_path


@contextlib.contextmanager
def activated() -> Iterator[None]:
    """Install the shims for the duration of a ``with`` block (imports made inside keep the
    classes they got)."""
    already = is_installed()
    install()
    try:
        yield
    finally:
        if not already:
            uninstall()
