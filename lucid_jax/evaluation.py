"""Detection metrics: COCO AP through pycocotools and PASCAL VOC AP50.

Two entry points:
- :func:`evaluate_dataset` scores per-image detections in original pixels against
  every object of ``dataset.annotation(i)``, however many an image holds. For COCO it
  runs pycocotools on the original annotation file with the file's own ids
  (:func:`coco_results`), so its AP is the official one. This is what the eval
  command reports.
- :class:`DetectionEvaluator` (and :func:`evaluate`) scores the detector's padded
  outputs against the loader's padded targets, which hold at most ``max_boxes``
  objects per image; handy in notebooks and training loops.

- COCO AP@[.5:.95], AP50, AP75, the size breakdown and AR come from pycocotools'
  ``COCOeval`` (Lin et al., ECCV 2014). For datasets other than COCO the ground truth
  is built in memory (:func:`coco_ground_truth`): ``area`` is the box area (there are
  no masks). :func:`evaluate_dataset` enters ignored objects (VOC difficult) as
  crowds; :class:`DetectionEvaluator` counts difficult objects as ordinary ones.
- VOC AP50 follows the VOC development kit (:mod:`lucid_jax.voc_ap`).

Padded predictions and targets are the arrays of the model and of the loader, NumPy
or JAX: ``{"boxes": [B, K, 4], "scores": [B, K], "labels": [B, K], "valid": [B, K]}``
and ``{"boxes": [B, M, 4], "labels": [B, M], "valid": [B, M]}`` with optional
``difficult`` [B, M] and ``image_valid`` [B] (rows that are batch padding). A class
with no ground truth has an undefined AP, reported as NaN and left out of the means.
"""

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from lucid_jax.data.boxes import xywh
from lucid_jax.data.coco import COCODataset
from lucid_jax.data.coco_format import coco_ground_truth, detection_list
from lucid_jax.data.dataset import get_annotation
from lucid_jax.inference import coco_results, coco_rows
from lucid_jax.voc_ap import voc_evaluate


def _images(predictions, targets) -> list[tuple[dict, dict]]:
    """Split (batched or per-image, dict or list of dicts) inputs into per-image (pred, gt) pairs."""
    if isinstance(predictions, (list, tuple)) or isinstance(targets, (list, tuple)):
        if not (isinstance(predictions, (list, tuple)) and isinstance(targets, (list, tuple))) or len(
            predictions
        ) != len(targets):
            raise ValueError("predictions and targets must both be dicts, or lists of the same length")
        return [pair for p, t in zip(predictions, targets) for pair in _images(p, t)]
    pred = {k: np.asarray(v) for k, v in predictions.items() if k in ("boxes", "scores", "labels", "valid")}
    gt = {k: np.asarray(v) for k, v in targets.items() if k in ("boxes", "labels", "valid", "difficult", "image_valid")}
    if pred["scores"].ndim == 1:  # a single image: add the batch axis
        pred = {k: v[None] for k, v in pred.items()}
        gt = {k: v[None] for k, v in gt.items()}
    b = pred["scores"].shape[0]
    if gt["labels"].shape[0] != b:
        raise ValueError(f"{b} images of predictions but {gt['labels'].shape[0]} of targets")
    out = []
    for i in range(b):
        if "image_valid" in gt and not gt["image_valid"][i]:
            continue
        keep = pred["labels"][i] > 0
        if "valid" in pred:
            keep &= pred["valid"][i].astype(bool)
        real = gt["valid"][i].astype(bool) if "valid" in gt else np.ones(gt["labels"].shape[1], bool)
        difficult = gt["difficult"][i].astype(bool) if "difficult" in gt else np.zeros_like(real)
        out.append(
            (
                {
                    "boxes": pred["boxes"][i][keep].astype(np.float64),
                    "scores": pred["scores"][i][keep].astype(np.float64),
                    "labels": pred["labels"][i][keep].astype(np.int64),
                },
                {
                    "boxes": gt["boxes"][i][real].astype(np.float64),
                    "labels": gt["labels"][i][real].astype(np.int64),
                    "difficult": difficult[real],
                },
            )
        )
    return out


_COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_max_dets(max_detections: int = 100) -> tuple[int, int, int]:
    """COCOeval's ``maxDets`` for up to ``max_detections`` detections per image: (1, 10, 100),
    or (1, 10, K) where K > 100, so that a crowded image's detections past the 100th count."""
    return 1, 10, max(100, int(max_detections))


def coco_stat_names(max_dets: Sequence[int] = (1, 10, 100)) -> tuple[str, ...]:
    """The 12 COCO figures' names; the third recall is named for its limit (AR100, AR1000)."""
    return tuple(f"AR{max_dets[2]}" if name == "AR100" else name for name in _COCO_STATS)


def _coco_summary(evaluator) -> list[float]:
    """COCOeval's 12 box figures, every one at the largest ``maxDets`` but AR1 and AR10.

    ``COCOeval.summarize`` reads AP@[.5:.95] at ``maxDets`` = 100 whatever the
    parameters are (it reports -1 when 100 is not among them). Here every AP is the
    mean of ``precision[..., -1]`` over its entries that are not -1, and every recall
    ``recall[..., m]``, as ``summarize`` takes them; with the default (1, 10, 100)
    the figures equal its ``stats``.
    """
    p = evaluator.params
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]: IoU thresholds, recalls, classes, areas, maxDets
    recall = evaluator.eval["recall"]  # [T, K, A, M]
    area = {name: i for i, name in enumerate(p.areaRngLbl)}

    def mean(values) -> float:
        values = values[values > -1]
        return float(values.mean()) if values.size else -1.0

    def ap(iou=None, rng="all") -> float:
        s = precision if iou is None else precision[np.isclose(p.iouThrs, iou)]
        return mean(s[:, :, :, area[rng], -1])

    def ar(m, rng="all") -> float:
        return mean(recall[:, :, area[rng], m])

    return [
        ap(),
        ap(0.5),
        ap(0.75),
        ap(rng="small"),
        ap(rng="medium"),
        ap(rng="large"),
        ar(0),
        ar(1),
        ar(-1),
        ar(-1, "small"),
        ar(-1, "medium"),
        ar(-1, "large"),
    ]


def _run_cocoeval(coco_gt, results: list[dict], max_detections: int = 100) -> dict:
    """COCOeval (bbox) of ``results`` against a loaded ``COCO``, with ``maxDets``
    :func:`coco_max_dets` (``max_detections``); prints silenced by the caller.

    Returns:
      {the 12 named stats (:func:`coco_stat_names`; NaN where pycocotools reports -1),
      "stats": the 12 raw floats, "per_class_AP": {category name: AP, NaN without
      ground truth}, "max_dets": [1, 10, K]}.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    known = set(coco_gt.getImgIds())
    unknown = sorted({r["image_id"] for r in results} - known, key=str)
    if unknown:
        raise ValueError(f"results name image ids {unknown[:5]} that the ground truth does not have")
    if results:
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))  # loadRes writes into the records
    else:  # loadRes cannot take an empty list
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": coco_gt.dataset.get("images", []),
            "categories": coco_gt.dataset.get("categories", []),
            "annotations": [],
        }
        coco_dt.createIndex()
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    max_dets = coco_max_dets(max_detections)
    evaluator.params.maxDets = list(max_dets)
    evaluator.evaluate()
    evaluator.accumulate()
    stats = _coco_summary(evaluator)
    names = coco_stat_names(max_dets)
    metrics: dict[str, Any] = {name: v if v > -1 else float("nan") for name, v in zip(names, stats)}
    metrics["stats"] = stats
    metrics["max_dets"] = list(max_dets)
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]  # area "all", the largest maxDets
        per_class[str(coco_gt.cats[cat_id]["name"])] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    metrics["per_class_AP"] = per_class
    return metrics


def coco_evaluate_official(gt, results: list[dict], max_detections: int = 100) -> dict:
    """pycocotools' box evaluation, as the official COCO numbers are computed.

    Args:
      gt: a COCO instances dict (e.g. :func:`coco_ground_truth`), or the path of an
        annotation file, which ``pycocotools.coco.COCO`` loads itself.
      results: COCO result records (e.g. :func:`coco_results`); empty scores 0.
      max_detections: the detections per image that count: COCOeval's ``maxDets``
        are (1, 10, K) for K > 100, else the standard (1, 10, 100).

    Returns:
      {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100" (AR1000 for
      K = 1000), "ARs", "ARm", "ARl": float (NaN where pycocotools reports -1),
      "stats": the 12 raw figures (``COCOeval.stats`` at the standard maxDets),
      "per_class_AP": {category name: AP@[.5:.95], NaN for a category without
      ground truth}, "max_dets": [1, 10, K]}. Every AP is at the largest maxDets.
    """
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if isinstance(gt, dict):
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
        else:
            coco_gt = COCO(str(gt))
        return _run_cocoeval(coco_gt, list(results), max_detections)


def coco_evaluate(
    images: list[tuple[dict, dict]], class_names: Sequence[str], max_detections: int | None = None
) -> dict:
    """COCO box metrics through pycocotools, image ids 1..N and category ids = labels.

    Args:
      images: (prediction, ground truth) per image.
      class_names: the foreground classes.
      max_detections: the detections per image that count (see
        :func:`coco_evaluate_official`; default: the most any image has, at least 100).

    Returns:
      {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100" (AR<K>), "ARs",
      "ARm", "ARl": float (NaN where pycocotools reports -1), "per_class_AP": {name:
      float}}.
    """

    annotations: list[dict] = []
    results: list[dict] = []
    for image_id, (pred, gt) in enumerate(images, start=1):
        for box, label, bbox in zip(gt["boxes"], gt["labels"], xywh(gt["boxes"])):
            # ids start at 1: COCOeval uses 0 for "unmatched".
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": bbox,
                    "area": float((box[2] - box[0]) * (box[3] - box[1])),
                    "iscrowd": 0,
                }
            )
        results += coco_rows(image_id, pred)
    categories = [{"id": k, "name": name} for k, name in enumerate(class_names, start=1)]
    gt = {
        "images": [{"id": i} for i in range(1, len(images) + 1)],
        "categories": categories,
        "annotations": annotations,
    }
    if max_detections is None:
        max_detections = most_detections(pred for pred, _ in images)
    metrics = coco_evaluate_official(gt, results, max_detections)
    del metrics["stats"], metrics["max_dets"]  # AR<K> names the limit
    return metrics


def most_detections(detections) -> int:
    """The most detections any image has, and at least 100 (COCO's standard limit)."""
    return max([100, *(len(d["scores"]) for d in detections)])


class DetectionEvaluator:
    """Accumulates padded batches, then computes COCO and VOC metrics in one go.

    Args:
      class_names: foreground names, label k is ``class_names[k - 1]`` (e.g. a
        dataset's ``class_names``), or the number of foreground classes.
      voc_iou_threshold: VOC's matching threshold.
      max_detections: the detections per image COCO counts (see
        :func:`coco_evaluate_official`; default: the most any image has, at least 100).

    Example::

        evaluator = DetectionEvaluator(dataset.class_names)
        predict = make_predict_fn(model, channels_last=True)  # lucid_jax.inference; the Loader's layout
        for batch in loader.epoch():
            evaluator.add(predict(variables, batch["images"], batch["image_sizes"]), batch)
        metrics = evaluator.compute()
    """

    def __init__(
        self, class_names: Sequence[str] | int, voc_iou_threshold: float = 0.5, max_detections: int | None = None
    ):
        if isinstance(class_names, int):
            class_names = [str(k) for k in range(1, class_names + 1)]
        self.class_names = tuple(class_names)
        self.voc_iou_threshold = voc_iou_threshold
        self.max_detections = max_detections
        self.reset()

    def reset(self) -> None:
        self._images: list[tuple[dict, dict]] = []

    def __len__(self) -> int:
        return len(self._images)

    def add(self, predictions, targets) -> None:
        """Add one batch (or a list of batches, or one image's unbatched arrays)."""
        images = _images(predictions, targets)
        k = len(self.class_names)
        for pred, gt in images:
            if (gt["labels"] < 1).any() or (gt["labels"] > k).any():
                raise ValueError(f"ground-truth labels must be in 1..{k}, got {sorted(set(gt['labels'].tolist()))}")
            pred_keep = pred["labels"] <= k  # predictions of unknown classes cannot match anything
            self._images.append(({key: v[pred_keep] for key, v in pred.items()}, gt))

    def compute(self) -> dict:
        """Metrics over every image added so far.

        Returns:
          The :func:`coco_evaluate` dict plus "voc_AP50_11pt", "voc_AP50_all" (means over
          classes with ground truth) and "per_class_voc_AP50" ({name: all-point AP}).
        """
        if not self._images:
            raise ValueError("DetectionEvaluator.compute: no images were added")
        metrics = coco_evaluate(self._images, self.class_names, self.max_detections)
        voc = voc_evaluate(self._images, len(self.class_names) + 1, self.voc_iou_threshold)
        for key, name in (("11pt", "voc_AP50_11pt"), ("all", "voc_AP50_all")):
            metrics[name] = float(np.nanmean(voc[key])) if np.isfinite(voc[key]).any() else float("nan")
        metrics["per_class_voc_AP50"] = {n: float(v) for n, v in zip(self.class_names, voc["all"])}
        return metrics


def evaluate(predictions, targets, class_names: Sequence[str] | int) -> dict:
    """One-shot :class:`DetectionEvaluator`: ``add(predictions, targets)`` then ``compute()``."""
    evaluator = DetectionEvaluator(class_names)
    evaluator.add(predictions, targets)
    return evaluator.compute()


def num_ground_truth(dataset) -> dict[str, int]:
    """Objects per class that evaluation counts: every annotated box but ignored ones.

    Reads ``annotation(i)`` of every image (no pixels decoded for the built-in
    datasets), so ``--max-boxes`` and any other training cut play no part.

    Returns:
      {class name: count}, in label order, zero for a class without objects.
    """
    counts = np.zeros(len(dataset.class_names) + 1, np.int64)
    for i in range(len(dataset)):
        ann = get_annotation(dataset, i)
        counts += np.bincount(ann["labels"][~ann["ignore"]], minlength=len(counts))[: len(counts)]
    return {str(name): int(counts[k]) for k, name in enumerate(dataset.class_names, start=1)}


def evaluate_dataset(dataset, detections, *, voc_iou_threshold: float = 0.5, max_detections: int | None = None) -> dict:
    """COCO and VOC metrics of per-image detections against every annotated object.

    The ground truth is ``dataset.annotation(i)``: all boxes in original pixels,
    however many there are. COCO metrics are pycocotools' on :func:`coco_ground_truth`
    (for a :class:`COCODataset`, its original annotation file, loaded by pycocotools)
    and :func:`coco_results`. VOC AP50 follows the devkit (see the module), with
    ignored objects (difficult, crowd) neither hits nor misses.

    Args:
      dataset: a dataset with ``class_names`` and, ideally, ``annotation``.
      detections: one dict per dataset index (a list in dataset order, or a dict
        keyed by index) of ``boxes [K, 4]`` xyxy in original pixels, ``scores [K]``,
        ``labels [K]``, optional ``valid [K]``; e.g. from ``lucid_jax.inference.unpad_detections``.
      voc_iou_threshold: VOC's matching threshold.
      max_detections: the detections per image COCO counts, COCOeval's ``maxDets``
        (1, 10, K) for K > 100 (default: the most any image has, at least 100; the
        eval job passes the model's limit).

    Returns:
      {"AP", "AP50", "AP75": float, "per_class_AP": {name: COCO AP},
      "voc_AP50_11pt", "voc_AP50_all": float (means over classes with ground truth),
      "per_class_voc_AP50": {name: all-point AP}, "num_ground_truth": {name: int},
      "coco_stats": {the 12 named COCOeval stats}, "coco_max_dets": [1, 10, K],
      "num_images": int, "num_detections": int}.
    """
    n, names = len(dataset), tuple(dataset.class_names)
    if n == 0:
        raise ValueError("evaluate_dataset: the dataset is empty")
    dets = detection_list(detections, n, len(names))
    images, counts = [], np.zeros(len(names) + 1, np.int64)
    for i, det in enumerate(dets):
        ann = get_annotation(dataset, i)
        gt = {
            "boxes": ann["boxes"].astype(np.float64),
            "labels": ann["labels"].astype(np.int64),
            "difficult": ann["ignore"],
        }
        images.append((det, gt))
        counts += np.bincount(gt["labels"][~gt["difficult"]], minlength=len(counts))[: len(counts)]
    gt_source = dataset.annotation_file if isinstance(dataset, COCODataset) else coco_ground_truth(dataset)
    if max_detections is None:
        max_detections = most_detections(dets)
    coco = coco_evaluate_official(gt_source, coco_results(dataset, dets), max_detections)
    voc = voc_evaluate(images, len(names) + 1, voc_iou_threshold)
    metrics = {key: coco[key] for key in ("AP", "AP50", "AP75")}
    metrics["per_class_AP"] = coco["per_class_AP"]
    for key, name in (("11pt", "voc_AP50_11pt"), ("all", "voc_AP50_all")):
        metrics[name] = float(np.nanmean(voc[key])) if np.isfinite(voc[key]).any() else float("nan")
    metrics["per_class_voc_AP50"] = {str(c): float(v) for c, v in zip(names, voc["all"])}
    metrics["num_ground_truth"] = {str(c): int(counts[k]) for k, c in enumerate(names, start=1)}
    metrics["coco_stats"] = {key: coco[key] for key in coco_stat_names(coco["max_dets"])}
    metrics["coco_max_dets"] = coco["max_dets"]
    metrics["num_images"] = n
    metrics["num_detections"] = int(sum(len(d["scores"]) for d in dets))
    return metrics
