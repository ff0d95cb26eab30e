"""Throughput of ``lucid-jax predict`` over a folder of JPEGs: images per second at
batch 8 against batch 1, with the mini and the ResNet-101 FPN detectors.

    python benchmarks/bench_predict_files.py [--models mini,resnet101] [--canvas 512]
                                             [--images 24] [--batch-sizes 1,8] [--rounds 2]

The whole job is timed (decoding on threads, fitting onto the canvas, the compiled
predict, mapping boxes back and writing detections.json), after one untimed pass
that compiles. The weights are random with the classifier scaled up so that
detections pass the 0.05 threshold of a COCO results run and post-processing has
real work. Rounds alternate the batch sizes; the median of each is reported.
"""

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

MODELS = {"mini": "faster_rcnn_mini_fpn", "resnet101": "faster_rcnn_resnet_101_fpn"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mini,resnet101", help="comma-separated: mini, resnet101")
    p.add_argument("--canvas", type=int, default=512, help="square canvas side, a multiple of 32")
    p.add_argument("--images", type=int, default=24, help="JPEGs in the folder (640x480 and 480x640)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=2, help="timed passes per batch size")
    return p.parse_args(argv)


def write_images(folder: Path, count: int) -> list[Path]:
    from PIL import Image

    from lucid_jax.data import ShapesDataset

    paths = []
    for i in range(count):
        size = (480, 640) if i % 2 else (640, 480)
        image = ShapesDataset(num_examples=1, seed=i, image_size=size, max_objects=6)[0]["image"]
        paths.append(folder / f"{i:06d}.jpg")
        Image.fromarray(image).save(paths[-1], quality=90)
    return paths


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from lucid_jax.jobs.predict import detect_files
    from lucid_jax.models import get_model

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images)
        print(
            f"# predict over {len(paths)} JPEGs (640x480, 480x640) on a {args.canvas}^2 canvas, "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
        )
        print("| model | batch | images/s | vs batch 1 |")
        print("|---|---|---|---|")
        for key in args.models.split(","):
            model = get_model(MODELS[key], num_classes=4)
            variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 3, 64, 64), jnp.float32))
            params = dict(variables["params"])
            params["cls_score"] = {**params["cls_score"], "kernel": params["cls_score"]["kernel"] * 30.0}
            variables = {**variables, "params": params}
            run = functools.partial(
                detect_files,
                model,
                variables,
                ["a", "b", "c"],
                (args.canvas, args.canvas),
                paths,
                results=Path(tmp) / "coco.json",
                progress=False,
            )

            for b in batch_sizes:  # compile each batch size once, untimed
                run(Path(tmp) / f"warm{b}", batch_size=b)
            times = {b: [] for b in batch_sizes}
            detections = {}
            for r in range(args.rounds):
                for b in batch_sizes:
                    start = time.perf_counter()
                    report = run(Path(tmp) / f"out{b}_{r}", batch_size=b)
                    times[b].append(time.perf_counter() - start)
                    detections[b] = sum(len(x["detections"]) for x in report.results)
            base = len(paths) / statistics.median(times[batch_sizes[0]])
            for b in batch_sizes:
                rate = len(paths) / statistics.median(times[b])
                print(f"| {key} | {b} | {rate:.2f} | {rate / base:.2f}x |  ({detections[b]} detections)")


if __name__ == "__main__":
    main()
