"""What the ``mmcv.ops`` import shim provides: mmcv's deformable layers, and the detection ops the
inference path of mmdet/mmocr DCN models needs, on top of torchvision's.

Checked against mmcv 2.x ``mmcv/ops/nms.py``, ``roi_align.py``, ``roi_pool.py``: signatures,
defaults and return conventions (``nms`` returns ``(dets (N, 5), keep)`` sorted by score, in the
input's type, tensor or numpy; ``batched_nms`` takes ``nms_cfg`` and splits large inputs by
class; RoI ops take ``rois (K, 5)`` rows ``(batch index, x1, y1, x2, y2)``). Every other name
mmcv.ops has imports as a placeholder that fails, naming itself, when constructed or called
(:func:`unavailable`), so that model packages importing dozens of ops at module level load.

:func:`register_in_mmengine` registers ``DCN`` and ``DCNv2`` in mmengine's ``MODELS`` as
importing the real ``mmcv.ops`` does (and in mmcv 1.x's ``CONV_LAYERS``).
"""

import sys
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from deformcli.families.mmcv import (
    DeformConv2d,
    DeformConv2dPack,
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    deform_conv2d,
    modulated_deform_conv2d,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "RoIAlign",
    "RoIPool",
    "batched_nms",
    "deform_conv2d",
    "modulated_deform_conv2d",
    "nms",
    "roi_align",
    "roi_pool",
]


class UnavailableOpError(NotImplementedError):
    """An op the import shim stands in for but does not implement was used."""


def unavailable(module_name: str, name: str, provided: list[str]) -> type:
    """A placeholder for ``module_name.name``: importing it works, constructing or calling it
    raises UnavailableOpError naming it and what the shim provides."""

    def refuse(cls, *args, **kwargs):
        raise UnavailableOpError(
            f"{module_name}.{name} is not available: deformcli's import shim for {module_name} "
            f"stands in for it so that model code imports, but provides only "
            f"{', '.join(provided)}"
        )

    return type(name, (), {"__new__": refuse, "__module__": module_name})


def _is_numpy(value: object) -> bool:
    """numpy arrays without importing numpy (torch runs without it; mmcv's callers pass both)."""
    return type(value).__module__ == "numpy" and hasattr(value, "__array__")


def nms(
    boxes: "Tensor | np.ndarray",
    scores: "Tensor | np.ndarray",
    iou_threshold: float,
    offset: int = 0,
    score_threshold: float = 0,
    max_num: int = -1,
) -> "tuple[Tensor | np.ndarray, Tensor | np.ndarray]":
    """mmcv's ``nms``: boxes ``(N, 4)`` xyxy, scores ``(N,)`` -> ``(dets (K, 5), keep (K,))``,
    kept boxes with their scores, highest score first; numpy in, numpy out.

    ``offset=1`` measures widths as ``x2 - x1 + 1`` (mmdetection v1's pixel convention).
    """
    is_numpy = _is_numpy(boxes)
    boxes_t = torch.from_numpy(boxes) if is_numpy else boxes
    scores_t = torch.from_numpy(scores) if _is_numpy(scores) else scores
    if boxes_t.dim() != 2 or boxes_t.shape[1] != 4 or boxes_t.shape[0] != scores_t.shape[0]:
        raise AssertionError(
            f"nms expects boxes (N, 4) and scores (N,), got {list(boxes_t.shape)} and "
            f"{list(scores_t.shape)}"
        )
    if offset not in (0, 1):
        raise AssertionError(f"offset must be 0 or 1, got {offset}")
    keep = _nms_indices(boxes_t, scores_t, iou_threshold, offset, score_threshold, max_num)
    dets = torch.cat((boxes_t[keep], scores_t[keep].reshape(-1, 1)), dim=1)
    if is_numpy:
        return dets.cpu().numpy(), keep.cpu().numpy()
    return dets, keep


def _nms_indices(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    offset: int,
    score_threshold: float,
    max_num: int,
) -> Tensor:
    import torchvision.ops

    candidates = None
    if score_threshold > 0:
        candidates = torch.nonzero(scores > score_threshold, as_tuple=False).squeeze(1)
        boxes, scores = boxes[candidates], scores[candidates]
    if offset:
        # IoU with +1 widths is IoU of boxes one pixel larger at the far corner.
        boxes = torch.cat((boxes[:, :2], boxes[:, 2:] + offset), dim=1)
    keep = torchvision.ops.nms(boxes.float(), scores.float(), float(iou_threshold))
    if max_num > 0:
        keep = keep[:max_num]
    return keep if candidates is None else candidates[keep]


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    nms_cfg: dict | None,
    class_agnostic: bool = False,
) -> tuple[Tensor, Tensor]:
    """mmcv's ``batched_nms``: NMS within each class ``idxs``; returns ``(dets (K, 5), keep)``
    sorted by score. ``nms_cfg``: ``iou_threshold`` (and ``type='nms'``, ``offset``,
    ``score_threshold``, ``split_thr`` (default 10000), ``max_num``, ``class_agnostic``);
    ``None`` skips NMS and only sorts."""
    if nms_cfg is None:
        scores, order = scores.sort(descending=True)
        return torch.cat([boxes[order], scores[:, None]], -1), order
    config = dict(nms_cfg)
    class_agnostic = config.pop("class_agnostic", class_agnostic)
    kind = config.pop("type", "nms")
    if kind != "nms":
        raise UnavailableOpError(
            f"batched_nms with type={kind!r}: deformcli's mmcv.ops shim provides type='nms' only"
        )
    split_threshold = config.pop("split_thr", 10000)
    max_num = config.pop("max_num", -1)
    if class_agnostic:
        boxes_for_nms = boxes
    else:
        # Shift each class's boxes apart so that boxes of different classes never overlap.
        shift = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        boxes_for_nms = boxes + shift[:, None]
    if boxes_for_nms.shape[0] < split_threshold:
        dets, keep = nms(boxes_for_nms, scores, **config)
        boxes = boxes[keep]
        scores = dets[:, -1]
    else:
        kept = scores.new_zeros(scores.size(), dtype=torch.bool)
        for class_id in torch.unique(idxs):
            members = (idxs == class_id).nonzero(as_tuple=False).view(-1)
            _, class_keep = nms(boxes_for_nms[members], scores[members], **config)
            kept[members[class_keep]] = True
        keep = kept.nonzero(as_tuple=False).view(-1)
        scores, order = scores[keep].sort(descending=True)
        keep = keep[order]
        boxes = boxes[keep]
    if max_num > 0:
        keep, boxes, scores = keep[:max_num], boxes[:max_num], scores[:max_num]
    return torch.cat([boxes, scores[:, None]], -1), keep


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    pool_mode: str = "avg",
    aligned: bool = True,
) -> Tensor:
    """mmcv's ``roi_align``: input ``(N, C, H, W)``, rois ``(K, 5)`` -> ``(K, C, oH, oW)``.

    ``sampling_ratio=0`` samples adaptively; ``aligned=True`` shifts by half a pixel
    (detectron2's convention), as mmcv and torchvision both define it. ``pool_mode='avg'``
    only (mmcv's ``'max'`` has no torchvision counterpart).
    """
    import torchvision.ops

    if pool_mode != "avg":
        raise UnavailableOpError(
            f"roi_align pool_mode={pool_mode!r}: deformcli's mmcv.ops shim provides 'avg' only"
        )
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise AssertionError(f"RoI must be (idx, x1, y1, x2, y2), got shape {list(rois.shape)}")
    return torchvision.ops.roi_align(
        input, rois, _pair(output_size), spatial_scale, sampling_ratio, aligned
    )


def roi_pool(
    input: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0
) -> Tensor:
    """mmcv's ``roi_pool`` (max pooling per bin): rois ``(K, 5)`` -> ``(K, C, oH, oW)``."""
    import torchvision.ops

    if rois.dim() != 2 or rois.shape[1] != 5:
        raise AssertionError(f"RoI must be (idx, x1, y1, x2, y2), got shape {list(rois.shape)}")
    return torchvision.ops.roi_pool(input, rois, _pair(output_size), spatial_scale)


class RoIAlign(nn.Module):
    """mmcv's ``RoIAlign`` layer; forward(input ``(N, C, H, W)``, rois ``(K, 5)``)."""

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        pool_mode: str = "avg",
        aligned: bool = True,
        use_torchvision: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.pool_mode = pool_mode
        self.aligned = aligned
        self.use_torchvision = use_torchvision

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_align(
            input,
            rois,
            self.output_size,
            self.spatial_scale,
            self.sampling_ratio,
            self.pool_mode,
            self.aligned,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, pool_mode={self.pool_mode}, "
            f"aligned={self.aligned}"
        )


class RoIPool(nn.Module):
    """mmcv's ``RoIPool`` layer; forward(input ``(N, C, H, W)``, rois ``(K, 5)``)."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)


def register_in_mmengine() -> None:
    """Register ``DCN`` and ``DCNv2`` where importing the real ``mmcv.ops`` does: mmengine's
    root ``MODELS`` (mmcv 2.x) and, when mmcv 1.x is what is installed, its ``CONV_LAYERS``.
    Nothing happens where neither is importable."""
    layers = {"DCN": DeformConv2dPack, "DCNv2": ModulatedDeformConv2dPack}
    try:
        from mmengine.registry import MODELS
    except ImportError:
        MODELS = None  # noqa: N806 (mmengine's name)
    if MODELS is not None:
        for name, layer in layers.items():
            MODELS.register_module(name=name, module=layer, force=True)
    mmcv = sys.modules.get("mmcv")
    if mmcv is not None and str(getattr(mmcv, "__version__", "")).startswith("1."):
        try:
            from mmcv.cnn import CONV_LAYERS
        except ImportError:
            return
        for name, layer in layers.items():
            CONV_LAYERS.register_module(name=name, module=layer, force=True)
