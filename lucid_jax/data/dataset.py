"""The dataset protocol shared by the shapes, VOC and COCO datasets, its error type,
image decoding, and per-image object counts.

A dataset is anything indexable that returns one example as NumPy arrays, in the box
convention of the whole project (pixel xyxy, continuous coordinates, no "+1", as in
torchvision and detectron2). Label 0 is the background; foreground labels are
1..K, and ``class_names[k - 1]`` names label k, so a detector for the dataset has
``len(class_names) + 1`` classes.

The three built-in datasets also give ``annotation(index)`` (an :class:`Annotation`:
every ground-truth object of an image, read without decoding the image), which is
what evaluation counts, and ``train_object_counts()``, which is what training keeps.
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypedDict, runtime_checkable

import numpy as np


class DatasetError(ValueError):
    """A dataset on disk is missing or malformed; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        # One line, whatever the underlying parser put in its message.
        super().__init__(f"{path}: {' '.join(str(problem).split())}")
        self.path = path


class Example(TypedDict):
    """One image and its objects, as every dataset returns it.

    image: [H, W, 3] uint8 RGB.
    boxes: [M, 4] float32 xyxy pixels.
    labels: [M] int32 in 1..K.
    difficult: [M] bool (VOC's flag; all False elsewhere).
    id: a hashable identifier (file stem, COCO image id or index).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    id: Any


class Annotation(TypedDict):
    """Every ground-truth object of one image, as evaluation counts them.

    boxes: [M, 4] float32 xyxy in the original image's pixels (after EXIF rotation).
    labels: [M] int32 in 1..K.
    ignore: [M] bool, objects that are neither hits nor misses (VOC ``difficult``,
      COCO ``iscrowd``).
    id: the example's identifier (as in :class:`Example`).
    height, width: the original image's size, after EXIF rotation.
    """

    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    id: Any
    height: int
    width: int


@runtime_checkable
class Dataset(Protocol):
    """``len(ds)``, ``ds[i] -> Example`` and ``ds.class_names`` (foreground names, label k -> [k - 1])."""

    class_names: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


def make_example(image, boxes, labels, difficult=None, id=None) -> Example:
    """Build an :class:`Example` with the protocol's dtypes and shapes.

    Args:
      image: [H, W, 3] uint8.
      boxes: [M, 4] (or empty) xyxy.
      labels: [M].
      difficult: [M] or None (all False).
      id: the example's identifier.

    Returns:
      The example, with float32 boxes, int32 labels and bool difficult.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int32).reshape(-1)
    difficult = np.zeros(len(labels), bool) if difficult is None else np.asarray(difficult, bool).reshape(-1)
    if not len(boxes) == len(labels) == len(difficult):
        raise ValueError(f"example {id!r}: {len(boxes)} boxes, {len(labels)} labels, {len(difficult)} difficult flags")
    return Example(image=image, boxes=boxes, labels=labels, difficult=difficult, id=id)


def make_annotation(boxes, labels, ignore, id, height: int, width: int) -> Annotation:
    """Build an :class:`Annotation` with the protocol's dtypes (float32 [M, 4], int32 [M], bool [M])."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int32).reshape(-1)
    ignore = np.asarray(ignore, bool).reshape(-1)
    if not len(boxes) == len(labels) == len(ignore):
        raise ValueError(f"annotation {id!r}: {len(boxes)} boxes, {len(labels)} labels, {len(ignore)} ignore flags")
    return Annotation(boxes=boxes, labels=labels, ignore=ignore, id=id, height=int(height), width=int(width))


# EXIF orientations 5 to 8 turn the stored image by a quarter turn.
_EXIF_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def image_size(path: str | Path) -> tuple[int, int]:
    """An image's (height, width) as :func:`load_image` returns it, from the header alone.

    Reads the header and the EXIF orientation tag (a JPEG's APP1 segment), not the
    pixels: orientations 5 to 8 swap height and width.

    Raises:
      DatasetError: the file is missing or not an image.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in _QUARTER_TURNS:
                width, height = height, width
    except FileNotFoundError:
        raise DatasetError(path, "image file not found") from None
    except Exception as err:  # Pillow's plugins raise many types on malformed headers
        raise DatasetError(path, f"cannot read image header ({type(err).__name__}: {err})") from None
    return height, width


def clip_to_image(boxes: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Annotated boxes as they lie in their image.

    Args:
      boxes: [M, 4] float32 xyxy, 0-based continuous pixels.
      shape: the image's (height, width).

    Returns:
      (boxes clipped to [0, width] x [0, height], [M] bool: the clipped box still has
      area, the number of boxes that extended past the image).
    """
    height, width = shape
    limit = np.array([width, height, width, height], np.float32)
    clipped = np.clip(boxes, 0.0, limit).astype(np.float32)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, keep, int((clipped != boxes).any(axis=1).sum())


def _to_rgb(img) -> np.ndarray:
    """A Pillow image of any mode as [H, W, 3] uint8 RGB."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255; rescale the full range instead.
        grey = np.asarray(img, np.float64)
        grey = np.rint(np.clip(grey, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if img.mode == "F":  # float images are taken to be in [0, 1]
        grey = np.rint(np.clip(np.nan_to_num(np.asarray(img, np.float64)), 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.array(img.convert("RGB"))  # a writable copy, unlike asarray


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB, turned upright by its EXIF orientation.

    Greyscale, palette, RGBA/LA (alpha dropped), CMYK and YCbCr images become RGB.
    16-bit greyscale becomes 8-bit as ``round(value * 255 / 65535)``, keeping the
    whole range (16-bit colour PNGs are reduced by Pillow, to the high byte). The EXIF
    orientation is applied as ``PIL.ImageOps.exif_transpose`` does, so the pixels are
    the ones a viewer, VOC and COCO annotation tools show and annotate.

    Args:
      path: any format Pillow reads (JPEG, PNG, ...).

    Returns:
      [H, W, 3] uint8.

    Raises:
      DatasetError: the file is missing, not an image, truncated or undecodable.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise DatasetError(path, "image file not found") from None
    except Exception as err:  # truncated data, unknown formats, bad headers: every Pillow failure
        raise DatasetError(path, f"cannot decode image ({type(err).__name__}: {err})") from None


def object_counts(dataset) -> np.ndarray:
    """Objects each image gives training, before any ``max_boxes`` cut.

    Uses ``dataset.train_object_counts()`` where the dataset has it (the built-in
    ones read their annotations, not their images: COCO leaves crowds out, VOC keeps
    difficult objects as detectron2 does); otherwise decodes every example.

    Returns:
      [N] int64.
    """
    counts = getattr(dataset, "train_object_counts", None)
    if counts is not None:
        return np.asarray(counts(), np.int64)
    return np.asarray([len(dataset[i]["labels"]) for i in range(len(dataset))], np.int64)


class DroppedBoxes(NamedTuple):
    """What a ``max_boxes`` cut removes from a dataset's training targets."""

    dropped: int  # boxes beyond max_boxes, over all images
    total: int  # boxes before the cut
    images: int  # images that lose at least one box
    max_boxes: int

    def __str__(self) -> str:
        return (
            f"dropped {self.dropped:,} of {self.total:,} boxes in {self.images:,} images (max-boxes {self.max_boxes})"
        )


def dropped_boxes_summary(counts, max_boxes: int) -> DroppedBoxes:
    """Summarise the boxes lost to padding targets to ``max_boxes`` per image.

    Args:
      counts: [N] objects per image, e.g. from :func:`object_counts`.
      max_boxes: objects kept per image (the largest ones, see ``collate``).

    Returns:
      DroppedBoxes(dropped, total, images, max_boxes); ``str()`` of it is one line,
      e.g. "dropped 812 of 40,117 boxes in 214 images (max-boxes 64)".
    """
    if max_boxes < 0 or math.isnan(max_boxes):
        raise ValueError(f"max_boxes must be >= 0, got {max_boxes}")
    counts = np.asarray(counts, np.int64).reshape(-1)
    excess = np.maximum(counts - int(max_boxes), 0)
    return DroppedBoxes(int(excess.sum()), int(counts.sum()), int((excess > 0).sum()), int(max_boxes))


def get_annotation(dataset, index: int) -> Annotation:
    """``dataset.annotation(index)``, or, for a dataset without it, one built from ``dataset[index]``.

    The fallback decodes the image; its ``difficult`` objects become ``ignore``.
    """
    if hasattr(dataset, "annotation"):
        return dataset.annotation(index)
    ex = dataset[index]
    h, w = ex["image"].shape[:2]
    difficult = ex.get("difficult")
    ignore = np.zeros(len(ex["labels"]), bool) if difficult is None else difficult
    return make_annotation(ex["boxes"], ex["labels"], ignore, ex.get("id", index), h, w)


def image_shapes(dataset) -> np.ndarray:
    """Every image's (height, width) after EXIF rotation, without decoding pixels where possible.

    Uses ``dataset.image_shape(i)`` (the built-in datasets: their layout, the image
    header, or the annotation file's fields), else :func:`get_annotation`'s height and
    width (which may decode the image).

    Returns:
      [N, 2] int64.
    """
    shape = getattr(dataset, "image_shape", None)

    def of(index: int) -> tuple[int, int]:
        if shape is not None:
            h, w = shape(index)
            return int(h), int(w)
        annotation = get_annotation(dataset, index)
        return annotation["height"], annotation["width"]

    return np.asarray([of(i) for i in range(len(dataset))], np.int64).reshape(-1, 2)
