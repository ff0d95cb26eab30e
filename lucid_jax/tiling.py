"""Tiled prediction: a large image cut into overlapping windows at native resolution,
each window detected on its own, and the boxes merged across windows.

Sliced inference (as the SAHI library and DeepForest's ``predict_tile`` do it) keeps
small objects of a large image at their own size, where resizing the whole image onto
one canvas would shrink them below what the detector sees:

    image [H, W, 3] --tile_windows--> windows [N] of SIZE x SIZE views (no copies)
      --detect, a batch at a time--> boxes in window pixels --+ (x0, y0)--> image pixels
      --merge_tiles--> one set of detections for the image

The merge rule. A window's box that touches one of the window's *inner* edges (an edge
that is not the image's border) may be a cut view of an object that goes on past the
edge. With an overlap at least as wide as the objects, the neighbouring window sees
that object whole. So:

1. A cut box is dropped when a box of the same class that is not cut covers at least
   half of it (intersection over the cut box's area >= ``cover``): the whole view
   replaces the partial one, whatever their scores.
2. The rest go through class-wise NMS over the whole image at the model's NMS
   threshold: an object seen whole by two windows keeps its best-scoring box.

Cut boxes with no whole counterpart (objects larger than the overlap) survive step 1
and are deduplicated by step 2. Plain NMS alone keeps whichever view scores higher:
a half box that outscores the whole one replaces it, or stays beside it where their
IoU is under the threshold.

Everything here runs on the host, in NumPy; the windows are predicted by whatever
detects a list of images (the predict job's compiled function, or an exported
artifact through :mod:`lucid_jax.serving`).
"""

from collections.abc import Callable, Sequence

import numpy as np

# A box edge within this many pixels of an inner window edge counts as cut there.
EDGE_TOLERANCE_PX = 1.0
DEFAULT_OVERLAP = 0.25  # the share of a window its neighbour sees too, unless told otherwise


def tile_windows(height: int, width: int, tile: int, overlap: float) -> np.ndarray:
    """Overlapping square windows covering an image.

    Windows start every ``round(tile * (1 - overlap))`` pixels; the last window of a
    row or column is moved back to end at the image's edge, so every window is whole
    (SIZE x SIZE) where the image is at least that large. A side shorter than the tile
    gets one window of the side's length.

    Args:
      height, width: the image's size.
      tile: the window's side in pixels.
      overlap: the fraction of a window shared with its neighbour, in [0, 1).

    Returns:
      [N, 4] int64 windows (x0, y0, x1, y1), row by row.

    Raises:
      ValueError: a tile < 1 or an overlap outside [0, 1).
    """
    if int(tile) < 1:
        raise ValueError(f"tile must be >= 1 pixel, got {tile}")
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    stride = max(1, round(tile * (1.0 - overlap)))

    def starts(side: int) -> list[int]:
        if side <= tile:
            return [0]
        out = list(range(0, side - tile, stride))
        return out + [side - tile]

    ys, xs = starts(int(height)), starts(int(width))
    return np.array([(x, y, min(x + tile, width), min(y + tile, height)) for y in ys for x in xs], np.int64).reshape(
        -1, 4
    )


def _cut(boxes: np.ndarray, window: np.ndarray, image_hw: Sequence[int]) -> np.ndarray:
    """[K] bool: the box touches an edge of ``window`` that is not the image's border."""
    x0, y0, x1, y1 = window
    h, w = image_hw
    t = EDGE_TOLERANCE_PX
    return (
        ((x0 > 0) & (boxes[:, 0] <= x0 + t))
        | ((y0 > 0) & (boxes[:, 1] <= y0 + t))
        | ((x1 < w) & (boxes[:, 2] >= x1 - t))
        | ((y1 < h) & (boxes[:, 3] >= y1 - t))
    )


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _intersections(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] intersection areas of xyxy boxes."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    return np.prod(np.clip(hi - lo, 0, None), axis=-1)


def nms_numpy(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS in float64: indices kept, by decreasing score (ties: lower index first).

    A box is dropped when its IoU with a kept, better box exceeds ``iou_threshold``,
    as torchvision's ``nms``. Each kept box is compared with the boxes after it, one
    row at a time, so the memory is O(N), not an N x N matrix: a tiled photograph can
    hold tens of thousands of boxes.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    ranked = boxes[order]
    areas = _areas(ranked)
    alive = np.ones(len(order), bool)
    keep = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(order[i])
        rest = ranked[i + 1 :]
        lo, hi = np.maximum(ranked[i, :2], rest[:, :2]), np.minimum(ranked[i, 2:], rest[:, 2:])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
        iou = inter / np.maximum(areas[i] + areas[i + 1 :] - inter, 1e-12)
        alive[i + 1 :] &= ~(iou > iou_threshold)
    return np.array(keep, np.int64)


def _covered(cut: np.ndarray, whole: np.ndarray, cover: float, chunk: int = 128) -> np.ndarray:
    """[len(cut)] bool: some box of ``whole`` covers at least ``cover`` of the cut box's area
    (a chunk of cut boxes at a time, so the memory stays small)."""
    out = np.zeros(len(cut), bool)
    for start in range(0, len(cut), chunk):
        part = cut[start : start + chunk]
        need = cover * np.maximum(_areas(part), 1e-12)[:, None]
        out[start : start + chunk] = (_intersections(part, whole) >= need).any(axis=1)
    return out


def merge_tiles(
    detections: Sequence[dict],
    windows: np.ndarray,
    image_hw: Sequence[int],
    nms_thresh: float = 0.5,
    cover: float = 0.5,
) -> dict:
    """One image's detections from its windows' (see the module for the rule).

    Args:
      detections: per window, ``{"boxes": [K, 4] xyxy in the window's pixels,
        "scores": [K], "labels": [K]}``.
      windows: [N, 4] (x0, y0, x1, y1) of each window in the image (:func:`tile_windows`).
      image_hw: the image's (height, width).
      nms_thresh: the class-wise NMS IoU threshold over the whole image (the model's).
      cover: a cut box is dropped when an uncut box of its class covers this share of it.

    Returns:
      {"boxes": [M, 4] float32 in image pixels, "scores": [M] float32, "labels": [M]
      int32}, by decreasing score.
    """
    parts = []
    for det, window in zip(detections, np.asarray(windows), strict=True):
        boxes = np.asarray(det["boxes"], np.float64).reshape(-1, 4) + np.tile(window[:2], 2)
        parts.append(
            (boxes, np.asarray(det["scores"], np.float64), np.asarray(det["labels"]), _cut(boxes, window, image_hw))
        )
    if not parts or not sum(len(p[1]) for p in parts):
        return {
            "boxes": np.zeros((0, 4), np.float32),
            "scores": np.zeros(0, np.float32),
            "labels": np.zeros(0, np.int32),
        }
    boxes, scores, labels, cut = (np.concatenate(column) for column in zip(*parts))
    keep = np.ones(len(scores), bool)
    for label in np.unique(labels[cut]):
        cut_here, whole_here = cut & (labels == label), ~cut & (labels == label)
        if whole_here.any():
            keep[np.flatnonzero(cut_here)[_covered(boxes[cut_here], boxes[whole_here], cover)]] = False
    kept = []
    for label in np.unique(labels[keep]):
        members = np.flatnonzero(keep & (labels == label))
        kept.append(members[nms_numpy(boxes[members], scores[members], nms_thresh)])
    index = np.concatenate(kept)
    index = index[np.argsort(-scores[index], kind="stable")]
    return {
        "boxes": boxes[index].astype(np.float32),
        "scores": scores[index].astype(np.float32),
        "labels": labels[index].astype(np.int32),
    }


def detect_tiled(
    image: np.ndarray,
    detect: Callable[[list[np.ndarray]], list[dict]],
    tile: int,
    overlap: float = DEFAULT_OVERLAP,
    *,
    nms_thresh: float = 0.5,
    batch_size: int = 8,
) -> dict:
    """Detections in a large image, predicted window by window and merged.

    The windows are views into ``image`` (no copies of it); ``detect`` gets
    ``batch_size`` of them at a time and fits each onto its canvas as it would a whole
    image, so a tile equal to the canvas is predicted without a resize.

    Args:
      image: [H, W, 3] uint8, decoded once.
      detect: detects a list of uint8 images: one dict per image, ``{"boxes": [K, 4]
        xyxy in that image's pixels, "scores": [K], "labels": [K]}``.
      tile: the window's side in pixels (native resolution).
      overlap: the share of a window shared with its neighbour; at least the largest
        object's size over ``tile`` lets every object be seen whole by some window.
      nms_thresh: the class-wise NMS threshold of the merge (the model's).
      batch_size: windows per ``detect`` call.

    Returns:
      :func:`merge_tiles`'s dict, in the image's pixels.
    """
    image = np.asarray(image)
    windows = tile_windows(image.shape[0], image.shape[1], tile, overlap)
    found: list[dict] = []
    for start in range(0, len(windows), batch_size):
        views = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in windows[start : start + batch_size]]
        found += detect(views)
    return merge_tiles(found, windows, image.shape[:2], nms_thresh)
