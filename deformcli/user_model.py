"""The user's model: build it from a factory under the import shims, fit a checkpoint to it,
and load a converted file into it.

Model code may import a compiled DCN extension at any point of its life: at module level, inside
``__init__`` (DB's ResNet does ``from assets.ops.dcn import ModulatedDeformConv`` in
``BasicBlock.__init__``) or even in ``forward``. Everything deformcli does with the user's code
therefore runs inside :func:`user_code`: the shims are active and the current directory is
importable for the whole import, build, verification and export, and never removed under an
``install()`` the user made.
"""

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from deformcli import shims
from deformcli.errors import ModelError
from deformcli.families._base import DeformableConvBase
from deformcli.families.mmcv import rename_version1_offset_keys

__all__ = [
    "build_model",
    "build_network",
    "fit_state_dict",
    "load_model",
    "name_layers",
    "user_code",
]

#: ``pkg.module:factory``, or the factory itself.
Factory = str | Callable[..., nn.Module]


@contextlib.contextmanager
def user_code() -> Iterator[None]:
    """Run the user's model code: import shims active, the current directory importable (as
    with ``python -m``). Both are undone on exit unless they were there before."""
    added_cwd = "" not in sys.path and "." not in sys.path
    if added_cwd:
        sys.path.insert(0, "")
    try:
        with shims.activated():
            yield
    finally:
        if added_cwd and "" in sys.path:
            sys.path.remove("")


def build_model(factory: Factory, kwargs: str | dict | None = None) -> nn.Module:
    """Call ``factory`` (``pkg.module:factory``, a function or class, or a callable) with keyword
    arguments (a dict, or a JSON object as text) inside :func:`user_code`.

    Raises ModelError naming the factory when it cannot be imported or called, exits the
    interpreter (``SystemExit``), or returns something that is not an ``nn.Module``.
    """
    kwargs = _parse_kwargs(kwargs)
    with user_code():
        if isinstance(factory, str):
            label = f"model factory {factory!r}"
            call = _import_factory(factory)
        else:
            label = getattr(factory, "__qualname__", repr(factory))
            call = factory
        name = getattr(call, "__name__", "factory")
        try:
            model = call(**kwargs)
        except (Exception, SystemExit) as error:
            raise ModelError(
                f"{label}: calling {name}(**{kwargs}) failed: {_describe(error)}"
            ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{label}: {name} returned {type(model).__name__}, not a torch.nn.Module")
    name_layers(model)
    return model


def build_network(
    factory: Factory | None = None,
    kwargs: str | dict | None = None,
    config: str | os.PathLike | None = None,
) -> nn.Module:
    """The user's model from a factory (:func:`build_model`) or an mmengine config file
    (:func:`deformcli.mmlab.build_from_config`): exactly one of the two."""
    if (factory is None) == (config is None):
        raise ModelError("give either a model factory or an mmengine config, not both or neither")
    if config is not None:
        from deformcli.mmlab import build_from_config

        return build_from_config(config)
    return build_model(factory, kwargs)


def _parse_kwargs(kwargs: str | dict | None) -> dict:
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs) if kwargs.strip() else {}
        except json.JSONDecodeError as error:
            raise ModelError(f"model keyword arguments are not valid JSON: {error}") from None
    if not isinstance(kwargs, dict):
        kind = type(kwargs).__name__
        raise ModelError(f"model keyword arguments must be a JSON object, got {kind}")
    return kwargs


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelError(f"model factory {spec!r}: expected 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:
        raise ModelError(
            f"model factory {spec!r}: cannot import {module_name!r}: {_describe(error)}"
        ) from None
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise ModelError(f"model factory {spec!r}: {module_name} has no callable {attribute!r}")
    return factory


def _describe(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"it called sys.exit({error.code!r})"
    return f"{type(error).__name__}: {error}"


def name_layers(model: nn.Module) -> None:
    """Tell each deformcli family layer its path in ``model``, for its warnings and errors."""
    for path, module in model.named_modules():
        if isinstance(module, DeformableConvBase):
            module.layer_path = path


def fit_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor]
) -> tuple[dict[str, Tensor], list[str]]:
    """Strip the prefixes that stand between checkpoint keys and the model's (``module.``, a
    trainer's ``model.``...), apply mmcv's version-1 key renaming, and load strictly.

    Raises ModelError listing missing and unexpected keys when the weights do not fit.
    """
    notes: list[str] = []
    expected = set(model.state_dict())
    keys = dict(state_dict)
    while keys and not (set(keys) & expected):
        first = next(iter(keys))
        prefix = first.split(".", 1)[0] + "."
        if "." not in first or not all(k.startswith(prefix) for k in keys):
            break
        keys = {k[len(prefix) :]: v for k, v in keys.items()}
        notes.append(f"stripped the {prefix!r} prefix to match the model's keys")
    # DB's own layout also has <name>_offset beside <name>: rename only where the model wants it.
    upgraded, renamed = rename_version1_offset_keys(keys)
    if renamed and all(new in expected and old not in expected for old, new in renamed):
        keys = upgraded
        notes.append(f"renamed {len(renamed)} mmcv version-1 offset keys (<name>_offset.*)")
    missing = sorted(expected - set(keys))
    unexpected = sorted(set(keys) - expected)
    model_state = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {list(value.shape)}, model {list(model_state[key].shape)}"
        for key, value in keys.items()
        if key in model_state and value.shape != model_state[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ModelError(
            "the checkpoint does not fit the model: "
            + "; ".join(
                part
                for part in (
                    _listing("missing keys", missing),
                    _listing("unexpected keys", unexpected),
                    _listing("tensors of another shape", mismatched, limit=4),
                )
                if part
            )
        )
    try:
        model.load_state_dict(keys, strict=True)
    except RuntimeError as error:
        raise ModelError(f"the checkpoint does not fit the model: {error}") from None
    return keys, notes


def _listing(label: str, keys: list[str], limit: int = 8) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {label} ({shown}{more})"


def load_model(
    path: str | Path,
    factory: Factory | None = None,
    model_kwargs: str | dict | None = None,
    *,
    config: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
) -> nn.Module:
    """Build the user's model and load a converted file into it, ready for inference.

    Args:
        path: a ``.safetensors`` written by ``deformcli convert`` (or any checkpoint
            :func:`deformcli.checkpoint.load_checkpoint` reads; pickles need ``trust_pickle``
            only when they hold objects).
        factory: ``"pkg.module:factory"`` or the factory itself; it is called with the import
            shims active, so model code that imports ``assets.ops.dcn``, ``mmcv.ops`` or
            ``basicsr.ops.dcn`` (at module level or inside ``__init__``) gets deformcli's layers.
        model_kwargs: keyword arguments for the factory (a dict or a JSON object as text).
        config: instead of a factory, an mmengine config file whose ``model`` to build.
        device: where to put the model.

    Returns:
        The model in eval mode with the file's weights, loaded strictly (prefixes such as a
        trainer's ``model.module.`` are stripped, as ``convert`` does). Needs no torchvision.

    Example::

        model = deformcli.load_model("final.deformcli.safetensors", "dbfactory:build_r50")
        probability_map = model(images)  # (N, 1, H, W)
    """
    from deformcli.checkpoint import load_checkpoint
    from deformcli.surgery import swap

    model = build_network(factory, model_kwargs, config)
    fit_state_dict(model, load_checkpoint(path, trust_pickle=trust_pickle).state_dict)
    swap(model)  # layers built without the shims (torchvision's, say) become ours too
    name_layers(model)
    return model.to(device).eval()
