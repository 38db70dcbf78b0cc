"""Checkpoint I/O: safe loading, container unwrapping, layer detection, atomic safetensors.

Knows nothing of the command line: every problem with the user's input raises
:class:`CheckpointError` with one sentence naming the file, key or shape at fault.
"""

import hashlib
import json
import os
import pickle
import pickletools
import stat
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from deformcli.errors import CheckpointError, first_line
from deformcli.output_file import OutputError, writing

__all__ = [
    "CONTAINER_KEYS",
    "CheckpointSummary",
    "DeformableLayerInfo",
    "LoadedCheckpoint",
    "PickledObjectsError",
    "find_deformable_layers",
    "find_deformable_modules",
    "load_checkpoint",
    "load_tensor",
    "save_safetensors",
    "sha256_of",
    "summarize",
]

#: Keys under which training scripts nest the weights, tried in this order.
CONTAINER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "network",
    "params",
    "module",
    "ema",
    "state_dict_ema",
    "model_ema",
    "params_ema",
)


#: How deep containers may nest before the layout is called unknown (real ones nest 1-3 deep).
MAX_CONTAINER_DEPTH = 8


class PickledObjectsError(CheckpointError):
    """The file is a pickle holding Python objects (a whole model...) that the safe
    weights-only load refuses; loading it means trusting the file (``trust_pickle``)."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint reduced to a flat ``name -> tensor`` state_dict, and how it got there."""

    path: Path
    format: str
    state_dict: dict[str, Tensor]
    sha256: str
    notes: list[str] = field(default_factory=list)
    #: The pickled model object, when the file held one (only loaded with trust_pickle).
    module: nn.Module | None = None
    #: Where each tensor was saved ("cuda:0", "cpu"...), as recorded in the file.
    saved_devices: dict[str, str] = field(default_factory=dict)


@dataclass
class DeformableLayerInfo:
    """A deformable layer found in a state_dict (by its tensors) or in a model (by its class)."""

    name: str
    family: str
    kind: str  # "DCNv1", "DCNv2" or "DCNv1/DCNv2" when the offset conv's width fits both
    weight_shape: list[int]
    offset_groups: int
    offset_conv: str | None
    dtype: str
    saved_on: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckpointSummary:
    """What ``deformcli inspect`` reports of a loaded checkpoint."""

    path: Path
    format: str
    sha256: str
    tensors: int
    parameters: int
    bytes: int
    saved_on: list[str]
    notes: list[str]
    deformable_layers: list[DeformableLayerInfo]

    def to_dict(self) -> dict:
        return {
            **{name: value for name, value in vars(self).items() if name != "deformable_layers"},
            "path": str(self.path),
            "deformable_layers": [layer.to_dict() for layer in self.deformable_layers],
        }


def summarize(loaded: LoadedCheckpoint, model: nn.Module | None = None) -> CheckpointSummary:
    """The checkpoint's size, devices, notes and deformable layers: recognised from the tensors
    alone, or, given the model (a pickled one, or one built from a config), from its classes,
    which say more."""
    notes = list(loaded.notes)
    layers = find_deformable_layers(loaded.state_dict, loaded.saved_devices, notes)
    model = model if model is not None else loaded.module
    if model is not None:
        layers = find_deformable_modules(model) or layers
    return CheckpointSummary(
        path=loaded.path,
        format=loaded.format,
        sha256=loaded.sha256,
        tensors=len(loaded.state_dict),
        parameters=sum(t.numel() for t in loaded.state_dict.values()),
        bytes=sum(t.numel() * t.element_size() for t in loaded.state_dict.values()),
        saved_on=sorted(set(loaded.saved_devices.values())) or ["cpu"],
        notes=notes,
        deformable_layers=layers,
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> LoadedCheckpoint:
    """Load a torch checkpoint (zip or legacy pickle) or a safetensors file onto the CPU; the
    format is read from the content, whatever the file is called.

    Safe by default: torch files load with ``weights_only=True``, which executes no pickled
    code. A file that holds whole pickled objects (a model) raises PickledObjectsError unless
    ``trust_pickle=True``. Zip members are checked against their CRCs.
    Containers (``state_dict``, ``model``, ``ema``...) are unwrapped and a ``module.`` prefix
    from DataParallel/DDP is stripped; ``notes`` says what was done.

    Example::

        loaded = load_checkpoint("model_final.pth")  # no pickled code runs
        print(loaded.notes)  # ["unwrapped the weights under 'state_dict'", ...]
        model.load_state_dict(loaded.state_dict)
    """
    path = Path(path)
    _check_readable(path)
    file_format = sniff_format(path)
    sha256 = sha256_of(path)
    locations: dict[int, str] = {}
    load_notes: list[str] = []
    if file_format == "safetensors":
        obj = _load_safetensors(path)
    else:
        obj, locations = _load_torch(path, file_format, trust_pickle, load_notes)

    notes: list[str] = load_notes
    module = None
    if isinstance(obj, nn.Module):
        module = obj
        obj = module.state_dict()
        notes.append(f"took the state_dict of the pickled {type(module).__name__} model")
    state_dict = _unwrap(obj, path, notes)
    state_dict = _strip_common_prefix(state_dict, "module.", notes)
    return LoadedCheckpoint(
        path=path,
        format=file_format,
        state_dict=state_dict,
        sha256=sha256,
        notes=notes,
        module=module,
        saved_devices={
            key: locations.get(tensor.untyped_storage().data_ptr(), "cpu")
            for key, tensor in state_dict.items()
        },
    )


def load_tensor(path: str | os.PathLike) -> Tensor:
    """One tensor saved with ``torch.save`` (alone or as the only entry of a dict) or the only
    tensor of a safetensors file, read as safely as :func:`load_checkpoint` reads."""
    path = Path(path)
    _check_readable(path)
    file_format = sniff_format(path)
    if file_format == "safetensors":
        obj: object = _load_safetensors(path)
    else:
        obj, _ = _load_torch(path, file_format, trust_pickle=False)
    if isinstance(obj, Mapping) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, Tensor):
        found = f"{len(obj)} entries" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: expected one saved tensor, found {found}")
    return obj


def _check_readable(path: Path) -> None:
    try:
        status = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read it ({error.strerror})") from None
    if stat.S_ISDIR(status.st_mode):
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if not stat.S_ISREG(status.st_mode):
        raise CheckpointError(f"{path}: is not a regular file (a FIFO, socket or device)")
    if status.st_size == 0:
        raise CheckpointError(
            f"{path}: file is empty (0 bytes; a file of /proc or /sys also reports 0 bytes, "
            "and is not a checkpoint)"
        )
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: cannot read it (permission denied)")


# torch.save's legacy (pre-zip) format starts with its magic number, pickled with protocol 2.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def sniff_format(path: Path) -> str:
    """``"torch zip"``, ``"torch legacy"`` (a pickle) or ``"safetensors"``, from the first
    bytes; CheckpointError for anything else."""
    with open(path, "rb") as file:
        head = file.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch zip"
    if len(head) >= 9 and head[8:9] == b"{":
        header_length = int.from_bytes(head[:8], "little")
        if 0 < header_length <= path.stat().st_size - 8:
            return "safetensors"
    if head.startswith(_LEGACY_MAGIC):
        return "torch legacy"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        raise CheckpointError(
            f"{path}: is a plain Python pickle (pickle.dump), not a torch checkpoint: torch.load "
            "cannot read it and deformcli does not unpickle it"
        )
    raise CheckpointError(
        f"{path}: not a checkpoint: neither a torch file (zip or pickle) nor safetensors "
        f"(it starts with {head[:8]!r})"
    )


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a valid safetensors file ({error})") from None


def _load_torch(
    path: Path, file_format: str, trust_pickle: bool, notes: list[str] | None = None
) -> tuple[object, dict[int, str]]:
    """The unpickled object and the location each storage was saved on (by data pointer once
    loaded on the CPU).

    Without ``trust_pickle``, a file whose pickle names classes from training frameworks
    (mmengine's ``HistoryBuffer`` in ``message_hub``...) or numpy's data constructors still
    loads with no code run: numpy arrays and scalars are rebuilt from their bytes, and the
    framework objects become :class:`InertObject` holding their pickled state (``notes`` says
    which). Anything else that a pickle could call is refused.
    """
    if file_format == "torch zip":
        _check_zip(path)
    else:
        _check_legacy_sizes(path)
    locations: dict[int, str] = {}

    def record_location(storage, location: str):
        locations[storage.data_ptr()] = location
        return storage

    def load(allowed: list) -> object:
        with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
            warnings.simplefilter("ignore")  # pickle-protocol chatter; errors are reported below
            return torch.load(path, map_location=record_location, weights_only=not trust_pickle)

    try:
        try:
            obj = load([])
        except pickle.UnpicklingError as error:
            allowed = _data_globals(path, str(error)) if not trust_pickle else None
            if allowed is None:
                raise
            obj = load([stand_in for stand_in, _ in allowed])
            inert = sorted(name for stand_in, name in allowed if _is_inert(stand_in))
            if inert and notes is not None:
                notes.append(
                    f"read pickled {', '.join(inert)} as inert data (their code was not run)"
                )
    except pickle.UnpicklingError as error:
        raise _refusal_error(path, str(error)) from None
    except CheckpointError:
        raise
    except Exception as error:
        # Random bytes and truncated files fail anywhere inside the unpickler.
        raise CheckpointError(
            f"{path}: could not be read as a torch checkpoint ({type(error).__name__}: "
            f"{first_line(error) or type(error).__name__})"
        ) from None
    return obj, locations


def _refusal_error(path: Path, message: str) -> CheckpointError:
    """The error for an unpickling refusal: pickled objects (which trusting the file would
    load), another kind of refusal, or an unreadable pickle."""
    if "Weights only load failed" not in message:
        return CheckpointError(f"{path}: is not a readable torch checkpoint ({message})")
    detail = _refusal_detail(message)
    if "GLOBAL" in detail:
        return PickledObjectsError(
            f"{path}: holds pickled Python objects (for example a whole model) that the safe "
            f"weights-only load refuses ({detail})"
        )
    return CheckpointError(
        f"{path}: is not a plain checkpoint: the safe weights-only loader refused it ({detail})"
    )


class InertObject:
    """An object of a class from a training framework, read from a pickle without importing or
    running the class: ``args`` are its constructor arguments, ``state`` its pickled state."""

    def __new__(cls, *args, **kwargs):
        instance = object.__new__(cls)
        instance.args, instance.state = args, None
        return instance

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {type(self).__module__}.{type(self).__qualname__}>"


# Classes from these packages hold run state in training checkpoints (mmengine's message_hub,
# configs); they are read as InertObject. Nothing else outside numpy's data is allowed.
_INERT_PACKAGES = ("mmengine", "mmcv", "mmdet", "mmocr", "mmseg", "mmpretrain", "mmdet3d")
_NUMPY_DATA = {"_reconstruct", "scalar", "ndarray", "dtype"}


def _data_globals(path: Path, refusal: str) -> list[tuple[object, str]] | None:
    """Stand-ins for every global the pickle names, or None when one of them could run code.

    numpy's array/scalar/dtype constructors are used as they are (they build data from bytes);
    classes of the training frameworks above become InertObject subclasses of the same name.
    """
    if "GLOBAL" not in refusal:
        return None
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return None
    allowed = []
    for name in names:
        module, _, attribute = name.rpartition(".")
        package = module.split(".")[0]
        if name == "builtins.getattr":
            stand_in = _inert_getattr
        elif package == "numpy":
            stand_in = _numpy_data_global(module, attribute)
        elif package in _INERT_PACKAGES:
            stand_in = type(attribute, (InertObject,), {"__module__": module})
            stand_in.__qualname__ = attribute
        else:
            stand_in = None
        if stand_in is None:
            return None
        allowed.append(((stand_in, name), name))
    if any(name.startswith("numpy.") for name in names):
        # np.dtype(...) returns an instance of one of these, which the pickle then BUILDs.
        import numpy

        for dtype_class in vars(getattr(numpy, "dtypes", object())).values():
            if isinstance(dtype_class, type) and issubclass(dtype_class, numpy.dtype):
                allowed.append((dtype_class, f"numpy.dtypes.{dtype_class.__name__}"))
    return allowed


def _inert_getattr(obj: object, name: str) -> object:
    """``getattr`` as a pickle may call it (mmengine pickles bound methods so): only on inert
    objects, and returning an inert stand-in, never the real attribute."""
    if not (
        isinstance(obj, InertObject) or (isinstance(obj, type) and issubclass(obj, InertObject))
    ):
        raise pickle.UnpicklingError(
            f"Weights only load failed: GLOBAL getattr on {type(obj).__name__} refused"
        )
    return InertObject(obj, name)


def _numpy_data_global(module: str, attribute: str) -> object | None:
    import numpy

    if attribute in _NUMPY_DATA:
        core = getattr(numpy, "_core", None) or numpy.core
        return getattr(core.multiarray, attribute, None) or getattr(numpy, attribute, None)
    dtype_class = getattr(getattr(numpy, "dtypes", None), attribute, None)
    if module == "numpy.dtypes" and isinstance(dtype_class, type):
        return dtype_class if issubclass(dtype_class, numpy.dtype) else None
    return None


def _is_inert(stand_in: object) -> bool:
    target = stand_in[0] if isinstance(stand_in, tuple) else stand_in
    return isinstance(target, type) and issubclass(target, InertObject)


def _check_zip(path: Path) -> None:
    """Every member's CRC, and no member that inflates far beyond the file (torch stores its
    members uncompressed, so a high ratio is a zip bomb, not a checkpoint)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            inflated = sum(member.file_size for member in members)
            if inflated > 2 * path.stat().st_size + (64 << 20):
                raise CheckpointError(
                    f"{path}: its zip members would inflate to {inflated:,} bytes from a "
                    f"{path.stat().st_size:,}-byte file; refusing to load it"
                )
            corrupt = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: the zip archive is truncated or corrupt ({error})"
        ) from None
    if corrupt is not None:
        raise CheckpointError(f"{path}: member {corrupt!r} is corrupt (its CRC does not match)")


# Bytes per element of the legacy format's storage classes (torch.FloatStorage...).
_STORAGE_ELEMENT_BYTES = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
}
_INTEGER_OPCODES = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}


def _check_legacy_sizes(path: Path) -> None:
    """torch's legacy loader allocates every storage at the size its pickle declares before
    reading the data: refuse a file that declares more tensor bytes than it holds."""
    declared = _legacy_storage_bytes(path)
    size = path.stat().st_size
    if declared is not None and declared > size:
        raise CheckpointError(
            f"{path}: declares {declared:,} bytes of tensor data in a {size:,}-byte file "
            "(truncated or corrupt); refusing to allocate them"
        )


def _legacy_storage_bytes(path: Path) -> int | None:
    """The tensor bytes a legacy torch file declares: each storage's persistent id is
    ``('storage', torch.<Type>Storage, key, location, numel, ...)`` in the main pickle, which
    follows the magic number, protocol and system-info pickles. None if it cannot be read so."""
    storages: dict[str, int] = {}
    try:
        with open(path, "rb") as file:
            for _ in range(3):
                for _ in pickletools.genops(file):
                    pass
            fields: dict[str, object] = {}
            for opcode, argument, _ in pickletools.genops(file):
                name = opcode.name
                if name.endswith("PUT") or name.endswith("GET") or name == "MEMOIZE":
                    continue
                if argument == "storage":
                    fields = {"step": "type"}
                elif fields.get("step") == "type" and name == "GLOBAL":
                    fields.update(type=str(argument).split()[-1], step="key")
                elif fields.get("step") == "key" and "UNICODE" in name:
                    fields.update(key=argument, step="location")
                elif fields.get("step") == "location" and "UNICODE" in name:
                    fields["step"] = "numel"
                elif fields.get("step") == "numel" and name in _INTEGER_OPCODES:
                    fields.update(numel=argument, step="done")
                elif name == "BINPERSID" and fields.get("step") == "done":
                    element = _STORAGE_ELEMENT_BYTES.get(str(fields["type"]), 1)
                    storages[str(fields["key"])] = int(fields["numel"]) * element
                    fields = {}
    except Exception:
        return None
    return sum(storages.values())


def _refusal_detail(message: str) -> str:
    """The reason in torch's weights-only refusal, in one line (torch words it several ways)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for marker in ("WeightsUnpickler error:", "GLOBAL", "Unsupported"):
        for line in lines:
            if marker in line:
                detail = line.partition("WeightsUnpickler error:")[2] or line
                return detail.strip().rstrip(".") or "no reason given"
    return lines[0].rstrip(".") if lines else "no reason given"


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _unwrap(obj: object, path: Path, notes: list[str]) -> dict[str, Tensor]:
    trail: list[str] = []
    seen: set[int] = set()
    while not _is_state_dict(obj):
        where = f" under {'.'.join(trail)!r}" if trail else ""
        if id(obj) in seen or len(trail) >= MAX_CONTAINER_DEPTH:
            raise CheckpointError(
                f"{path}: containers nest{' in a cycle' if id(obj) in seen else ' too deep'}"
                f"{where}; no state_dict found"
            )
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
            notes.append(f"took the state_dict of the pickled model{where}")
            continue
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"{path}: expected a state_dict (a mapping of names to tensors), found "
                f"{type(obj).__name__}{where}"
            )
        key = next((k for k in CONTAINER_KEYS if k in obj), None)
        if key is None:
            raise CheckpointError(f"{path}: {_layout_problem(obj)}{where}")
        others = [k for k in CONTAINER_KEYS if k in obj and k != key]
        obj = obj[key]
        trail.append(key)
        note = f"unwrapped the weights under {'.'.join(trail)!r}"
        if others:
            note += f" (also present: {', '.join(others)})"
        notes.append(note)
    return dict(obj)


def _layout_problem(mapping: Mapping) -> str:
    """Why ``mapping`` is not a state_dict, naming the entries at fault."""
    if not mapping:
        return "holds an empty mapping, no tensors"
    tensors = [k for k, v in mapping.items() if isinstance(v, Tensor)]
    if tensors:
        odd = [
            (k, v) for k, v in mapping.items() if not (isinstance(k, str) and isinstance(v, Tensor))
        ]
        shown = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in odd[:5])
        more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
        return (
            f"{len(tensors)} entries are tensors but {len(odd)} are not: {shown}{more}; a "
            "state_dict maps names to tensors only"
        )
    layout = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(mapping.items())[:12])
    return (
        "unknown checkpoint layout: no state_dict found and none of the usual container keys "
        f"({', '.join(CONTAINER_KEYS)}); top-level entries: {{{layout}}}"
    )


def _strip_common_prefix(
    state_dict: dict[str, Tensor], prefix: str, notes: list[str]
) -> dict[str, Tensor]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        notes.append(f"stripped the {prefix!r} prefix (DataParallel/DDP) from every key")
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def find_deformable_layers(
    state_dict: Mapping[str, Tensor],
    saved_devices: Mapping[str, str] | None = None,
    near_misses: list[str] | None = None,
) -> list[DeformableLayerInfo]:
    """Deformable layers recognisable from tensors alone.

    A 4-D ``<name>.weight`` is a deformable layer when an offset conv sits beside it with
    ``2 * g * kH * kW`` (DCNv1) or ``3 * g * kH * kW`` (DCNv2) output channels and the same
    kernel size: ``<name>.conv_offset`` (mmcv/BasicSR ``*Pack``), ``<name>_offset`` (the DB
    detector's ``conv2_offset`` beside ``conv2``; also mmcv's version-1 key) or
    ``<name>.conv_offset_mask`` (mmdetection v1.0). When the width fits both (a multiple of
    ``6 * kH * kW``) the kind is ``"DCNv1/DCNv2"`` and offset groups are counted as for DCNv2.
    An offset conv with the kernel size but not such a width is described in ``near_misses``.
    """
    saved_devices = saved_devices or {}
    layers = []
    for key, weight in state_dict.items():
        if not key.endswith(".weight") or weight.dim() != 4:
            continue
        name = key[: -len(".weight")]
        kernel_points = weight.shape[2] * weight.shape[3]
        if kernel_points == 0:
            continue
        for offset_name, family in (
            (f"{name}.conv_offset", "mmcv/BasicSR Pack"),
            (f"{name}_offset", "DB-style"),
            (f"{name}.conv_offset_mask", "DCNv2 DCN / mmdet v1 Pack"),
        ):
            offset_weight = state_dict.get(f"{offset_name}.weight")
            if offset_weight is None or offset_weight.dim() != 4:
                continue
            if offset_weight.shape[2:] != weight.shape[2:]:
                continue
            kind_and_groups = _offset_conv_kind(offset_weight.shape[0], kernel_points)
            if kind_and_groups is None:
                if near_misses is not None:
                    near_misses.append(
                        f"{offset_name} beside {name} has {offset_weight.shape[0]} output "
                        f"channels, not a multiple of 2*kH*kW = {2 * kernel_points} (DCNv1) or "
                        f"3*kH*kW = {3 * kernel_points} (DCNv2): {name} is not counted as "
                        "deformable"
                    )
                continue
            kind, groups = kind_and_groups
            layers.append(
                DeformableLayerInfo(
                    name=name,
                    family=family,
                    kind=kind,
                    weight_shape=list(weight.shape),
                    offset_groups=groups,
                    offset_conv=offset_name,
                    dtype=str(weight.dtype).removeprefix("torch."),
                    saved_on=saved_devices.get(key, "cpu"),
                )
            )
            break
    return layers


def _offset_conv_kind(channels: int, kernel_points: int) -> tuple[str, int] | None:
    """``(kind, offset_groups)`` of an offset conv with ``channels`` outputs beside a kernel of
    ``kernel_points``, or None when the width fits neither DCNv1 nor DCNv2."""
    v1 = channels % (2 * kernel_points) == 0
    v2 = channels % (3 * kernel_points) == 0
    if not (v1 or v2):
        return None
    kind = "DCNv1/DCNv2" if v1 and v2 else ("DCNv1" if v1 else "DCNv2")
    return kind, channels // ((2 if v1 and not v2 else 3) * kernel_points)


def find_deformable_modules(model: nn.Module) -> list[DeformableLayerInfo]:
    """Deformable layers of a whole (pickled) model, recognised by their classes: foreign ones
    that :func:`deformcli.swap` knows, and deformcli's own."""
    from deformcli.surgery import find_replacement, is_deformcli_layer

    layers = []
    for name, module in model.named_modules():
        if not is_deformcli_layer(module) and find_replacement(module) is None:
            continue
        weight = module.weight
        layers.append(
            DeformableLayerInfo(
                name=name,
                family=f"{type(module).__module__}.{type(module).__qualname__}",
                kind="DCN",
                weight_shape=list(weight.shape),
                offset_groups=int(
                    getattr(module, "deform_groups", getattr(module, "deformable_groups", 0))
                ),
                offset_conv=None,
                dtype=str(weight.dtype).removeprefix("torch."),
                saved_on=str(weight.device),
            )
        )
    return layers


def save_safetensors(
    state_dict: Mapping[str, Tensor],
    output: str | os.PathLike,
    metadata: Mapping[str, object],
    force: bool = False,
    protect: tuple[Path, ...] = (),
) -> Path:
    """Write ``state_dict`` as safetensors, safely (:func:`deformcli.output_file.writing`).

    Tensors are moved to CPU and made contiguous; tensors that share storage are written as
    separate copies (safetensors has no aliasing). ``metadata`` values that are not strings are
    stored as JSON. Replaces an existing regular file only when ``force``, and never writes
    over a path in ``protect`` (the input checkpoint).

    Example::

        save_safetensors(model.state_dict(), "model.safetensors", {"epoch": 12})
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    seen_storages: set[int] = set()
    for key, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() > 0 and storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    text_metadata = {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in metadata.items()
    }
    with writing(output, replace=force, inputs=protect) as temporary:
        try:
            save_file(tensors, temporary, metadata=text_metadata)
        except SafetensorError as error:
            raise OutputError(f"{output}: safetensors cannot write it ({error})") from None
    return output
