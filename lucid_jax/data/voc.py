"""PASCAL VOC: a VOCdevkit-style folder of XML annotations and JPEG images.

Follows the layout of the VOC development kit (Everingham et al., "The PASCAL Visual
Object Classes Challenge", IJCV 2010)::

    ROOT/Annotations/<stem>.xml       one per image
    ROOT/JPEGImages/<filename>        the image named by <filename> in the XML
    ROOT/ImageSets/Main/<split>.txt   optional, one image stem per line

Box convention: VOC's ``<bndbox>`` holds 1-based, inclusive pixel indices, so a box
covering pixels 1..10 reads ``xmin=1, xmax=10``. In the project's 0-based continuous
xyxy that box spans ``[0, 10)``, hence ``(xmin - 1, ymin - 1, xmax, ymax)``.

All annotations are parsed when the dataset is built, so a broken file fails at once
with a :class:`DatasetError` that names it, rather than mid-training.
"""

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np

from lucid_jax.data.dataset import DatasetError, Example, load_image, make_example

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _text(node: ET.Element, tag: str, path: Path, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(path, f"{where} has no <{tag}>")
    return child.text.strip()


def parse_annotation(path: str | Path) -> dict:
    """Read one VOC XML file.

    Args:
      path: the ``Annotations/<stem>.xml`` file.

    Returns:
      {"filename": str, "names": list[str] (one per object), "boxes": [M, 4] float32
      0-based continuous xyxy, "difficult": [M] bool}.

    Raises:
      DatasetError: unreadable or malformed XML, a missing tag, a non-numeric or
        inverted box.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DatasetError(path, f"malformed XML ({err})") from None
    except OSError as err:
        raise DatasetError(path, f"cannot read annotation ({err.strerror or err})") from None
    if root.tag != "annotation":
        raise DatasetError(path, f"root element is <{root.tag}>, expected <annotation>")
    filename = _text(root, "filename", path, "<annotation>")
    names, boxes, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        where = f"object {k}"
        names.append(_text(obj, "name", path, where))
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DatasetError(path, f"{where} ({names[-1]}) has no <bndbox>")
        coords = [_text(bndbox, t, path, f"{where} <bndbox>") for t in ("xmin", "ymin", "xmax", "ymax")]
        try:
            x1, y1, x2, y2 = (float(c) for c in coords)
        except ValueError as err:
            raise DatasetError(path, f"{where} ({names[-1]}) has a non-numeric <bndbox> ({err})") from None
        if x2 < x1 or y2 < y1:
            raise DatasetError(path, f"{where} ({names[-1]}) has an inverted box xmin={x1} ymin={y1} xmax={x2} ymax={y2}")
        boxes.append((x1 - 1.0, y1 - 1.0, x2, y2))  # 1-based inclusive -> 0-based continuous
        flag = obj.find("difficult")
        difficult.append(flag is not None and (flag.text or "0").strip() not in ("0", ""))
    return {
        "filename": filename,
        "names": names,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "difficult": np.asarray(difficult, bool),
    }


class VOCDataset:
    """A VOCdevkit folder as a :class:`lucid_jax.data.Dataset`.

    Args:
      root: the folder holding ``Annotations/`` and ``JPEGImages/`` (e.g.
        ``VOCdevkit/VOC2007``).
      split: name of ``ImageSets/Main/<split>.txt`` to restrict to; None for every
        XML file in ``Annotations/``.
      class_names: foreground names (label k is ``class_names[k - 1]``); None to
        collect them, sorted, from every XML file in ``Annotations/`` (all of them,
        so that the train and val splits agree on the labels).

    Raises:
      DatasetError: a missing folder, split file or image, malformed XML, or an
        object whose class is not in ``class_names``.
    """

    def __init__(self, root: str | Path, split: str | None = None, class_names: Sequence[str] | None = None):
        self.root = Path(root)
        ann_dir, img_dir = self.root / "Annotations", self.root / "JPEGImages"
        for folder in (self.root, ann_dir, img_dir):
            if not folder.is_dir():
                raise DatasetError(folder, "folder not found (expected a VOCdevkit folder with Annotations/ and JPEGImages/)")
        self.split = split
        all_stems = sorted(p.stem for p in ann_dir.glob("*.xml"))
        if split is None:
            stems = all_stems
        else:
            split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
            if not split_file.is_file():
                raise DatasetError(split_file, f"split file for split {split!r} not found")
            # Class-specific split files carry a second column (1 / -1 / 0); the stem comes first.
            stems = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not stems:
            raise DatasetError(split_file if split else ann_dir, "no images listed")

        parsed = {}
        for stem in stems:
            xml = ann_dir / f"{stem}.xml"
            if not xml.is_file():
                raise DatasetError(xml, "annotation file not found" + (f" (listed in split {split!r})" if split else ""))
            parsed[stem] = parse_annotation(xml)
        if class_names is None:
            names = set()
            for stem in all_stems:
                ann = parsed[stem] if stem in parsed else parse_annotation(ann_dir / f"{stem}.xml")
                names.update(ann["names"])
            class_names = sorted(names)
        self.class_names = tuple(class_names)
        index = {name: k + 1 for k, name in enumerate(self.class_names)}

        images_by_stem: dict[str, list[str]] = {}
        for name in sorted(os.listdir(img_dir)):
            base, ext = os.path.splitext(name)
            if ext.lower() in _IMAGE_EXTENSIONS:
                images_by_stem.setdefault(base, []).append(name)
        self._records = []
        for stem in stems:
            ann, xml = parsed[stem], ann_dir / f"{stem}.xml"
            unknown = sorted(set(ann["names"]) - set(index))
            if unknown:
                raise DatasetError(xml, f"class {unknown[0]!r} is not in class_names {list(self.class_names)}")
            self._records.append(
                {
                    "id": stem,
                    "image": self._resolve_image(img_dir, ann["filename"], stem, images_by_stem, xml),
                    "boxes": ann["boxes"],
                    "labels": np.asarray([index[n] for n in ann["names"]], np.int32),
                    "difficult": ann["difficult"],
                }
            )

    @staticmethod
    def _resolve_image(img_dir: Path, filename: str, stem: str, images_by_stem: dict, xml: Path) -> Path:
        """JPEGImages/<filename>, else any image with the same stem as <filename> or the XML."""
        if (img_dir / filename).is_file():
            return img_dir / filename
        for candidate in (Path(filename).stem, stem):
            if candidate in images_by_stem:
                return img_dir / images_by_stem[candidate][0]
        raise DatasetError(xml, f"image {filename!r} not found in {img_dir} (nor any image with stem {Path(filename).stem!r})")

    def __len__(self) -> int:
        return len(self._records)

    @property
    def ids(self) -> list[str]:
        """Image stems, in dataset order."""
        return [r["id"] for r in self._records]

    def __getitem__(self, index: int) -> Example:
        """Example ``index``; ``id`` is the annotation's file stem."""
        r = self._records[index]
        return make_example(load_image(r["image"]), r["boxes"].copy(), r["labels"].copy(), r["difficult"].copy(), id=r["id"])
