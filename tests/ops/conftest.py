"""Shared pieces for the op tests: random boxes and deliberately slow float64 references.

The references are plain Python loops over single boxes, written from the papers'
definitions, so that they share no vectorised code path with ``lucid_jax.ops``.
"""

import math

import numpy as np
import pytest

TV_REASON = "torchvision is not installed; pip install -e '.[parity]' to run the parity tests"


@pytest.fixture
def torchvision():
    """The torchvision module, or skip the test when it is not installed."""
    return pytest.importorskip("torchvision", reason=TV_REASON)


def random_boxes(rng, n, *, size=800.0, min_wh=16.0, max_wh=256.0, degenerate=0.0):
    """[n, 4] float32 xyxy boxes; a ``degenerate`` fraction get zero width, height or both."""
    xy = rng.random((n, 2)) * size
    wh = rng.random((n, 2)) * (max_wh - min_wh) + min_wh
    if degenerate:
        kind = rng.integers(0, 3, n)
        hit = rng.random(n) < degenerate
        wh[hit & (kind != 1), 0] = 0.0  # zero width (kind 0) or a point (kind 2)
        wh[hit & (kind != 0), 1] = 0.0
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def clustered_boxes(rng, n, *, clusters=5, jitter=6.0):
    """[n, 4] float32 boxes jittered around a few centres: heavy overlap, long chains."""
    centres = random_boxes(rng, clusters, size=400.0, min_wh=40.0, max_wh=120.0)
    base = centres[rng.integers(0, clusters, n)]
    return (base + rng.normal(0.0, jitter, (n, 4))).astype(np.float32)


def ref_iou(a, b):
    """IoU of two xyxy boxes in float64; 0 when the union is empty."""
    a = [float(v) for v in a]
    b = [float(v) for v in b]
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_box_iou(boxes1, boxes2):
    """[N, M] float64 pairwise IoU, one pair at a time."""
    out = np.zeros((len(boxes1), len(boxes2)))
    for i, a in enumerate(boxes1):
        for j, b in enumerate(boxes2):
            out[i, j] = ref_iou(a, b)
    return out


def ref_nms(boxes, scores, threshold, valid=None, idxs=None):
    """Greedy NMS in float64: list of kept indices by decreasing score (ties: lower index).

    Boxes with a non-finite score or ``valid`` False are skipped; with ``idxs`` only
    boxes of the same category suppress each other.
    """
    n = len(boxes)
    usable = [math.isfinite(float(scores[i])) and (valid is None or bool(valid[i])) for i in range(n)]
    order = sorted((i for i in range(n) if usable[i]), key=lambda i: (-float(scores[i]), i))
    kept = []
    for i in order:
        same = [k for k in kept if idxs is None or idxs[k] == idxs[i]]
        if all(ref_iou(boxes[k], boxes[i]) <= threshold for k in same):
            kept.append(i)
    return kept


def ref_encode(reference, proposal, weights):
    """Deltas (dx, dy, dw, dh) of one box pair in float64."""
    wx, wy, ww, wh = weights
    pw, ph = proposal[2] - proposal[0], proposal[3] - proposal[1]
    gw, gh = reference[2] - reference[0], reference[3] - reference[1]
    pcx, pcy = proposal[0] + pw / 2, proposal[1] + ph / 2
    gcx, gcy = reference[0] + gw / 2, reference[1] + gh / 2
    return [wx * (gcx - pcx) / pw, wy * (gcy - pcy) / ph, ww * math.log(gw / pw), wh * math.log(gh / ph)]


def ref_decode(delta, box, weights, clamp):
    """Box xyxy from one delta and one box in float64."""
    wx, wy, ww, wh = weights
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = box[0] + w / 2, box[1] + h / 2
    dw, dh = min(delta[2] / ww, clamp), min(delta[3] / wh, clamp)
    ncx, ncy = delta[0] / wx * w + cx, delta[1] / wy * h + cy
    nw, nh = math.exp(dw) * w, math.exp(dh) * h
    return [ncx - nw / 2, ncy - nh / 2, ncx + nw / 2, ncy + nh / 2]
