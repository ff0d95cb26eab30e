"""Datasets and detections in COCO's json formats, for pycocotools.

- Ground truth (https://cocodataset.org/#format-data): for a :class:`COCODataset` it
  is the original file, unchanged; any other dataset is written with synthetic ids,
  image id ``index + 1`` and category id = label, ``area`` the box area, and ignored
  objects (VOC ``difficult``) as ``iscrowd: 1``, which ``COCOeval`` neither rewards
  nor penalises.
- Results (https://cocodataset.org/#format-results): ``image_id``, ``category_id``,
  ``bbox = [x, y, w, h]`` and ``score``, with the same ids as the ground truth: the
  file's own for COCO, the synthetic ones otherwise.

Detections are per image and unpadded, in the original image's pixels (after EXIF
rotation): a list with one dict per dataset index, or a dict keyed by index (a
missing index has no detections). Each dict holds ``boxes [K, 4]`` xyxy, ``scores
[K]``, ``labels [K]`` and optionally ``valid [K]``; background (0), labels beyond
the dataset's classes and invalid rows are left out.
"""

import json

import numpy as np

from lucid_jax.data.boxes import xywh
from lucid_jax.data.coco import COCODataset
from lucid_jax.data.dataset import get_annotation


def detection_list(detections, num_images: int, num_classes: int) -> list[dict]:
    """Per-image detections as a list of ``num_images`` cleaned dicts.

    Args:
      detections: a list of ``num_images`` dicts, or a dict {index: dict}.
      num_classes: foreground classes K; labels outside 1..K are dropped.

    Returns:
      [{"boxes": [K, 4] float64, "scores": [K] float64, "labels": [K] int64}] * num_images.
    """
    if isinstance(detections, dict):
        unknown = sorted(set(detections) - set(range(num_images)), key=str)
        if unknown:
            raise ValueError(f"detections for indices {unknown[:5]} outside the dataset's 0..{num_images - 1}")
        detections = [detections.get(i) for i in range(num_images)]
    elif len(detections) != num_images:
        raise ValueError(f"{len(detections)} images of detections for a dataset of {num_images}")
    out = []
    for det in detections:
        if det is None:
            out.append({"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)})
            continue
        boxes = np.asarray(det["boxes"], np.float64).reshape(-1, 4)
        scores = np.asarray(det["scores"], np.float64).reshape(-1)
        labels = np.asarray(det["labels"]).astype(np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"detections with {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        keep = (labels >= 1) & (labels <= num_classes)
        if "valid" in det:
            keep &= np.asarray(det["valid"], bool).reshape(-1)
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out


def coco_ids(dataset) -> tuple[list[int], dict[int, int]]:
    """(image id of each index, category id of each label) as in the ground truth."""
    if isinstance(dataset, COCODataset):
        return list(dataset.image_ids), dict(dataset.label_to_cat_id)
    return list(range(1, len(dataset) + 1)), {k: k for k in range(1, len(dataset.class_names) + 1)}


def coco_ground_truth(dataset) -> dict:
    """The dataset's ground truth as a COCO instances dict.

    Returns:
      For a :class:`COCODataset`, its annotation file as loaded, unchanged. Otherwise
      {"images": [{"id", "width", "height", "file_name"}], "annotations": [{"id",
      "image_id", "category_id", "bbox", "area", "iscrowd"}], "categories": [{"id",
      "name"}]} with synthetic ids (see the module).
    """
    if isinstance(dataset, COCODataset):
        with open(dataset.annotation_file, encoding="utf-8") as f:
            return json.load(f)
    image_ids, cat_ids = coco_ids(dataset)
    images: list[dict] = []
    annotations: list[dict] = []
    for index, image_id in enumerate(image_ids):
        ann = get_annotation(dataset, index)
        images.append({"id": image_id, "width": ann["width"], "height": ann["height"], "file_name": str(ann["id"])})
        for box, label, ignore in zip(ann["boxes"].astype(np.float64), ann["labels"], ann["ignore"]):
            annotations.append(
                {
                    "id": len(annotations) + 1,  # from 1: COCOeval uses 0 for "unmatched"
                    "image_id": image_id,
                    "category_id": cat_ids[int(label)],
                    "bbox": xywh([box])[0],
                    "area": float((box[2] - box[0]) * (box[3] - box[1])),
                    "iscrowd": int(ignore),
                }
            )
    categories = [{"id": cat_ids[k], "name": str(name)} for k, name in enumerate(dataset.class_names, start=1)]
    return {"images": images, "annotations": annotations, "categories": categories}
