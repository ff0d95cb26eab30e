"""COCO: an instances annotation JSON and its image folder.

Follows the object-detection format of the COCO dataset (Lin et al., "Microsoft COCO:
Common Objects in Context", ECCV 2014; https://cocodataset.org/#format-data):
``images``, ``annotations`` with ``bbox = [x, y, width, height]`` in continuous pixel
coordinates, and ``categories`` whose ids need not be contiguous.

Conversions made here:
- ``[x, y, w, h]`` becomes xyxy ``[x, y, x + w, y + h]`` (already 0-based and
  continuous: no "+1").
- Category ids, sorted, map to contiguous labels 1..K; ``cat_id_to_label`` and
  ``label_to_cat_id`` keep both directions so results can be written back as COCO ids.
- Crowd regions (``iscrowd = 1``) are left out of the targets, as torchvision's and
  detectron2's training recipes do; so are boxes with zero width or height.
- Images without annotations stay in the dataset, as all-background examples.
"""

import json
from pathlib import Path

import numpy as np

from lucid_jax.data.dataset import DatasetError, Example, load_image, make_example


def _require(record, keys, path, what):
    missing = [k for k in keys if k not in record]
    if missing:
        raise DatasetError(path, f"{what} has no {missing[0]!r} field")


class COCODataset:
    """A COCO annotation file and image folder as a :class:`lucid_jax.data.Dataset`.

    Args:
      annotation_file: the instances JSON (e.g. ``instances_val2017.json``).
      image_dir: folder holding each image's ``file_name``.

    Attributes:
      class_names: category names, in label order (label k is ``class_names[k - 1]``).
      cat_id_to_label, label_to_cat_id: the category id <-> label maps.
      image_ids: COCO image ids in dataset order (sorted); ``self[i]["id"]`` is
        ``image_ids[i]``.

    Raises:
      DatasetError: missing file or folder, malformed JSON, missing fields, or an
        annotation that names an unknown image or category.
    """

    def __init__(self, annotation_file: str | Path, image_dir: str | Path):
        path = self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        if not path.is_file():
            raise DatasetError(path, "annotation file not found")
        if not self.image_dir.is_dir():
            raise DatasetError(self.image_dir, "image folder not found")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(path, f"malformed JSON ({err})") from None
        if not isinstance(data, dict):
            raise DatasetError(path, f"top level is a {type(data).__name__}, expected an object")
        _require(data, ("images", "categories"), path, "the annotation file")

        categories = data["categories"]
        for k, cat in enumerate(categories):
            _require(cat, ("id", "name"), path, f"categories[{k}]")
        categories = sorted(categories, key=lambda c: c["id"])
        self.class_names = tuple(str(c["name"]) for c in categories)
        self.cat_id_to_label = {int(c["id"]): k + 1 for k, c in enumerate(categories)}
        self.label_to_cat_id = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        if len(self.cat_id_to_label) != len(categories):
            raise DatasetError(path, "duplicate category ids")

        self._images = {}
        for k, img in enumerate(data["images"]):
            _require(img, ("id", "file_name"), path, f"images[{k}]")
            self._images[int(img["id"])] = {"file_name": img["file_name"], "boxes": [], "labels": []}
        for k, ann in enumerate(data.get("annotations", [])):
            _require(ann, ("image_id", "category_id", "bbox"), path, f"annotations[{k}]")
            if int(ann["image_id"]) not in self._images:
                raise DatasetError(path, f"annotations[{k}] refers to unknown image id {ann['image_id']}")
            if int(ann["category_id"]) not in self.cat_id_to_label:
                raise DatasetError(path, f"annotations[{k}] refers to unknown category id {ann['category_id']}")
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (TypeError, ValueError):
                raise DatasetError(path, f"annotations[{k}] bbox must be [x, y, width, height], got {ann['bbox']!r}") from None
            if ann.get("iscrowd", 0) or w <= 0 or h <= 0:
                continue
            record = self._images[int(ann["image_id"])]
            record["boxes"].append((x, y, x + w, y + h))
            record["labels"].append(self.cat_id_to_label[int(ann["category_id"])])
        self.image_ids = sorted(self._images)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Example:
        """Example ``index``; ``id`` is the COCO image id (an int)."""
        image_id = self.image_ids[index]
        record = self._images[image_id]
        image = load_image(self.image_dir / record["file_name"])
        return make_example(image, record["boxes"], record["labels"], id=image_id)

    def to_coco_results(self, image_id: int, boxes, scores, labels) -> list[dict]:
        """Detections of one image as COCO result records (``COCO.loadRes`` input).

        Args:
          image_id: the COCO image id.
          boxes: [K, 4] xyxy, in the original image's pixels.
          scores: [K].
          labels: [K] contiguous labels 1..K (0, the background, is skipped).

        Returns:
          [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...].
        """
        boxes, scores, labels = np.asarray(boxes, np.float64), np.asarray(scores), np.asarray(labels)
        return [
            {
                "image_id": int(image_id),
                "category_id": self.label_to_cat_id[int(lab)],
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                "score": float(s),
            }
            for b, s, lab in zip(boxes, scores, labels)
            if int(lab) != 0
        ]
