"""Augmentations compared on real photographs: the same run with --augment flip and with jitter.

    python benchmarks/bench_augment.py --images DIR [--held-out NAME,...] [--steps 400] [--image-size 384:576]

``DIR`` holds large annotated photographs as VOC pairs, ``NAME.xml`` beside
``NAME.png`` (or .jpg), e.g. aerial tiles of tree crowns. Each photograph is cut
into tiles of mixed orientation (landscape, portrait and square, as a real
collection has), keeping a box when at least half of it lies inside its tile, and
the tiles are written as a VOC folder: the photographs named in ``--held-out``
become the ``val`` split, whole, the others the ``train`` split. Then the same
``lucid-jax train`` runs once per augmentation (same seed, steps and canvases),
and ``lucid-jax eval`` scores each on the held-out photographs. Printed: the
tiles and boxes per split, and COCO AP and AP50 and the VOC all-point AP50 per augmentation.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

# (height, width) of the training tiles, taken in turn: landscape, portrait, square.
TILE_SHAPES = ((320, 480), (480, 320), (400, 400))
MIN_INSIDE = 0.5  # a box cut by a tile edge is kept when at least this share of it is inside


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder of NAME.xml + NAME.png/.jpg photographs")
    p.add_argument("--held-out", default="", help="comma-separated NAMEs for the val split (default: the last one)")
    p.add_argument("--augments", default="flip,jitter")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", default="384:576")
    p.add_argument("--model", default="faster_rcnn_mini_fpn")
    p.add_argument("--work", default=None, help="where the VOC folder and the runs go (default: a temporary folder)")
    return p.parse_args(argv)


def read_voc_boxes(xml_path: Path) -> tuple[np.ndarray, list[str]]:
    """[M, 4] xyxy boxes (VOC's 1-based inclusive corners to continuous pixels) and names."""
    root = ET.parse(xml_path).getroot()
    boxes, names = [], []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        x1, y1, x2, y2 = (float(b.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((x1 - 1, y1 - 1, x2, y2))
        names.append(obj.findtext("name").strip())
    return np.array(boxes, np.float32).reshape(-1, 4), names


def tile_origins(length: int, tile: int) -> list[int]:
    """Tile starts covering [0, length) with tiles of ``tile`` (the last one flush with the end)."""
    if length <= tile:
        return [0]
    count = int(np.ceil(length / tile))
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def cut_tiles(image: np.ndarray, boxes: np.ndarray, names: list[str], shape: tuple[int, int]):
    """Tiles of ``shape`` covering the image, each with the boxes mostly inside it, moved and clipped."""
    h, w = image.shape[:2]
    th, tw = min(shape[0], h), min(shape[1], w)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for y0 in tile_origins(h, th):
        for x0 in tile_origins(w, tw):
            moved = boxes - np.array([x0, y0, x0, y0], np.float32)
            clipped = np.clip(moved, 0, np.array([tw, th, tw, th], np.float32))
            inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
            keep = inside >= MIN_INSIDE * area
            yield image[y0 : y0 + th, x0 : x0 + tw], clipped[keep], [n for n, k in zip(names, keep) if k]


def write_xml(path: Path, filename: str, height: int, width: int, boxes: np.ndarray, names: list[str]) -> None:
    objects = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1:.0f}</xmin><ymin>{y1 + 1:.0f}</ymin>"
        f"<xmax>{x2:.0f}</xmax><ymax>{y2:.0f}</ymax></bndbox></object>"
        for (x1, y1, x2, y2), n in zip(np.round(boxes), names)
    )
    path.write_text(
        f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{objects}</annotation>"
    )


def build_voc(source: Path, root: Path, held_out: list[str]) -> dict:
    """Write the tiled VOC folder; returns {"train": (images, boxes), "val": (images, boxes)}."""
    from PIL import Image

    from lucid_jax.data import load_image

    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    photos = sorted(p for p in source.glob("*.xml"))
    images = {p.stem: next(source.glob(f"{p.stem}.[pj][np]g"), None) for p in photos}
    photos = [p for p in photos if images[p.stem] is not None]
    if not photos:
        raise SystemExit(f"no NAME.xml beside NAME.png or NAME.jpg in {source}")
    held = held_out or [photos[-1].stem]
    splits: dict[str, list[str]] = {"train": [], "val": []}
    counts = {"train": [0, 0], "val": [0, 0]}
    turn = 0
    for xml in photos:
        image = load_image(images[xml.stem])
        boxes, names = read_voc_boxes(xml)
        split = "val" if xml.stem in held else "train"
        if split == "val":
            pieces = [(image, boxes, names)]
        else:
            pieces = []
            for _ in range(len(TILE_SHAPES)):  # each photograph gives tiles of every orientation
                pieces += list(cut_tiles(image, boxes, names, TILE_SHAPES[turn % len(TILE_SHAPES)]))
                turn += 1
        for k, (tile, tile_boxes, tile_names) in enumerate(pieces):
            stem = f"{xml.stem}_{k:03d}"
            Image.fromarray(tile).save(root / "JPEGImages" / f"{stem}.png")
            write_xml(root / "Annotations" / f"{stem}.xml", f"{stem}.png", *tile.shape[:2], tile_boxes, tile_names)
            splits[split].append(stem)
            counts[split][0] += 1
            counts[split][1] += len(tile_boxes)
    for split, stems in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return {k: tuple(v) for k, v in counts.items()}


def cli(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "lucid_jax.cli", *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"lucid-jax {' '.join(map(str, args[:1]))} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_augment_"))
    voc = work / "voc"
    held_out = [n for n in args.held_out.split(",") if n]
    counts = build_voc(Path(args.images), voc, held_out)
    print(f"# bench_augment: {args.model}, --image-size {args.image_size}, batch {args.batch_size}, {args.steps} steps")
    for split, (n, boxes) in counts.items():
        print(f"{split}: {n} image(s), {boxes} boxes")
    rows = []
    for augment in args.augments.split(","):
        run = work / f"run_{augment}"
        print(f"training with --augment {augment} ...", flush=True)
        cli(
            "train", "--data", f"voc:{voc}", "--model", args.model, "--image-size", args.image_size,
            "--batch-size", args.batch_size, "--steps", args.steps, "--augment", augment,
            "--out", run, "--no-progress",
        )  # fmt: skip
        scored = cli("eval", "--data", f"voc:{voc}", "--split", "val", "--checkpoint", run, "--no-progress")
        metrics = json.loads(scored)
        rows.append((augment, metrics))
    print(f"\n## Held-out photographs ({counts['val'][0]} image(s), {counts['val'][1]} boxes)")
    keys = ("AP", "AP50", "voc_AP50_all")
    print("augment  " + "  ".join(f"{k:>9}" for k in keys))
    for augment, m in rows:
        print(f"{augment:<8} " + "  ".join(f"{m.get(k, float('nan')):9.3f}" for k in keys))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
