"""Model surgery: replace every recognised deformable layer of a model with deformcli's.

Layers are recognised by class identity for torchvision (a declared dependency) and, for the
other families, by qualified class name plus parameter signature, so mmcv, the DB code and
BasicSR are never imported. Only exact classes are swapped: a user's subclass may have its own
forward, so it is reported as skipped rather than silently replaced.
"""

import inspect
from dataclasses import asdict, dataclass

import torch
from torch import nn

from deformcli.families import basicsr, db, dcn_v2, legacy_dcn, mmcv
from deformcli.families._base import DeformableConvBase
from deformcli.ops.deform_conv import DeformConv2d

__all__ = ["SwapRecord", "convert_layer", "find_replacement", "is_deformcli_layer", "swap"]

_LEGACY_NAMES = ("DeformConv", "DeformConvPack", "ModulatedDeformConv", "ModulatedDeformConvPack")

# (module prefix of the foreign class, class name) -> our class.
_REPLACEMENTS: dict[tuple[str, str], type[nn.Module]] = {
    ("torchvision.ops", "DeformConv2d"): DeformConv2d,
    **{("mmcv.ops", name): getattr(mmcv, name) for name in mmcv.__all__ if name[0].isupper()},
    **{("assets.ops.dcn", name): getattr(db, name) for name in _LEGACY_NAMES},
    **{("basicsr.ops.dcn", name): getattr(legacy_dcn, name) for name in _LEGACY_NAMES},
    ("basicsr.archs.arch_util", "DCNv2Pack"): basicsr.DCNv2Pack,
}

# CharlesShang's DCNv2 is vendored under many package names: matched by the module's last
# component (``dcn_v2``) and the class name.
_DCN_V2_REPLACEMENTS: dict[str, type[nn.Module]] = {"DCNv2": dcn_v2.DCNv2, "DCN": dcn_v2.DCN}

# Our classes are already what surgery produces.
_OURS = frozenset(_REPLACEMENTS.values()) | frozenset(_DCN_V2_REPLACEMENTS.values())


@dataclass(frozen=True)
class SwapRecord:
    """One layer seen by :func:`swap`: where it is, what it was, what it became (or why not)."""

    path: str
    source: str
    target: str | None
    skipped_reason: str | None = None

    @property
    def swapped(self) -> bool:
        return self.target is not None and self.skipped_reason is None

    def to_dict(self) -> dict:
        return {**asdict(self), "swapped": self.swapped}


def is_deformcli_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of deformcli's deformable layers (or a subclass of one)."""
    return isinstance(module, (DeformConv2d, DeformableConvBase))


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _replacement_for_class(cls: type) -> type[nn.Module] | None:
    """Our class for the foreign class ``cls`` itself (not its subclasses), else None."""
    if cls in _OURS:
        return None
    try:
        import torchvision.ops

        if cls is torchvision.ops.DeformConv2d:
            return DeformConv2d
    except ImportError:
        pass
    if cls.__module__.rpartition(".")[2] == "dcn_v2" and cls.__name__ in _DCN_V2_REPLACEMENTS:
        return _DCN_V2_REPLACEMENTS[cls.__name__]
    for (prefix, name), target in _REPLACEMENTS.items():
        if cls.__name__ == name and (
            cls.__module__ == prefix or cls.__module__.startswith(prefix + ".")
        ):
            return target
    return None


def find_replacement(module: nn.Module) -> type[nn.Module] | None:
    """Our class for ``module``'s exact class, or None if it is not a known deformable layer."""
    return _replacement_for_class(type(module))


def _constructor_kwargs(target: type[nn.Module], source: nn.Module) -> dict | None:
    """Arguments for ``target`` read from the attributes the foreign layer keeps, or None if a
    required one is missing. ``*Pack`` constructors forward ``*args, **kwargs`` to their base,
    so the first explicit signature up the MRO is the one that counts.
    """
    for cls in target.__mro__:
        parameters = inspect.signature(cls.__init__).parameters
        if not any(p.kind is p.VAR_POSITIONAL for p in parameters.values()):
            break
    kwargs = {}
    for name, parameter in parameters.items():
        if name == "self" or parameter.kind is parameter.KEYWORD_ONLY:
            continue
        if name == "bias":
            kwargs["bias"] = getattr(source, "bias", None) is not None
        elif hasattr(source, name):
            kwargs[name] = getattr(source, name)
        elif parameter.default is inspect.Parameter.empty:
            return None
    return kwargs


def _build_checked(target: type[nn.Module], source: nn.Module) -> tuple[nn.Module | None, str]:
    """``target`` built like ``source``, or None and why the two do not fit."""
    kwargs = _constructor_kwargs(target, source)
    if kwargs is None:
        return None, "its constructor attributes do not match"
    try:
        # On the meta device: no memory, and the global RNG is left untouched.
        with torch.device("meta"):
            built = target(**kwargs)
    except (TypeError, ValueError) as error:
        return None, f"it cannot be rebuilt: {error}"
    ours = {name: p.shape for name, p in built.named_parameters()}
    theirs = {name: p.shape for name, p in source.named_parameters()}
    if ours != theirs:
        return None, f"its parameters {theirs} do not match {ours}"
    return built, ""


def convert_layer(layer: nn.Module) -> nn.Module:
    """deformcli's equivalent of one foreign deformable layer, with its weights, dtype, device
    and train/eval mode. Raises ValueError if the layer is not recognised or does not fit.
    """
    target = find_replacement(layer)
    if target is None:
        raise ValueError(f"{_qualified_name(type(layer))} is not a recognised deformable layer")
    new, why = _build_checked(target, layer)
    if new is None:
        raise ValueError(f"cannot convert {_qualified_name(type(layer))}: {why}")
    reference = next(layer.parameters())
    new = new.to_empty(device=reference.device).to(dtype=reference.dtype)
    new.load_state_dict(layer.state_dict(), strict=True)
    new.train(layer.training)
    return new


def swap(model: nn.Module) -> list[SwapRecord]:
    """Replace, in place, every recognised deformable layer under ``model`` with deformcli's.

    Walks Sequential, ModuleList, ModuleDict and attribute children alike. Returns one record
    per deformable layer found: swapped ones with their new class, and subclasses or layers
    whose parameters do not fit with the reason they were left alone.

    Example::

        model = build_model_with_torchvision_or_mmcv_layers()
        model.load_state_dict(torch.load("trained_on_cuda.pth", map_location="cpu"))
        records = deformcli.swap(model)  # the model now runs anywhere torch runs
        print([record.path for record in records if not record.swapped])  # left alone
    """
    if find_replacement(model) is not None:
        raise ValueError(
            f"the model itself is a {type(model).__name__}; use deformcli.convert_layer(model)"
        )
    records: list[SwapRecord] = []
    for path, module in list(model.named_modules()):
        source = _qualified_name(type(module))
        target = find_replacement(module)
        if target is None:
            base = next((c for c in type(module).__mro__[1:] if _replacement_for_class(c)), None)
            if base is not None and type(module) not in _OURS:
                reason = f"subclass of {_qualified_name(base)} (its forward may differ)"
                records.append(SwapRecord(path, source, None, reason))
            continue
        try:
            new = convert_layer(module)
        except ValueError as error:
            records.append(SwapRecord(path, source, None, str(error)))
            continue
        parent_path, _, child_name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child_name, new)
        records.append(SwapRecord(path, source, _qualified_name(target)))
    return records
