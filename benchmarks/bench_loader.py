"""The training loader's throughput against what the training step consumes.

    python benchmarks/bench_loader.py [--data voc:DIR] [--image-size 800:1333] [--workers 2] [--batches 20]

Reads ``--batches`` training batches through ``lucid_jax.jobs.make_loader`` (the
loader ``lucid-jax train`` uses: real PNG or JPEG decoding, resize onto the
canvases, augmentation, normalisation, collation) with each ``--augments`` and
reports images per second. Without ``--data``, it writes a VOC folder of
``--images`` JPEGs and PNGs of COCO-like sizes (640 x 480, 480 x 640, 640 x 427,
612 x 612) with a few boxes each. ``--step-seconds`` (a measured training step, e.g.
from ``bench_train.py`` or ``lucid-jax train``'s log) turns the rate into the step's
demand and the share of wall time the step would wait for data with that many
loader threads; ``lucid-jax train`` measures the real share as
``data_wait_fraction`` in ``log.jsonl``.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

SIZES = ((480, 640), (640, 480), (427, 640), (612, 612))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="voc:DIR or coco:ANNOTATIONS.json:IMAGE_DIR (default: written here)")
    p.add_argument("--images", type=int, default=48, help="images written when --data is not given")
    p.add_argument("--image-size", default="800:1333")
    p.add_argument("--augments", default="flip,jitter")
    p.add_argument("--workers", type=int, default=2, help="loader threads (lucid-jax train --num-workers)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--step-seconds", type=float, default=None, help="a training step's seconds, for the demand")
    return p.parse_args(argv)


def write_photos(root: Path, count: int) -> None:
    """A VOC folder of smooth random photographs (half JPEG, half PNG) with 3 boxes each."""
    from PIL import Image

    for sub in ("Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)  # smooth, photo-like content
        name = f"{i:04d}.{'jpg' if i % 2 else 'png'}"
        image.save(root / "JPEGImages" / name, quality=90) if i % 2 else image.save(root / "JPEGImages" / name)
        boxes = "".join(
            f"<object><name>thing</name><difficult>0</difficult><bndbox><xmin>{x}</xmin><ymin>{y}</ymin>"
            f"<xmax>{x + 80}</xmax><ymax>{y + 60}</ymax></bndbox></object>"
            for x, y in rng.integers(1, (w - 90, h - 70), (3, 2))
        )
        (root / "Annotations" / f"{i:04d}.xml").write_text(
            f"<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{boxes}</annotation>"
        )


def main(argv=None):
    args = parse_args(argv)
    from lucid_jax import jobs

    data = args.data
    if data is None:
        root = Path(tempfile.mkdtemp(prefix="bench_loader_"))
        write_photos(root, args.images)
        data = f"voc:{root}"
    dataset = jobs.open_dataset(data, "all" if data.startswith("voc:") else "train")
    print(f"# bench_loader: {len(dataset)} images from {data}, --image-size {args.image_size}, {args.workers} threads")
    print(C.environment_line())
    rows = []
    for augment in args.augments.split(","):
        config = jobs.TrainConfig(
            data=data, image_size=args.image_size, batch_size=args.batch_size, augment=augment,
            num_workers=args.workers,
        )  # fmt: skip
        loader = jobs.make_loader(dataset, config, train=True)
        batches = loader.iterate(0, args.batches + 1)
        next(batches)  # the pool's start
        start = time.perf_counter()
        count = sum(int(b["image_valid"].sum()) for b in batches)
        rate = count / (time.perf_counter() - start)
        row = [augment, f"{rate:.1f}"]
        if args.step_seconds:
            demand = args.batch_size / args.step_seconds
            row += [f"{demand:.2f}", f"{max(0.0, 1 - rate / demand):.0%}"]
        rows.append(row)
    headers = ["augment", "loader img/s"]
    if args.step_seconds:
        headers += [f"step img/s ({args.step_seconds} s/step)", "step waits"]
    C.print_table(rows, headers)
    return rows


if __name__ == "__main__":
    main()
