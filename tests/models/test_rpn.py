"""The RPN's proposal selection for one image against a float64 NumPy loop, in both NMS
formulations: top-k per level, decode, clip, the small-box and score masks, NMS within
each level, then the best ``post_nms_top_n`` over all levels."""

import math

import jax
import numpy as np
import pytest

from lucid_jax.models.rpn import select_proposals

BBOX_CLIP = math.log(1000.0 / 16)


def _decode64(d, a):
    w, h = a[2] - a[0], a[3] - a[1]
    cx, cy = a[0] + 0.5 * w, a[1] + 0.5 * h
    dw, dh = min(d[2], BBOX_CLIP), min(d[3], BBOX_CLIP)
    px, py = d[0] * w + cx, d[1] * h + cy
    pw, ph = math.exp(dw) * w, math.exp(dh) * h
    return [px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph]


def _iou64(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def _reference(objectness, deltas, anchors, size, pre, post, nms_thresh, min_size, score_thresh):
    """(boxes, scores) of the kept proposals, best first, in float64 loops."""
    h, w = size
    kept = []
    for o, d, a in zip(objectness, deltas, anchors):
        order = sorted(range(len(o)), key=lambda i: -o[i])[:pre]
        level = []
        for i in order:
            x1, y1, x2, y2 = _decode64(d[i], a[i])
            box = [min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h)]
            score = 1.0 / (1.0 + math.exp(-o[i]))
            if box[2] - box[0] >= min_size and box[3] - box[1] >= min_size and score >= score_thresh:
                level.append((score, box))
        survivors = []
        for score, box in level:  # already by decreasing score
            if all(_iou64(box, other) <= nms_thresh for _, other in survivors):
                survivors.append((score, box))
        kept += survivors
    kept.sort(key=lambda sb: -sb[0])
    kept = kept[:post]
    return np.array([b for _, b in kept]).reshape(-1, 4), np.array([s for s, _ in kept])


@pytest.mark.parametrize("scatter_free", [False, True])
def test_select_proposals_matches_a_float64_loop(scatter_free):
    rng = np.random.default_rng(4)
    size = (100.0, 140.0)
    objectness, deltas, anchors = [], [], []
    for n, side in ((60, 16.0), (24, 40.0)):  # two levels: many small anchors, fewer large ones
        centres = rng.uniform(-10, 150, (n, 2))  # some anchors hang over the image's edges
        anchors.append(np.concatenate([centres - side / 2, centres + side / 2], 1).astype(np.float32))
        objectness.append(rng.normal(0, 3, n).astype(np.float32))
        d = rng.normal(0, 0.3, (n, 4)).astype(np.float32)
        d[:3, 2:] = -6.0  # boxes that collapse below min_size
        d[3, 2] = 8.0  # a width delta beyond the clamp
        deltas.append(d)
    settings = dict(pre_nms_top_n=20, post_nms_top_n=40, nms_thresh=0.5, min_size=1.0, score_thresh=0.1)
    boxes, scores, valid = jax.jit(
        lambda o, d, a, s: select_proposals(o, d, a, s, nms_scatter_free=scatter_free, **settings)
    )(objectness, deltas, anchors, np.array(size, np.float32))
    ref_boxes, ref_scores = _reference(
        [o.astype(np.float64) for o in objectness],
        [d.astype(np.float64) for d in deltas],
        [a.astype(np.float64) for a in anchors],
        size,
        20,
        40,
        0.5,
        1.0,
        0.1,
    )
    k = len(ref_scores)
    assert 4 < k < 40, "the case needs both dropped boxes and padding"
    np.testing.assert_array_equal(np.asarray(valid), np.arange(40) < k)
    np.testing.assert_allclose(np.asarray(scores)[:k], ref_scores, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(boxes)[:k], ref_boxes, atol=1e-3)
    assert not np.asarray(boxes)[k:].any() and not np.asarray(scores)[k:].any()  # padding is zeros
