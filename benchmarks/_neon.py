"""Real aerial photographs for the training benchmarks: the NEON tree-crown crops of
the DeepForest sample data (Weinstein et al., 2019), with their VOC XML boxes.

They ship inside the ``deepforest`` wheel. ``fetch_photos`` downloads it once with
``pip download deepforest==2.1.0 --no-deps`` (no install, no dependencies) and
unpacks the four photographs; the benchmarks call it for their ``--images`` folder.

The split the benchmarks share:

- training: ``YELL_BIG`` above ``HELD_OUT_ROWS`` from its bottom, and ``YELL_SMALL``
  whole (Yellowstone, two crops; 574 and 279 trees);
- in distribution: ``YELL_BIG``'s bottom ``HELD_OUT_ROWS`` rows, cut into
  non-overlapping square pieces (about 190 trees);
- cross-site: ``OSBS_029`` (Ordway-Swisher, Florida) and ``SOAP_061`` (Soaproot
  Saddle, California), whole 400x400 photographs of sites never trained on (98 trees).
"""

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np

WHEEL = "deepforest==2.1.0"
YELL_BIG = "2019_YELL_2_528000_4978000_image_crop2"  # 2299 x 2472 (w x h)
YELL_SMALL = "2019_YELL_2_541000_4977000_image_crop"  # 1249 x 1035
CROSS_SITE = ("OSBS_029", "SOAP_061")  # 400 x 400 each
PHOTOS = (YELL_BIG, YELL_SMALL, *CROSS_SITE)
HELD_OUT_ROWS = 832  # YELL_BIG's bottom rows kept out of training: two rows of 416-pixel pieces
MIN_INSIDE = 0.5  # a box cut by a crop edge is kept when at least this share of its area is inside


def fetch_photos(dest: str | Path) -> Path:
    """``dest`` holding NAME.png and NAME.xml for every name of ``PHOTOS``, downloading
    the DeepForest wheel with pip first when some are missing."""
    dest = Path(dest)
    missing = [n for n in PHOTOS if not ((dest / f"{n}.png").exists() and (dest / f"{n}.xml").exists())]
    if not missing:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as wheels:
        print(f"downloading the {WHEEL} wheel for its sample photographs ...", flush=True)
        pip = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q", "-d", wheels]
        subprocess.run(pip, check=True)
        (wheel,) = Path(wheels).glob("deepforest-*.whl")
        with zipfile.ZipFile(wheel) as z:
            for name in missing:
                for ext in ("png", "xml"):
                    (dest / f"{name}.{ext}").write_bytes(z.read(f"deepforest/data/{name}.{ext}"))
    return dest


def read_voc_boxes(xml_path: str | Path) -> tuple[np.ndarray, list[str]]:
    """[M, 4] float32 xyxy boxes in continuous pixels (VOC's corners are 1-based and
    inclusive), and their names."""
    root = ET.parse(xml_path).getroot()
    boxes, names = [], []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        x1, y1, x2, y2 = (float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((x1 - 1, y1 - 1, x2, y2))
        names.append(obj.findtext("name").strip())
    return np.array(boxes, np.float32).reshape(-1, 4), names


def read_photo(folder: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(image [H, W, 3] uint8, boxes [M, 4] float32 xyxy) of NAME.png and NAME.xml."""
    from PIL import Image

    folder = Path(folder)
    image = np.asarray(Image.open(folder / f"{name}.png").convert("RGB"))
    return image, read_voc_boxes(folder / f"{name}.xml")[0]


def crop(image: np.ndarray, boxes: np.ndarray, y0: int, x0: int, h: int, w: int):
    """The window [y0:y0+h, x0:x0+w], the boxes with at least ``MIN_INSIDE`` of their
    area inside it (moved to its corner and clipped to it), and which boxes those are.

    Returns:
      (window [h, w, 3], boxes [K, 4], keep [M] bool).
    """
    moved = boxes - np.array([x0, y0, x0, y0], np.float32)
    clipped = np.clip(moved, 0, np.array([w, h, w, h], np.float32))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = inside >= MIN_INSIDE * area
    return image[y0 : y0 + h, x0 : x0 + w], clipped[keep], keep


def split(folder: str | Path, piece: int = 416, held_out_rows: int = HELD_OUT_ROWS) -> dict:
    """The benchmarks' split of the photographs in ``folder``.

    Returns:
      {"train": regions to crop training windows from, "in_distribution": pieces of
      ``piece`` x ``piece``, "cross_site": whole photographs}, each a list of
      (image [H, W, 3] uint8, boxes [M, 4] float32, labels [M] int32, all 1: "tree").
    """

    def labelled(image, boxes):
        return image, boxes, np.ones(len(boxes), np.int32)

    big, big_boxes = read_photo(folder, YELL_BIG)
    top = big.shape[0] - held_out_rows
    train = [labelled(*crop(big, big_boxes, 0, 0, top, big.shape[1])[:2]), labelled(*read_photo(folder, YELL_SMALL))]
    pieces = [
        labelled(*crop(big, big_boxes, y0, x0, piece, piece)[:2])
        for y0 in range(top, big.shape[0] - piece + 1, piece)
        for x0 in range(0, big.shape[1] - piece + 1, piece)
    ]
    cross_site = [labelled(*read_photo(folder, n)) for n in CROSS_SITE]
    return {"train": train, "in_distribution": pieces, "cross_site": cross_site}
