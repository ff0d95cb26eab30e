"""NumPy box arithmetic for the host side: dataset generation and evaluation.

Same convention as :mod:`lucid_jax.ops.boxes` (pixel xyxy, continuous coordinates,
no "+1"), in whatever float precision the caller passes, so evaluation can stay in
float64 as the VOC and COCO references do.
"""

import numpy as np


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with many.

    Args:
      box: [4] xyxy.
      boxes: [N, 4] xyxy.

    Returns:
      [N] IoU; 0 where the union is not positive (two degenerate boxes).
    """
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0, None)  # [N]
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0, None)  # [N]
    inter = w * h
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def xywh(boxes) -> list[list[float]]:
    """Boxes as COCO's ``[x, y, width, height]``, Python floats (what COCO's json holds).

    Args:
      boxes: [N, 4] xyxy (any array-like).

    Returns:
      N lists ``[x1, y1, x2 - x1, y2 - y1]``.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1).tolist()
