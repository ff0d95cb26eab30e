"""A real VOC folder on disk, written from the synthetic shapes: PNG images and XML
annotations, a train/val split, landscape and portrait images, crowded images with
more than 16 objects, difficult objects and a ``classes.txt``."""

from pathlib import Path

import numpy as np
from PIL import Image

from lucid_jax.data import ShapesDataset

CLASSES = ("rectangle", "ellipse", "triangle")


def _xml(filename: str, height: int, width: int, boxes, labels, difficult) -> str:
    objects = "".join(
        f"<object><name>{CLASSES[label - 1]}</name><difficult>{int(d)}</difficult><bndbox>"
        f"<xmin>{x1 + 1:.0f}</xmin><ymin>{y1 + 1:.0f}</ymin><xmax>{x2:.0f}</xmax><ymax>{y2:.0f}</ymax>"
        "</bndbox></object>"
        for (x1, y1, x2, y2), label, d in zip(np.round(boxes), labels, difficult)
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{objects}</annotation>"
    )


def write_voc(
    root: Path,
    *,
    train: int = 240,
    val: int = 48,
    crowded_every: int = 12,
    difficult_every: int = 9,
    landscape: tuple[int, int] = (128, 160),
) -> dict:
    """Write the folder; returns {"train": stems, "val": stems, "val_objects": non-difficult count}.

    Images alternate landscape (height, width) ``landscape`` (128x160) and its
    portrait transpose (160x128); every ``crowded_every``-th one is a 160x160 image
    with 17 to 24 small objects. In val, every ``difficult_every``-th object is
    marked difficult.
    """
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    kinds = {
        "landscape": ShapesDataset(num_examples=train + val, image_size=landscape, seed=11),
        "portrait": ShapesDataset(num_examples=train + val, image_size=landscape[::-1], seed=12),
        "crowded": ShapesDataset(
            num_examples=train + val,
            image_size=(160, 160),
            seed=13,
            min_objects=17,
            max_objects=24,
            min_object_size=12,
            max_object_size=24,
            max_overlap=0.05,
        ),
    }
    stems = {"train": [], "val": []}
    val_objects, object_index = 0, 0
    for i in range(train + val):
        split = "train" if i < train else "val"
        kind = "crowded" if i % crowded_every == crowded_every - 1 else ("landscape" if i % 2 else "portrait")
        ex = kinds[kind][i]
        stem = f"{split}_{i:04d}_{kind}"
        Image.fromarray(ex["image"]).save(root / "JPEGImages" / f"{stem}.png")
        difficult = np.zeros(len(ex["labels"]), bool)
        if split == "val":
            for j in range(len(difficult)):
                difficult[j] = object_index % difficult_every == difficult_every - 1
                object_index += 1
            val_objects += int((~difficult).sum())
        h, w = ex["image"].shape[:2]
        (root / "Annotations" / f"{stem}.xml").write_text(
            _xml(f"{stem}.png", h, w, ex["boxes"], ex["labels"], difficult)
        )
        stems[split].append(stem)
    for split, names in stems.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return {**stems, "val_objects": val_objects}
