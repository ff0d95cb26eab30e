"""Host-side image transforms that move boxes with the pixels, and the fixed-canvas preprocess.

The recipe is the one of torchvision's ``GeneralizedRCNNTransform`` and detectron2's
``ResizeShortestEdge``: resize (by the longer side, or by the shorter side with a cap
on the longer), random horizontal flip, ImageNet normalisation, then bottom/right
padding. Unlike those, the padding goes to one fixed canvas, a multiple of 32, so
every batch has the same shape and the jit-compiled step never recompiles; the real
content size travels along as ``image_size``.

Images are ``[H, W, 3]`` from the file to the model: the last step returns the
normalised, padded ``[Hc, Wc, 3]`` float32 canvas, in the model's internal
channels-last layout (fed with ``channels_last=True``; see ``docs/architecture.md``).
Boxes are ``[M, 4]`` xyxy
in continuous pixels, so a pixel-exact transform of the image is an affine map of
the boxes: no "+1" anywhere.
"""

import math
from collections.abc import Sequence

import numpy as np

from lucid_jax.data.canvases import Canvases

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def round_up(n: int | float, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= n."""
    return int(math.ceil(n / multiple) * multiple)


def resized_shape(height: int, width: int, *, longer_side=None, shorter_side=None, max_size=None) -> tuple[int, int]:
    """Target (height, width) that keeps the aspect ratio.

    Args:
      height, width: the input size.
      longer_side: make the longer side this long; or
      shorter_side: make the shorter side this long, then shrink further so the longer
        side is at most ``max_size`` (if given).

    Returns:
      (new_height, new_width), each rounded to the nearest integer and at least 1.
    """
    if (longer_side is None) == (shorter_side is None):
        raise ValueError(f"give exactly one of longer_side and shorter_side, got {longer_side}, {shorter_side}")
    if longer_side is not None:
        scale = longer_side / max(height, width)
    else:
        scale = shorter_side / min(height, width)
        if max_size is not None:
            scale = min(scale, max_size / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize(image: np.ndarray, boxes: np.ndarray, size: tuple[int, int]):
    """Bilinear resize of the image, with the boxes scaled per axis to match.

    Args:
      image: [H, W, 3] uint8 or float.
      boxes: [M, 4] xyxy.
      size: (new_height, new_width).

    Returns:
      (image [new_h, new_w, 3] same dtype, boxes [M, 4] float32).
    """
    from PIL import Image

    h, w = image.shape[:2]
    nh, nw = size
    if (nh, nw) == (h, w):
        return image, np.asarray(boxes, np.float32)
    if image.dtype == np.uint8:
        out = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    else:  # Pillow resizes float data one 32-bit channel ("F" mode) at a time
        chans = [Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)) for c in range(image.shape[2])]
        out = np.stack([np.asarray(c.resize((nw, nh), Image.Resampling.BILINEAR)) for c in chans], axis=-1).astype(
            image.dtype
        )
    scale = np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    return out, np.asarray(boxes, np.float32) * scale


def hflip(image: np.ndarray, boxes: np.ndarray):
    """Mirror left-right: column c goes to W - 1 - c, so x goes to W - x.

    Args:
      image: [H, W, C].
      boxes: [M, 4] xyxy.

    Returns:
      (image [H, W, C], boxes [M, 4] float32).
    """
    w = image.shape[1]
    boxes = np.asarray(boxes, np.float32)
    flipped = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    return image[:, ::-1], flipped.reshape(-1, 4)


def random_hflip(rng: np.random.Generator, image: np.ndarray, boxes: np.ndarray, prob: float = 0.5):
    """:func:`hflip` with probability ``prob``.

    Returns:
      (image, boxes, flipped: bool).
    """
    if rng.random() < prob:
        return (*hflip(image, boxes), True)
    return image, np.asarray(boxes, np.float32), False


def clip_boxes(boxes: np.ndarray, height: float, width: float) -> np.ndarray:
    """Clamp [M, 4] xyxy boxes to the image ``[0, width] x [0, height]``."""
    limits = np.array([width, height, width, height], np.float32)
    return np.clip(np.asarray(boxes, np.float32), 0.0, limits)


def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Per-channel ``(x - mean) / std`` on [0, 1] RGB.

    Args:
      image: [H, W, 3] uint8 (divided by 255 first) or float already in [0, 1].

    Returns:
      [H, W, 3] float32.
    """
    x = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def pad_to(image: np.ndarray, canvas: tuple[int, int], value: float = 0.0) -> np.ndarray:
    """Pad at the bottom and right onto a ``canvas`` (height, width), so boxes do not move.

    Args:
      image: [H, W, C] with H <= canvas height and W <= canvas width.
      canvas: (height, width).
      value: fill; 0 after :func:`normalize` is the mean colour.

    Returns:
      [canvas_h, canvas_w, C], same dtype.
    """
    h, w, c = image.shape
    ch, cw = canvas
    if h > ch or w > cw:
        raise ValueError(f"image of size {(h, w)} does not fit the canvas {(ch, cw)}; resize it first")
    out = np.full((ch, cw, c), value, image.dtype)
    out[:h, :w] = image
    return out


def preprocess(
    example: dict,
    rng: np.random.Generator | None = None,
    *,
    canvas=None,
    longer_side=None,
    shorter_side=None,
    max_size=None,
    size: tuple[int, int] | None = None,
    flip_prob: float = 0.0,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    size_divisibility: int | None = None,
) -> dict:
    """Resize, flip, normalise and pad one example onto a fixed canvas.

    Args:
      example: a dataset example: image [H, W, 3] uint8, boxes [M, 4], labels [M],
        optional difficult [M], id.
      rng: draws the flip; required when ``flip_prob > 0``.
      canvas: (height, width) or int (square), multiples of ``size_divisibility``; by default the
        smallest such square that holds any resized image (from ``longer_side`` or
        ``max_size``).
      longer_side / shorter_side, max_size: see :func:`resized_shape`; neither keeps
        the input size.
      size: resize to exactly this (height, width) instead (e.g.
        ``Canvases.resized_shape``); not with longer_side or shorter_side.
      flip_prob: probability of a horizontal flip (0 for evaluation).
      mean, std: normalisation on [0, 1] RGB.
      size_divisibility: what the canvas sides must divide by: the model's
        ``backbone.size_divisibility`` (32 for the ResNet FPNs). Required to derive
        the canvas; with an explicit canvas and None, the model checks the shape.

    Returns:
      {"image": [Hc, Wc, 3] float32, "boxes": [M', 4] float32 (clipped; boxes left
      with no area dropped), "labels": [M'] int32, "difficult": [M'] bool,
      "image_size": [2] float32 (h, w) of the content, "scale": [2] float32 (sy, sx)
      from the original image, "flipped": bool, "id"}.
    """
    image = example["image"]
    h0, w0 = image.shape[:2]
    boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)
    labels = np.asarray(example["labels"], np.int32)
    difficult = np.asarray(example.get("difficult", np.zeros(len(labels), bool)), bool)
    if size is not None:
        if longer_side is not None or shorter_side is not None:
            raise ValueError("preprocess: give size, or longer_side / shorter_side, not both")
        image, boxes = resize(image, boxes, (int(size[0]), int(size[1])))
    elif longer_side is not None or shorter_side is not None:
        image, boxes = resize(
            image, boxes, resized_shape(h0, w0, longer_side=longer_side, shorter_side=shorter_side, max_size=max_size)
        )
    flipped = False
    if flip_prob > 0:
        if rng is None:
            raise ValueError("preprocess: flip_prob > 0 needs an rng")
        image, boxes, flipped = random_hflip(rng, image, boxes, flip_prob)
    h, w = image.shape[:2]
    boxes = clip_boxes(boxes, h, w)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])

    if canvas is None:
        side = longer_side if longer_side is not None else max_size
        if side is None or size_divisibility is None:
            raise ValueError("preprocess: give canvas, or longer_side / max_size and size_divisibility to derive it")
        canvas = round_up(side, size_divisibility)
    canvas = (int(canvas), int(canvas)) if isinstance(canvas, int | np.integer) else tuple(int(c) for c in canvas)
    if size_divisibility is not None and (canvas[0] % size_divisibility or canvas[1] % size_divisibility):
        raise ValueError(f"canvas must be multiples of {size_divisibility}, got {canvas}")
    image = pad_to(normalize(image, mean, std), canvas)
    return {
        "image": image,
        "boxes": boxes[keep],
        "labels": labels[keep],
        "difficult": difficult[keep],
        "image_size": np.array([h, w], np.float32),
        "scale": np.array([h / h0, w / w0], np.float32),
        "flipped": flipped,
        "id": example.get("id"),
    }


def preprocess_on_canvas(
    example: dict, rng: np.random.Generator | None = None, *, canvases: Canvases, canvas=None, **kwargs
) -> dict:
    """:func:`preprocess` with the resize rule of ``canvases``, onto the image's canvas.

    Args:
      example: a dataset example (image [H, W, 3] uint8, boxes, labels, ...).
      canvases: the run's :class:`~lucid_jax.data.canvases.Canvases`.
      canvas: (Hc, Wc) of the batch (the loader's); default the image's own canvas.
      **kwargs: the other options of :func:`preprocess` (flip_prob, size_divisibility, ...).

    Returns:
      :func:`preprocess`'s dict, "image" [Hc, Wc, 3].
    """
    h, w = example["image"].shape[:2]
    canvas = canvases.shapes[canvases.canvas_index(h, w)] if canvas is None else tuple(canvas)
    return preprocess(example, rng, canvas=canvas, size=canvases.resized_shape(h, w, canvas), **kwargs)


def fit_to_canvas(
    image: np.ndarray, canvas: tuple[int, int], size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resize a uint8 image to fit the canvas (aspect ratio kept) and pad it there.

    The same resize as ``preprocess(canvas=..., longer_side=...)`` on a square
    canvas, without the normalisation: the input of exported detectors.

    Args:
      image: [H, W, 3] uint8.
      canvas: (height, width).
      size: the content's (height, width) on the canvas (e.g.
        ``Canvases.resized_shape``); default the largest that fits.

    Returns:
      canvas image [Hc, Wc, 3] uint8 (zeros right and below the content),
      image_size [2] int32 (content height, width), scale [2] float32 (sy, sx)
      from the image's pixels to the canvas's.
    """
    ch, cw = (int(c) for c in canvas)
    h0, w0 = image.shape[:2]
    if size is None:
        fit = min(ch / h0, cw / w0)
        size = resized_shape(h0, w0, longer_side=round(max(h0, w0) * fit))
    nh, nw = min(int(size[0]), ch), min(int(size[1]), cw)
    resized, _ = resize(image, np.zeros((0, 4), np.float32), (nh, nw))
    out = np.zeros((ch, cw, 3), np.uint8)
    out[:nh, :nw] = resized
    return out, np.array([nh, nw], np.int32), np.array([nh / h0, nw / w0], np.float32)


def canvas_of(image_hw: Sequence[int], canvases: Canvases | tuple[int, int]) -> tuple[int, int]:
    """The canvas (Hc, Wc) an image of ``image_hw`` goes on: the one of its orientation
    among the run's :class:`~lucid_jax.data.canvases.Canvases`, or the one canvas given."""
    if not isinstance(canvases, Canvases):
        return int(canvases[0]), int(canvases[1])
    return canvases.shapes[canvases.canvas_index(int(image_hw[0]), int(image_hw[1]))]


def fit_to_canvases(
    image: np.ndarray, canvases: Canvases | tuple[int, int]
) -> tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fit_to_canvas` onto the image's own canvas: what predict and serving feed a detector.

    Args:
      image: [H, W, 3] uint8.
      canvases: the run's :class:`~lucid_jax.data.canvases.Canvases` (the image goes
        on the canvas of its orientation, resized by their rule), or one (height,
        width) canvas that every image is fitted onto.

    Returns:
      (canvas (Hc, Wc), image [Hc, Wc, 3] uint8 on it, content size [2] int32,
      scale [2] float32 (sy, sx)).
    """
    shape = canvas_of(image.shape[:2], canvases)
    if not isinstance(canvases, Canvases):
        return (shape, *fit_to_canvas(image, shape))
    return (shape, *fit_to_canvas(image, shape, canvases.resized_shape(*image.shape[:2])))
