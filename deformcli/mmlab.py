"""Models of the OpenMMLab family (mmdet, mmocr...) built from their mmengine config files.

``build_from_config("dbnet_resnet50-dcnv2_fpnc_1200e_icdar2015.py")`` reads the config, builds
its ``model`` through the registry of the config's default scope with deformcli's import shims
active (so ``DCNv2`` resolves to deformcli's layer and no compiled mmcv is needed), after
removing every ``init_cfg``, so that nothing is downloaded and no weights are initialised from
files: the checkpoint provides them.
"""

import os
from pathlib import Path

from torch import nn

from deformcli.errors import ModelError, first_line
from deformcli.user_model import name_layers, user_code

__all__ = ["build_from_config", "without_init_cfg"]


def build_from_config(config: str | os.PathLike) -> nn.Module:
    """The ``model`` of an mmengine config file, built with the shims active.

    Raises ModelError naming the file when mmengine is missing, the config cannot be read, or
    the model cannot be built.
    """
    path = Path(config)
    if not path.is_file():
        raise ModelError(f"config {path}: no such file")
    with user_code():
        try:
            from mmengine.config import Config
            from mmengine.registry import MODELS, init_default_scope
        except ImportError:
            raise ModelError(
                f"config {path}: building from a config needs mmengine (pip install mmengine; "
                "see the README's mmdet / mmocr section for the versions tested)"
            ) from None
        try:
            parsed = Config.fromfile(str(path))
        except Exception as error:
            raise ModelError(f"config {path}: cannot read it: {_described(error)}") from None
        if "model" not in parsed:
            raise ModelError(f"config {path}: has no 'model' entry")
        scope = parsed.get("default_scope")
        try:
            if scope:
                init_default_scope(scope)
            with MODELS.switch_scope_and_registry(scope) as registry:
                model = registry.build(without_init_cfg(parsed.model))
        except Exception as error:
            raise ModelError(
                f"config {path}: building its model failed: {_described(error)}"
            ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"config {path}: its model is a {type(model).__name__}, not a module")
    name_layers(model)
    return model.eval()


def without_init_cfg(config: object) -> object:
    """A copy of a (nested) model config with every ``init_cfg`` and ``pretrained`` removed;
    mappings keep their type (mmdet reads ``ConfigDict`` entries as attributes)."""
    if isinstance(config, dict):
        return type(config)(
            {
                key: without_init_cfg(value)
                for key, value in config.items()
                if key not in ("init_cfg", "pretrained")
            }
        )
    if isinstance(config, (list, tuple)):
        return type(config)(without_init_cfg(value) for value in config)
    return config


def _described(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}"
