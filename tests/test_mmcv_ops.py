"""The detection ops of the mmcv.ops shim, against mmcv's documented behaviour (mmcv 2.x
mmcv/ops/nms.py, roi_align.py, roi_pool.py docstrings and code) and an independent
brute-force NMS."""

import numpy as np
import pytest
import torch
import torchvision

from deformcli import mmcv_ops

# mmcv's nms docstring example: 3 boxes kept at IoU 0.6.
BOXES = np.array(
    [
        [49.1, 32.4, 51.0, 35.9],
        [49.3, 32.9, 51.0, 35.3],
        [49.2, 31.8, 51.0, 35.4],
        [35.1, 11.5, 39.1, 15.7],
        [35.6, 11.8, 39.3, 14.2],
        [35.3, 11.5, 39.9, 14.5],
        [35.2, 11.7, 39.7, 15.7],
    ],
    dtype=np.float32,
)
SCORES = np.array([0.9, 0.9, 0.5, 0.5, 0.5, 0.4, 0.3], dtype=np.float32)


def greedy_nms(boxes, scores, threshold, offset=0):
    """Brute force: keep the best box, drop those overlapping it by more than ``threshold``."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        ok = True
        for j in keep:
            xx1, yy1 = max(boxes[i][0], boxes[j][0]), max(boxes[i][1], boxes[j][1])
            xx2, yy2 = min(boxes[i][2], boxes[j][2]), min(boxes[i][3], boxes[j][3])
            inter = max(0.0, xx2 - xx1 + offset) * max(0.0, yy2 - yy1 + offset)

            def area(b):
                return (b[2] - b[0] + offset) * (b[3] - b[1] + offset)

            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > threshold:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_nms_docstring_example_numpy_in_numpy_out():
    dets, inds = mmcv_ops.nms(BOXES, SCORES, 0.6)
    assert isinstance(dets, np.ndarray) and isinstance(inds, np.ndarray)
    assert len(inds) == len(dets) == 3
    assert list(inds) == greedy_nms(BOXES, SCORES, 0.6)
    np.testing.assert_array_equal(dets[:, :4], BOXES[inds])
    np.testing.assert_array_equal(dets[:, 4], SCORES[inds])


@pytest.mark.parametrize("offset", [0, 1])
def test_nms_matches_brute_force_with_offsets_thresholds_and_max_num(offset):
    generator = torch.Generator().manual_seed(offset)
    corner = torch.rand(60, 2, generator=generator) * 20
    boxes = torch.cat([corner, corner + 1 + torch.rand(60, 2, generator=generator) * 6], 1)
    scores = torch.rand(60, generator=generator)
    dets, keep = mmcv_ops.nms(boxes, scores, 0.3, offset=offset)
    assert keep.tolist() == greedy_nms(boxes.tolist(), scores.tolist(), 0.3, offset)
    assert torch.equal(dets, torch.cat([boxes[keep], scores[keep, None]], 1))
    _, top = mmcv_ops.nms(boxes, scores, 0.3, offset=offset, max_num=3)
    assert top.tolist() == keep[:3].tolist()
    # score_threshold filters first, then suppresses among the rest; indices stay the input's.
    _, confident = mmcv_ops.nms(boxes, scores, 0.3, offset=offset, score_threshold=0.5)
    candidates = torch.nonzero(scores > 0.5).squeeze(1)
    subset = greedy_nms(boxes[candidates].tolist(), scores[candidates].tolist(), 0.3, offset)
    assert confident.tolist() == candidates[subset].tolist()


def test_batched_nms_keeps_classes_apart_and_sorts_by_score():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    classes = torch.tensor([0, 0, 1, 1])
    dets, keep = mmcv_ops.batched_nms(boxes, scores, classes, dict(iou_threshold=0.5))
    assert keep.tolist() == [0, 2, 3]  # box 1 overlaps box 0 in class 0; box 2 is class 1
    assert dets[:, -1].tolist() == pytest.approx([0.9, 0.7, 0.6])
    dets, keep = mmcv_ops.batched_nms(
        boxes, scores, classes, dict(iou_threshold=0.5), class_agnostic=True
    )
    assert keep.tolist() == [0, 3]
    # nms_cfg None: sorted, nothing removed.
    _, keep = mmcv_ops.batched_nms(boxes, scores.flip(0), classes, None)
    assert keep.tolist() == [3, 2, 1, 0]


def test_batched_nms_split_path_equals_the_single_pass():
    generator = torch.Generator().manual_seed(3)
    corner = torch.rand(300, 2, generator=generator) * 50
    boxes = torch.cat([corner, corner + 2 + torch.rand(300, 2, generator=generator) * 10], 1)
    scores = torch.rand(300, generator=generator)
    classes = torch.randint(0, 5, (300,), generator=generator)
    config = dict(iou_threshold=0.4, max_num=50)
    single = mmcv_ops.batched_nms(boxes, scores, classes, config)
    split = mmcv_ops.batched_nms(boxes, scores, classes, {**config, "split_thr": 10})
    assert torch.equal(single[1], split[1]) and torch.equal(single[0], split[0])
    assert len(single[1]) == 50


def test_roi_align_and_roi_pool_follow_torchvision_and_mmcv_conventions():
    features = torch.randn(2, 3, 16, 16)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 7.0], [1, 0.5, 2.0, 15.0, 15.0]])
    layer = mmcv_ops.RoIAlign(output_size=7, spatial_scale=0.5, sampling_ratio=2)
    expected = torchvision.ops.roi_align(features, rois, (7, 7), 0.5, 2, aligned=True)
    assert torch.equal(layer(features, rois), expected)
    legacy = mmcv_ops.roi_align(features, rois, (2, 3), 1.0, 0, "avg", aligned=False)
    assert torch.equal(legacy, torchvision.ops.roi_align(features, rois, (2, 3), 1.0, 0, False))
    pooled = mmcv_ops.RoIPool((2, 2), spatial_scale=1.0)(features, rois)
    assert torch.equal(pooled, torchvision.ops.roi_pool(features, rois, (2, 2), 1.0))
    with pytest.raises(NotImplementedError, match="pool_mode='max'"):
        mmcv_ops.RoIAlign(7, pool_mode="max")(features, rois)
    with pytest.raises(AssertionError, match="RoI must be"):
        layer(features, rois[:, 1:])
