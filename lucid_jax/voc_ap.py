"""VOC AP50 as the VOC development kit's ``VOCevaldet`` (Everingham et al., IJCV
2010): detections of a class sorted by score, each matched greedily to the unmatched
ground truth of highest IoU when IoU > 0.5; a detection whose best match is
``difficult`` counts neither way, and difficult objects are not in the recall's
denominator. AP is the 11-point interpolated average (VOC2007) or the area under the
monotone precision envelope (VOC2010+). Unlike the devkit, IoU uses the project's
continuous boxes, without the devkit's "+1" on widths.

Per-image pairs come from ``lucid_jax.evaluation``: ({"boxes" [K, 4], "scores" [K],
"labels" [K]}, {"boxes" [M, 4], "labels" [M], "difficult" [M]}) in float64.
"""

import numpy as np

from lucid_jax.data.boxes import iou_one_to_many


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """Average precision from a ranked list's cumulative recall and precision.

    Args:
      recall, precision: [N] after each of the N ranked detections.
      use_07_metric: VOC2007's mean of the best precision at recall >= 0, 0.1, ..., 1;
        otherwise VOC2010's area under the precision envelope (the max precision at
        any recall >= r), summed where recall changes.

    Returns:
      AP in [0, 1].
    """
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if use_07_metric:
        return float(sum(precision[recall >= t].max(initial=0.0) for t in np.linspace(0.0, 1.0, 11)) / 11.0)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: best precision at this recall or beyond
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def voc_pr_curve(images: list[tuple[dict, dict]], label: int, iou_threshold: float = 0.5):
    """Ranked-detection recall and precision of one class, VOC style.

    Args:
      images: per-image (prediction, ground truth) pairs, as from ``_images``.
      label: the class.

    Returns:
      (recall [N], precision [N], npos): N detections of the class, npos the number
      of non-difficult ground-truth objects.
    """
    gts, dets = [], []
    for k, (pred, gt) in enumerate(images):
        sel = gt["labels"] == label
        gts.append((gt["boxes"][sel], gt["difficult"][sel], np.zeros(sel.sum(), bool)))
        for box, score in zip(pred["boxes"][pred["labels"] == label], pred["scores"][pred["labels"] == label]):
            dets.append((score, k, box))
    npos = int(sum((~d).sum() for _, d, _ in gts))
    order = np.argsort([-d[0] for d in dets], kind="stable")  # ties keep input order
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for rank, j in enumerate(order):
        _, k, box = dets[j]
        boxes, difficult, matched = gts[k]
        ious = iou_one_to_many(box, boxes) if len(boxes) else np.zeros(0)
        best = int(np.argmax(ious)) if len(ious) else -1
        if best >= 0 and ious[best] > iou_threshold:
            if difficult[best]:
                continue  # neither a hit nor a miss
            if not matched[best]:
                tp[rank], matched[best] = 1.0, True
                continue
        fp[rank] = 1.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / max(npos, 1)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return recall, precision, npos


def voc_evaluate(images: list[tuple[dict, dict]], num_classes: int, iou_threshold: float = 0.5) -> dict:
    """VOC AP per foreground class 1..num_classes-1, 11-point and all-point.

    Returns:
      {"11pt": [C-1] float, "all": [C-1] float}, NaN for classes with no (non-difficult) ground truth.
    """
    out = {"11pt": np.full(num_classes - 1, np.nan), "all": np.full(num_classes - 1, np.nan)}
    for label in range(1, num_classes):
        recall, precision, npos = voc_pr_curve(images, label, iou_threshold)
        if npos:
            out["11pt"][label - 1] = voc_ap(recall, precision, use_07_metric=True)
            out["all"][label - 1] = voc_ap(recall, precision)
    return out
