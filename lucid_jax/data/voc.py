"""PASCAL VOC: a VOCdevkit-style folder of XML annotations and JPEG images.

Follows the layout of the VOC development kit (Everingham et al., "The PASCAL Visual
Object Classes Challenge", IJCV 2010)::

    ROOT/Annotations/<stem>.xml       one per image
    ROOT/JPEGImages/<filename>        the image named by <filename> in the XML
    ROOT/ImageSets/Main/<split>.txt   optional, one image stem per line
    ROOT/classes.txt                  optional, one class name per line

Box convention: VOC's ``<bndbox>`` holds 1-based, inclusive pixel indices, so a box
covering pixels 1..10 reads ``xmin=1, xmax=10``. In the project's 0-based continuous
xyxy that box spans ``[0, 10)``, hence ``(xmin - 1, ymin - 1, xmax, ymax)``. A box
with no area in that convention (``xmax < xmin`` or ``ymax < ymin`` by a pixel or
more) is dropped and counted, not fatal: annotation tools do write such boxes.

Boxes are taken as they lie in the image: a box that extends past the image is
clipped to it once, here, with the image's size read from its header (no pixels
decoded), so training and evaluation see the same box; one left with no area is
dropped. Both are counted (``clipped_boxes``, ``dropped_invalid_boxes``). An XML
``<size>`` that disagrees with the image header is recorded in ``size_mismatches``;
the header wins.

XML is parsed with ``defusedxml``, so entity expansion ("billion laughs") and
external entities are refused at once with a :class:`DatasetError`. All annotations
are parsed when the dataset is built, so a broken file fails at once with a
:class:`DatasetError` that names it, rather than mid-training.
"""

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path, PurePath

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

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

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Splits that may be derived when their file is missing: the images no held-out split lists.
_HELD_OUT = {"train": ("val", "test"), "trainval": ("test",)}


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
      {"filename": str, "names": list[str] (one per object kept), "boxes": [M, 4]
      float32 0-based continuous xyxy, "difficult": [M] bool, "dropped_invalid": int,
      the objects left out for a box with no area}.

    Raises:
      DatasetError: unreadable, malformed or unsafe XML (entity declarations), a
        missing tag, a non-numeric or non-finite coordinate.
    """
    path = Path(path)
    try:
        root = SafeET.parse(path).getroot()
    except DefusedXmlException as err:
        raise DatasetError(path, f"unsafe XML refused ({type(err).__name__}: {err})") from None
    except (ET.ParseError, ValueError, LookupError) as err:  # LookupError: an unknown declared encoding
        raise DatasetError(path, f"malformed XML ({err})") from None
    except OSError as err:
        raise DatasetError(path, f"cannot read annotation ({err.strerror or err})") from None
    if root.tag != "annotation":
        raise DatasetError(path, f"root element is <{root.tag}>, expected <annotation>")
    filename = _text(root, "filename", path, "<annotation>")
    size = root.find("size")
    try:
        stated = None if size is None else tuple(int(_text(size, t, path, "<size>")) for t in ("height", "width"))
    except (ValueError, DatasetError):
        stated = None  # <size> is optional and informative only: the image header is the truth
    names, boxes, difficult, dropped = [], [], [], 0
    for k, obj in enumerate(root.findall("object")):
        where = f"object {k}"
        name = _text(obj, "name", path, where)
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DatasetError(path, f"{where} ({name}) has no <bndbox>")
        coords = [_text(bndbox, t, path, f"{where} <bndbox>") for t in ("xmin", "ymin", "xmax", "ymax")]
        try:
            x1, y1, x2, y2 = (float(c) for c in coords)
        except ValueError as err:
            raise DatasetError(path, f"{where} ({name}) has a non-numeric <bndbox> ({err})") from None
        with np.errstate(over="ignore"):  # overflow becomes inf, refused below
            box = np.array([x1 - 1.0, y1 - 1.0, x2, y2], np.float32)  # 1-based inclusive -> 0-based continuous
        if not np.isfinite(box).all():  # inf, nan, or beyond float32
            raise DatasetError(path, f"{where} ({name}) has a non-finite <bndbox> {coords}")
        if not (box[2] > box[0] and box[3] > box[1]):
            dropped += 1
            continue
        names.append(name)
        boxes.append(box)
        flag = obj.find("difficult")
        difficult.append(flag is not None and (flag.text or "0").strip() not in ("0", ""))
    return {
        "filename": filename,
        "names": names,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "difficult": np.asarray(difficult, bool),
        "dropped_invalid": dropped,
        "size": stated,
    }


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(path, f"cannot read ({err})") from None


def _split_stems(root: Path, split: str | None, all_stems: list[str]) -> tuple[list[str], str]:
    """(stems, where they came from) for ``split``; see :class:`VOCDataset`."""
    if split is None:
        return all_stems, "every annotation"
    split_dir = root / "ImageSets" / "Main"
    split_file = split_dir / f"{split}.txt"
    if split_file.is_file():
        # Class-specific split files carry a second column (1 / -1 / 0); the stem comes first.
        return [line.split()[0] for line in _read_lines(split_file)], str(split_file)
    if split == "all":
        return all_stems, "every annotation"
    if split in _HELD_OUT:
        files = [split_dir / f"{s}.txt" for s in _HELD_OUT[split] if (split_dir / f"{s}.txt").is_file()]
        held_out = {line.split()[0] for f in files for line in _read_lines(f)}
        where = ", ".join(f.name for f in files)
        return [
            s for s in all_stems if s not in held_out
        ], f"every annotation not in {where}" if files else "every annotation"
    raise DatasetError(split_file, f"split file for split {split!r} not found; pass --split all to score every image")


def _class_list(root: Path, class_names: Sequence[str] | None) -> tuple[tuple[str, ...] | None, str]:
    """(names or None to discover them, their source)."""
    if class_names is not None:
        names, source = tuple(str(n) for n in class_names), "class_names"
    elif (root / "classes.txt").is_file():
        names, source = tuple(_read_lines(root / "classes.txt")), str(root / "classes.txt")
    else:
        return None, "discovered"
    if len(set(names)) != len(names) or not names:
        raise DatasetError(source, f"class list must be non-empty and without repeats, got {list(names)}")
    return names, source


def _inside(folder: Path, name: str) -> Path | None:
    """``folder / name`` when ``name`` is a relative path that stays inside ``folder``."""
    rel = PurePath(name)
    if rel.is_absolute() or rel.anchor or ".." in rel.parts or "\x00" in name:
        return None
    return folder / rel


class VOCDataset:
    """A VOCdevkit folder as a :class:`lucid_jax.data.Dataset`.

    Args:
      root: the folder holding ``Annotations/`` and ``JPEGImages/`` (e.g.
        ``VOCdevkit/VOC2007``).
      split: ``ImageSets/Main/<split>.txt`` lists the images. When that file is
        missing, ``"train"`` takes every image not listed in ``val.txt`` or
        ``test.txt``, ``"trainval"`` every image not in ``test.txt``, and ``"all"``
        every image; any other split is an error. None (the default) is every image.
      class_names: foreground names (label k is ``class_names[k - 1]``); None to read
        ``ROOT/classes.txt`` (one name per line), else to collect them, sorted, from
        every XML file in ``Annotations/`` (all of them, so that the train and val
        splits agree on the labels).

    Attributes:
      class_names: the foreground names.
      class_source: "class_names", the classes.txt path, or "discovered".
      class_counts: {name: objects of that class in this split, difficult included}.
      split_source: where the image list came from (a split file or a rule).
      dropped_invalid_boxes: objects left out for a box with no area, as annotated or
        once clipped to the image (see the module).
      clipped_boxes: boxes that extended past their image, clipped to it.
      size_mismatches: (annotation file, its <size> (h, w), the image's (h, w)) where they differ.

    Raises:
      DatasetError: a missing folder, split file or image, malformed or unsafe XML, or
        an object whose class is not in the class list (naming the file and class).
    """

    def __init__(self, root: str | Path, split: str | None = None, class_names: Sequence[str] | None = None):
        self.root = Path(root)
        ann_dir, img_dir = self.root / "Annotations", self.root / "JPEGImages"
        for folder in (self.root, ann_dir, img_dir):
            if not folder.is_dir():
                raise DatasetError(
                    folder, "folder not found (expected a VOCdevkit folder with Annotations/ and JPEGImages/)"
                )
        self.split = split
        all_stems = sorted(p.stem for p in ann_dir.glob("*.xml"))
        stems, self.split_source = _split_stems(self.root, split, all_stems)
        if not stems:
            raise DatasetError(self.root, f"no images in split {split!r} ({self.split_source})")

        parsed = {}
        for stem in stems:
            xml = ann_dir / f"{stem}.xml"
            if not xml.is_file():
                raise DatasetError(
                    xml, "annotation file not found" + (f" (listed in split {split!r})" if split else "")
                )
            parsed[stem] = parse_annotation(xml)
        names, self.class_source = _class_list(self.root, class_names)
        if names is None:
            found = set()
            for stem in all_stems:
                ann = parsed[stem] if stem in parsed else parse_annotation(ann_dir / f"{stem}.xml")
                found.update(ann["names"])
            names = tuple(sorted(found))
        self.class_names = names
        index = {name: k + 1 for k, name in enumerate(self.class_names)}

        images_by_stem: dict[str, list[str]] = {}
        for name in sorted(os.listdir(img_dir)):
            base, ext = os.path.splitext(name)
            if ext.lower() in _IMAGE_EXTENSIONS:
                images_by_stem.setdefault(base, []).append(name)
        self._records = []
        self.clipped_boxes, self.size_mismatches = 0, []
        self.dropped_invalid_boxes = sum(parsed[s]["dropped_invalid"] for s in stems)
        for stem in stems:
            ann, xml = parsed[stem], ann_dir / f"{stem}.xml"
            unknown = [n for n in ann["names"] if n not in index]
            if unknown:
                raise DatasetError(xml, f"class {unknown[0]!r} is not in {self.class_source} {list(self.class_names)}")
            image = self._resolve_image(img_dir, ann["filename"], stem, images_by_stem, xml)
            shape = image_size(image)
            if ann["size"] is not None and tuple(ann["size"]) != shape:
                self.size_mismatches.append((xml, ann["size"], shape))
            labels = np.asarray([index[n] for n in ann["names"]], np.int32)
            boxes, keep, clipped = clip_to_image(ann["boxes"], shape)
            self.clipped_boxes += clipped
            self.dropped_invalid_boxes += int((~keep).sum())
            self._records.append(
                {
                    "id": stem,
                    "image": image,
                    "boxes": boxes[keep],
                    "labels": labels[keep],
                    "difficult": ann["difficult"][keep],
                    "size": shape,
                }
            )
        labels = np.concatenate([r["labels"] for r in self._records])
        self.class_counts = {n: int((labels == k + 1).sum()) for k, n in enumerate(self.class_names)}

    @staticmethod
    def _resolve_image(img_dir: Path, filename: str, stem: str, images_by_stem: dict, xml: Path) -> Path:
        """JPEGImages/<filename>, else any image with the same stem as <filename> or the XML.

        A <filename> that leaves JPEGImages/ (absolute, or through "..") is never opened.
        """
        direct = _inside(img_dir, filename)
        if direct is not None and direct.is_file():
            return direct
        for candidate in (PurePath(filename).stem, stem):
            if candidate in images_by_stem:
                return img_dir / images_by_stem[candidate][0]
        raise DatasetError(
            xml, f"image {filename!r} not found in {img_dir} (nor any image with stem {PurePath(filename).stem!r})"
        )

    def __len__(self) -> int:
        return len(self._records)

    @property
    def ids(self) -> list[str]:
        """Image stems, in dataset order."""
        return [r["id"] for r in self._records]

    def __getitem__(self, index: int) -> Example:
        """Example ``index``; ``id`` is the annotation's file stem."""
        r = self._records[index]
        return make_example(
            load_image(r["image"]), r["boxes"].copy(), r["labels"].copy(), r["difficult"].copy(), id=r["id"]
        )

    def annotation(self, index: int) -> Annotation:
        """Every object of image ``index``, difficult ones flagged ``ignore``; no pixels decoded.

        ``height``, ``width`` come from the image header and its EXIF orientation.
        """
        r = self._records[index]
        h, w = self.image_shape(index)
        return make_annotation(r["boxes"].copy(), r["labels"].copy(), r["difficult"].copy(), r["id"], h, w)

    def image_shape(self, index: int) -> tuple[int, int]:
        """(height, width) of image ``index`` after EXIF rotation, from its header (read once, cached)."""
        r = self._records[index]
        if "size" not in r:
            r["size"] = image_size(r["image"])
        return r["size"]

    def train_object_counts(self) -> np.ndarray:
        """[N] objects per image that training sees (difficult ones included, as in detectron2)."""
        return np.asarray([len(r["labels"]) for r in self._records], np.int64)
