"""Box arithmetic for one image: area, IoU, the R-CNN box coder, clipping, size masks.

Boxes are ``[..., 4]`` arrays in pixel ``xyxy`` with continuous coordinates and no
"+1" in widths, the convention of torchvision (``torchvision/ops/boxes.py``) and
detectron2. The box coder is the parameterisation of R-CNN (Girshick et al., 2014,
appendix C) as used by Faster R-CNN (Ren et al., 2015, eq. 2), with the per-coordinate
weights and the dw/dh clamp of torchvision's ``BoxCoder`` and detectron2's
``Box2BoxTransform``.

Every function is pure, static-shape and safe under ``jit``, ``vmap`` and ``grad``.
Argument checks are plain Python on shapes and dtypes, so bad input fails at trace
time, before anything runs.
"""

import math

import jax.numpy as jnp
import numpy as np

from lucid_jax.ops.checks import check_dtype, check_shape

# Largest log-scale change allowed when decoding: a box may grow at most 1000/16
# times per side, which keeps exp() finite for wild early-training deltas.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _check_boxes(fn: str, name: str, boxes, rank: int | None = None) -> None:
    shape = np.shape(boxes)
    expected = "[N, 4]" if rank == 2 else "[..., 4]"
    ok = (rank is None or len(shape) == rank) and len(shape) >= 1 and shape[-1] == 4
    check_shape(fn, name, boxes, expected, ok)
    check_dtype(fn, name, boxes, "floating")


def _check_weights(fn: str, weights) -> tuple[float, float, float, float]:
    if len(weights) != 4:
        raise ValueError(f"{fn}: weights must be 4 numbers (wx, wy, ww, wh), got {weights!r}")
    wx, wy, ww, wh = (float(w) for w in weights)
    return wx, wy, ww, wh


def box_area(boxes):
    """Area of each box.

    Args:
      boxes: [..., 4] xyxy.

    Returns:
      [...] ``(x2 - x1) * (y2 - y1)``; negative for inverted boxes, as torchvision.
    """
    _check_boxes("box_area", "boxes", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_inter_union(coords1, area1, coords2, area2):
    """Intersection and union areas of boxes given as coordinate columns.

    The one place the overlap arithmetic is written: :func:`box_iou` passes rows of
    ``[N, 4]`` boxes, NMS passes the columns of its ``[5, T]`` tiles.

    Args:
      coords1: (x1, y1, x2, y2), four arrays that broadcast against those of
        ``coords2``, e.g. [N, 1] each.
      area1: the areas of the first boxes, broadcasting the same way, e.g. [N, 1].
      coords2: (x1, y1, x2, y2), e.g. [1, M] each.
      area2: e.g. [1, M].

    Returns:
      (inter, union), each of the broadcast shape, e.g. [N, M].
    """
    x1a, y1a, x2a, y2a = coords1
    x1b, y1b, x2b, y2b = coords2
    w = jnp.maximum(jnp.minimum(x2a, x2b) - jnp.maximum(x1a, x1b), 0)  # [N, M]
    h = jnp.maximum(jnp.minimum(y2a, y2b) - jnp.maximum(y1a, y1b), 0)  # [N, M]
    inter = w * h
    return inter, area1 + area2 - inter


def box_iou(boxes1, boxes2):
    """Pairwise intersection over union.

    Args:
      boxes1: [N, 4] xyxy.
      boxes2: [M, 4] xyxy.

    Returns:
      [N, M] IoU. Where the union is not positive (two degenerate boxes) the IoU is 0,
      where torchvision would give NaN; the gradient stays finite there too.
    """
    _check_boxes("box_iou", "boxes1", boxes1, rank=2)
    _check_boxes("box_iou", "boxes2", boxes2, rank=2)
    inter, union = box_inter_union(
        tuple(boxes1[:, None, i] for i in range(4)),
        box_area(boxes1)[:, None],  # [N, 1]
        tuple(boxes2[None, :, i] for i in range(4)),
        box_area(boxes2)[None, :],  # [1, M]
    )  # [N, M]
    positive = union > 0
    # Divide by a safe value so that neither the value nor its gradient is NaN.
    return jnp.where(positive, inter / jnp.where(positive, union, 1), 0)


def encode_boxes(reference_boxes, proposals, weights=(1.0, 1.0, 1.0, 1.0)):
    """Regression targets that turn ``proposals`` into ``reference_boxes``.

    Same arithmetic as torchvision's ``BoxCoder.encode_single``.

    Args:
      reference_boxes: [..., 4] xyxy, the targets (e.g. matched ground truth).
      proposals: [..., 4] xyxy, the boxes the deltas are relative to; same shape.
      weights: (wx, wy, ww, wh) multiplying (dx, dy, dw, dh).

    Returns:
      [..., 4] deltas (dx, dy, dw, dh).
    """
    _check_boxes("encode_boxes", "reference_boxes", reference_boxes)
    _check_boxes("encode_boxes", "proposals", proposals)
    if np.shape(reference_boxes) != np.shape(proposals):
        raise ValueError(
            "encode_boxes: reference_boxes and proposals must have the same shape [..., 4], "
            f"got {tuple(np.shape(reference_boxes))} and {tuple(np.shape(proposals))}"
        )
    wx, wy, ww, wh = _check_weights("encode_boxes", weights)
    ex_w = proposals[..., 2] - proposals[..., 0]  # [...]
    ex_h = proposals[..., 3] - proposals[..., 1]
    ex_cx = proposals[..., 0] + 0.5 * ex_w
    ex_cy = proposals[..., 1] + 0.5 * ex_h
    gt_w = reference_boxes[..., 2] - reference_boxes[..., 0]
    gt_h = reference_boxes[..., 3] - reference_boxes[..., 1]
    gt_cx = reference_boxes[..., 0] + 0.5 * gt_w
    gt_cy = reference_boxes[..., 1] + 0.5 * gt_h
    dx = wx * (gt_cx - ex_cx) / ex_w
    dy = wy * (gt_cy - ex_cy) / ex_h
    dw = ww * jnp.log(gt_w / ex_w)
    dh = wh * jnp.log(gt_h / ex_h)
    return jnp.stack([dx, dy, dw, dh], axis=-1)  # [..., 4]


def decode_boxes(deltas, boxes, weights=(1.0, 1.0, 1.0, 1.0), clamp=BBOX_XFORM_CLIP):
    """Apply regression deltas to boxes; the inverse of :func:`encode_boxes`.

    Same arithmetic as torchvision's ``BoxCoder.decode_single``. Runs in float32
    whatever the input dtype, because bfloat16 box arithmetic loses whole pixels.

    Args:
      deltas: [..., 4] (dx, dy, dw, dh), any float dtype.
      boxes: [..., 4] xyxy, broadcastable against ``deltas``.
      weights: (wx, wy, ww, wh) dividing (dx, dy, dw, dh).
      clamp: upper bound on dw and dh after dividing by the weights.

    Returns:
      [..., 4] float32 xyxy.
    """
    _check_boxes("decode_boxes", "deltas", deltas)
    _check_boxes("decode_boxes", "boxes", boxes)
    try:
        np.broadcast_shapes(np.shape(deltas), np.shape(boxes))
    except ValueError:
        raise ValueError(
            "decode_boxes: deltas [..., 4] and boxes [..., 4] must broadcast, "
            f"got {tuple(np.shape(deltas))} and {tuple(np.shape(boxes))}"
        ) from None
    wx, wy, ww, wh = _check_weights("decode_boxes", weights)
    deltas = jnp.asarray(deltas, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32)
    widths = boxes[..., 2] - boxes[..., 0]  # [...]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, clamp)
    dh = jnp.minimum(deltas[..., 3] / wh, clamp)
    pred_cx = dx * widths + ctr_x
    pred_cy = dy * heights + ctr_y
    half_w = 0.5 * (jnp.exp(dw) * widths)
    half_h = 0.5 * (jnp.exp(dh) * heights)
    return jnp.stack([pred_cx - half_w, pred_cy - half_h, pred_cx + half_w, pred_cy + half_h], axis=-1)  # [..., 4]


def clip_boxes(boxes, image_size):
    """Clamp boxes to the image: x into [0, width], y into [0, height].

    Args:
      boxes: [..., 4] xyxy.
      image_size: (height, width) as Python numbers, 0-d arrays or one [2] array;
        arrays may be traced, so per-image sizes work under ``vmap``.

    Returns:
      [..., 4] clipped boxes, same dtype as ``boxes``.
    """
    _check_boxes("clip_boxes", "boxes", boxes)
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2 or any(np.ndim(s) != 0 for s in image_size):
            raise ValueError(f"clip_boxes: image_size must be (height, width), got {image_size!r}")
        height, width = image_size
    elif np.shape(image_size) == (2,):
        height, width = image_size[0], image_size[1]
    else:
        raise ValueError(
            f"clip_boxes: image_size must be (height, width) or an array of shape [2], "
            f"got shape {tuple(np.shape(image_size))}"
        )
    dtype = boxes.dtype
    height = jnp.asarray(height, dtype)
    width = jnp.asarray(width, dtype)
    x = jnp.clip(boxes[..., 0::2], 0, width)  # [..., 2]
    y = jnp.clip(boxes[..., 1::2], 0, height)  # [..., 2]
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def min_size_mask(boxes, min_size):
    """Which boxes are at least ``min_size`` wide and high.

    The rule of torchvision's ``remove_small_boxes``, returned as a mask so that the
    shape stays static.

    Args:
      boxes: [..., 4] xyxy.
      min_size: minimum width and height in pixels.

    Returns:
      [...] bool.
    """
    _check_boxes("min_size_mask", "boxes", boxes)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return (widths >= min_size) & (heights >= min_size)
