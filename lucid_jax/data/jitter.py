"""Large-scale jitter (Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation
Method for Instance Segmentation", CVPR 2021; the augmentation of torchvision's v2
detection recipe): resize by a random factor of the canvas-fitting size, crop or
pad onto the canvas, flip.

    image [H, W, 3] --resize x s (s ~ U[0.5, 2.0] of "fits the canvas")--> [h', w']
          --random crop (where larger than the canvas)--> [min(h', Hc), min(w', Wc)]
          --horizontal flip (p = 0.5)--> normalise --> pad right and below --> [Hc, Wc, 3]

Boxes follow the pixels exactly: scaled per axis, shifted by the crop origin,
clipped to the kept window, and mirrored inside it. A box that keeps less than
``min_visible`` of its area (after scaling, before the crop) is dropped; an image
left with no box is a valid all-negative example.
"""

from dataclasses import dataclass

import numpy as np

from lucid_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, hflip, normalize, pad_to, resize

SCALE_RANGE = (0.5, 2.0)
# A box cut down to less than this share of its area says too little about its object.
MIN_VISIBLE = 0.3


@dataclass(frozen=True)
class Jitter:
    """One draw of the jitter for one image.

    Attributes:
      size: (h', w') the whole image is resized to.
      origin: (y0, x0) of the kept window in the resized image (0 where it fits).
      window: (h, w) of the kept window: ``min(h' - y0, Hc)``, ``min(w' - x0, Wc)``.
      flip: mirror the kept window left-right.
    """

    size: tuple[int, int]
    origin: tuple[int, int]
    window: tuple[int, int]
    flip: bool


def draw_jitter(
    rng: np.random.Generator,
    height: int,
    width: int,
    canvas: tuple[int, int],
    *,
    scale_range: tuple[float, float] = SCALE_RANGE,
    flip_prob: float = 0.5,
) -> Jitter:
    """Draw the scale, the crop origin and the flip, in that order, from ``rng``.

    Args:
      height, width: the image's size.
      canvas: (Hc, Wc).
      scale_range: the factor's range, relative to the largest size that fits the canvas.
      flip_prob: probability of a horizontal flip.
    """
    ch, cw = canvas
    factor = min(ch / height, cw / width) * rng.uniform(*scale_range)
    nh, nw = max(1, int(round(height * factor))), max(1, int(round(width * factor)))
    y0 = int(rng.integers(0, max(nh - ch, 0) + 1))
    x0 = int(rng.integers(0, max(nw - cw, 0) + 1))
    flip = bool(rng.random() < flip_prob)
    return Jitter((nh, nw), (y0, x0), (min(nh - y0, ch), min(nw - x0, cw)), flip)


def jitter_boxes(
    boxes: np.ndarray, height: int, width: int, jitter: Jitter, min_visible: float = MIN_VISIBLE
) -> tuple[np.ndarray, np.ndarray]:
    """Move [M, 4] xyxy boxes with the pixels of a jittered image.

    Returns:
      boxes [M, 4] float32 in the kept window's pixels (clipped, mirrored if
      flipped), and keep [M] bool: the box has area and at least ``min_visible``
      of its scaled area is inside the window.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    (nh, nw), (y0, x0), (wh, ww) = jitter.size, jitter.origin, jitter.window
    scaled = boxes * np.array([nw / width, nh / height, nw / width, nh / height], np.float32)
    shifted = scaled - np.array([x0, y0, x0, y0], np.float32)
    clipped = np.clip(shifted, 0.0, np.array([ww, wh, ww, wh], np.float32))
    area = (scaled[:, 2] - scaled[:, 0]) * (scaled[:, 3] - scaled[:, 1])
    kept_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (kept_area > 0) & (kept_area >= min_visible * area)
    if jitter.flip:
        clipped = np.stack([ww - clipped[:, 2], clipped[:, 1], ww - clipped[:, 0], clipped[:, 3]], axis=1)
    return clipped.astype(np.float32), keep


def jitter_preprocess(
    example: dict,
    rng: np.random.Generator,
    *,
    canvas,
    scale_range=SCALE_RANGE,
    flip_prob: float = 0.5,
    min_visible: float = MIN_VISIBLE,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> dict:
    """Large-scale jitter of one example onto a fixed canvas (a training transform).

    Args:
      example: image [H, W, 3] uint8, boxes [M, 4], labels [M], optional difficult [M], id.
      rng: draws the jitter (see :func:`draw_jitter`).
      canvas: (Hc, Wc) or an int (square).
      scale_range, flip_prob, min_visible: see the module.
      mean, std: normalisation on [0, 1] RGB.

    Returns:
      The keys of :func:`lucid_jax.data.preprocess`: "image" [Hc, Wc, 3] float32,
      "boxes" [M', 4], "labels" [M'], "difficult" [M'], "image_size" [2] (the kept
      window), "scale" [2] (sy, sx), "flipped", "id"; plus "origin" [2] (y0, x0).
    """
    canvas = (int(canvas), int(canvas)) if isinstance(canvas, int | np.integer) else (int(canvas[0]), int(canvas[1]))
    image = example["image"]
    h, w = image.shape[:2]
    labels = np.asarray(example["labels"], np.int32)
    difficult = np.asarray(example.get("difficult", np.zeros(len(labels), bool)), bool)
    jitter = draw_jitter(rng, h, w, canvas, scale_range=scale_range, flip_prob=flip_prob)
    boxes, keep = jitter_boxes(example["boxes"], h, w, jitter, min_visible)
    resized, _ = resize(image, np.zeros((0, 4), np.float32), jitter.size)
    (y0, x0), (wh, ww) = jitter.origin, jitter.window
    window = resized[y0 : y0 + wh, x0 : x0 + ww]
    if jitter.flip:
        window, _ = hflip(window, np.zeros((0, 4), np.float32))
    padded = pad_to(normalize(window, mean, std), canvas)
    return {
        "image": padded,
        "boxes": boxes[keep],
        "labels": labels[keep],
        "difficult": difficult[keep],
        "image_size": np.array([wh, ww], np.float32),
        "scale": np.array([jitter.size[0] / h, jitter.size[1] / w], np.float32),
        "flipped": jitter.flip,
        "origin": np.array([y0, x0], np.float32),
        "id": example.get("id"),
    }
