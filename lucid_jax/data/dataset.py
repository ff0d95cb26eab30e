"""The dataset protocol shared by the shapes, VOC and COCO datasets, and its error type.

A dataset is anything indexable that returns one example as NumPy arrays, in the box
convention of the whole project (pixel xyxy, continuous coordinates, no "+1", as in
torchvision and detectron2). Label 0 is the background; foreground labels are
1..K, and ``class_names[k - 1]`` names label k, so a detector for the dataset has
``len(class_names) + 1`` classes.
"""

from pathlib import Path
from typing import Any, Protocol, Sequence, TypedDict, runtime_checkable

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


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB.

    Args:
      path: any format Pillow reads (JPEG, PNG, ...); greyscale, palette and RGBA
        images are converted to RGB.

    Returns:
      [H, W, 3] uint8.

    Raises:
      DatasetError: the file is missing or cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # a writable copy, unlike asarray
    except FileNotFoundError:
        raise DatasetError(path, "image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(path, f"cannot decode image ({err})") from err
