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
  Image ids are kept as they are (``image_ids``, ``image_id_to_index``).
- Crowd regions (``iscrowd = 1``) are left out of the training targets, as
  torchvision's and detectron2's recipes do, but kept, flagged ``ignore``, in
  :meth:`COCODataset.annotation`, which is what evaluation reads.
- Boxes are taken as they lie in the image: one that extends past the image (its
  ``height`` and ``width`` fields, or its header where the file has none) is clipped
  to it, here, and counted in ``clipped_boxes``, so training and evaluation see the
  same box. Boxes with zero or negative width or height, as annotated or once
  clipped, are dropped and counted in ``dropped_invalid_boxes``. (pycocotools on the
  original file sees them as written, as the official numbers do.)
- Every listed image file must exist: its folder is listed when the file is loaded
  (no image is opened), so a missing image is an error before any work starts.
- Images without annotations stay in the dataset, as all-background examples.
- A ``file_name`` that is absolute or climbs out of the image folder with ".." is
  refused when the annotation file is loaded: images come from the image folder only.
"""

import json
import math
import os
from pathlib import Path, PurePath

import numpy as np

from lucid_jax.data.boxes import xywh
from lucid_jax.data.dataset import (
    Annotation,
    DatasetError,
    Example,
    clip_to_image,
    image_size,
    load_image,
    make_annotation,
    make_example,
)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(record, key: str, path, where: str):
    if not isinstance(record, dict):
        raise DatasetError(path, f"{where} must be an object, got {_short(record)}")
    if key not in record:
        raise DatasetError(path, f"{where} has no {key!r} field")
    return record[key]


def _int(value, path, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(path, f"{where} must be an integer, got {_short(value)}")
    return value


def _list(value, path, where: str) -> list:
    if not isinstance(value, list):
        raise DatasetError(path, f"{where} must be a list, got {_short(value)}")
    return value


def _size_field(img: dict, key: str, path, where: str) -> int | None:
    if key not in img:
        return None
    value = img[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DatasetError(path, f"{where} {key} must be a positive integer, got {_short(value)}")
    return value


def _safe_file_name(value, path, where: str) -> str:
    """A relative path that stays inside the image folder."""
    if not isinstance(value, str) or not value:
        raise DatasetError(path, f"{where} file_name must be a non-empty string, got {_short(value)}")
    rel = PurePath(value)
    if rel.is_absolute() or rel.anchor or ".." in rel.parts or "\x00" in value:
        raise DatasetError(
            path,
            f"{where} file_name {_short(value)} leaves the image folder; file names must be relative paths inside it",
        )
    return value


def _bbox(value, path, where: str) -> tuple[float, float, float, float]:
    if (
        not isinstance(value, list)
        or len(value) != 4
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)
    ):
        raise DatasetError(path, f"{where} bbox must be [x, y, width, height], got {_short(value)}")
    x, y, w, h = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise DatasetError(path, f"{where} bbox has a non-finite value {_short(value)}")
    return x, y, w, h


class COCODataset:
    """A COCO annotation file and image folder as a :class:`lucid_jax.data.Dataset`.

    Args:
      annotation_file: the instances JSON (e.g. ``instances_val2017.json``).
      image_dir: folder holding each image's ``file_name``.

    Attributes:
      annotation_file: the JSON's path (what official evaluation loads).
      class_names: category names, in label order (label k is ``class_names[k - 1]``).
      cat_id_to_label, label_to_cat_id: the category id <-> label maps.
      image_ids: COCO image ids in dataset order (sorted); ``self[i]["id"]`` is
        ``image_ids[i]``. ``image_id_to_index`` is the inverse.
      dropped_invalid_boxes: annotations left out for a box with no area, as annotated
        or once clipped to the image.
      clipped_boxes: boxes that extended past their image, clipped to it.

    Raises:
      DatasetError: missing file or folder, malformed JSON, missing or mistyped fields,
        duplicate ids, an annotation that names an unknown image or category, or a
        ``file_name`` outside the image folder.
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
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DatasetError(path, f"malformed JSON ({type(err).__name__}: {err})") from None
        if not isinstance(data, dict):
            raise DatasetError(path, f"top level is a {type(data).__name__}, expected an object")
        images = _list(_field(data, "images", path, "the annotation file"), path, "images")
        categories = _list(_field(data, "categories", path, "the annotation file"), path, "categories")
        annotations = _list(data.get("annotations", []), path, "annotations")

        cat_ids, names = [], {}
        for k, cat in enumerate(categories):
            cat_id = _int(_field(cat, "id", path, f"categories[{k}]"), path, f"categories[{k}] id")
            names[cat_id] = str(_field(cat, "name", path, f"categories[{k}]"))
            cat_ids.append(cat_id)
        if len(names) != len(cat_ids):
            raise DatasetError(path, "duplicate category ids")
        self.category_ids = sorted(names)
        self.class_names = tuple(names[c] for c in self.category_ids)
        self.cat_id_to_label = {cat_id: k + 1 for k, cat_id in enumerate(self.category_ids)}
        self.label_to_cat_id = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}

        self._images: dict[int, dict] = {}
        for k, img in enumerate(images):
            where = f"images[{k}]"
            image_id = _int(_field(img, "id", path, where), path, f"{where} id")
            if image_id in self._images:
                raise DatasetError(path, f"{where} repeats image id {image_id}")
            self._images[image_id] = {
                "file_name": _safe_file_name(_field(img, "file_name", path, where), path, where),
                "height": _size_field(img, "height", path, where),
                "width": _size_field(img, "width", path, where),
                "boxes": [],
                "labels": [],
                "crowd": [],
            }
        self.dropped_invalid_boxes = 0
        for k, ann in enumerate(annotations):
            where = f"annotations[{k}]"
            image_id = _int(_field(ann, "image_id", path, where), path, f"{where} image_id")
            cat_id = _int(_field(ann, "category_id", path, where), path, f"{where} category_id")
            if image_id not in self._images:
                raise DatasetError(path, f"{where} refers to unknown image id {image_id}")
            if cat_id not in self.cat_id_to_label:
                raise DatasetError(path, f"{where} refers to unknown category id {cat_id}")
            x, y, w, h = _bbox(_field(ann, "bbox", path, where), path, where)
            with np.errstate(over="ignore"):  # overflow becomes inf, refused below
                box = np.array([x, y, x + w, y + h], np.float32)
            if not np.isfinite(box).all():
                raise DatasetError(path, f"{where} bbox {_short(ann['bbox'])} does not fit in float32")
            if not (box[2] > box[0] and box[3] > box[1]):
                self.dropped_invalid_boxes += 1
                continue
            record = self._images[image_id]
            record["boxes"].append(box)
            record["labels"].append(self.cat_id_to_label[cat_id])
            record["crowd"].append(bool(ann.get("iscrowd", 0)))  # pycocotools reads it by truth value too
        self.image_ids = sorted(self._images)
        self.image_id_to_index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self._check_files_exist(path)
        self.clipped_boxes = 0
        for index, image_id in enumerate(self.image_ids):
            record = self._images[image_id]
            boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
            labels, crowd = np.asarray(record["labels"], np.int32), np.asarray(record["crowd"], bool)
            if len(boxes):
                boxes, keep, clipped = clip_to_image(boxes, self.image_shape(index))
                self.clipped_boxes += clipped
                self.dropped_invalid_boxes += int((~keep).sum())
                boxes, labels, crowd = boxes[keep], labels[keep], crowd[keep]
            record["boxes"], record["labels"], record["crowd"] = boxes, labels, crowd

    def _check_files_exist(self, path: Path) -> None:
        """Refuse a listed image file that is missing, listing each folder once (no file is opened)."""
        listed: dict[Path, set[str]] = {}
        missing = []
        for image_id in self.image_ids:
            file = self.image_dir / self._images[image_id]["file_name"]
            if file.parent not in listed:
                try:
                    listed[file.parent] = {e.name for e in os.scandir(file.parent) if not e.is_dir()}
                except OSError:
                    listed[file.parent] = set()
            if file.name not in listed[file.parent]:
                missing.append(file)
        if missing:
            count = f"{len(missing)} of the {len(self.image_ids)} listed images are missing"
            more = f" ({count})" if len(missing) > 1 else ""
            raise DatasetError(missing[0], f"image file not found, listed in {path}{more}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        """The image file of example ``index``."""
        return self.image_dir / self._images[self.image_ids[index]]["file_name"]

    def __getitem__(self, index: int) -> Example:
        """Example ``index`` (crowd regions left out); ``id`` is the COCO image id (an int)."""
        image_id = self.image_ids[index]
        record = self._images[image_id]
        image = load_image(self.image_path(index))
        keep = ~record["crowd"]
        return make_example(image, record["boxes"][keep], record["labels"][keep], id=image_id)

    def annotation(self, index: int) -> Annotation:
        """Every object of image ``index``, crowd regions flagged ``ignore``; no pixels decoded.

        ``height`` and ``width`` are the file's fields, or the image header's when the
        file has none.
        """
        image_id = self.image_ids[index]
        record = self._images[image_id]
        self.image_shape(index)
        return make_annotation(
            record["boxes"].copy(),
            record["labels"].copy(),
            record["crowd"].copy(),
            image_id,
            record["height"],
            record["width"],
        )

    def image_shape(self, index: int) -> tuple[int, int]:
        """(height, width) of image ``index``: the file's fields, else its header (read once, cached)."""
        record = self._images[self.image_ids[index]]
        if record["height"] is None or record["width"] is None:
            record["height"], record["width"] = image_size(self.image_path(index))
        return record["height"], record["width"]

    def train_object_counts(self) -> np.ndarray:
        """[N] objects per image that training sees (crowd regions left out)."""
        return np.asarray([int((~self._images[i]["crowd"]).sum()) for i in self.image_ids], np.int64)

    def to_coco_results(self, image_id: int, boxes, scores, labels) -> list[dict]:
        """Detections of one image as COCO result records (``COCO.loadRes`` input).

        Args:
          image_id: the COCO image id.
          boxes: [K, 4] xyxy, in the original image's pixels.
          scores: [K].
          labels: [K] contiguous labels 1..K (0, the background, and unknown labels are skipped).

        Returns:
          [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...].
        """
        scores, labels = np.asarray(scores).reshape(-1), np.asarray(labels).reshape(-1)
        return [
            {"image_id": int(image_id), "category_id": self.label_to_cat_id[int(lab)], "bbox": box, "score": float(s)}
            for box, s, lab in zip(xywh(boxes), scores, labels)
            if int(lab) in self.label_to_cat_id
        ]
