"""The demo job: train the small detector on synthetic shapes, score it on held-out
images and draw its detections."""

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from lucid_jax import viz
from lucid_jax.jobs.config import DEMO_OVERRIDES, TrainConfig, canvases
from lucid_jax.jobs.data import open_dataset
from lucid_jax.jobs.evaluate import evaluate, predictions_on
from lucid_jax.jobs.state import load_trained
from lucid_jax.jobs.training import train


def pad_targets(boxes: list, labels: list) -> dict:
    """Per-image boxes [M_i, 4] and labels [M_i] padded to {"boxes": [N, M, 4], "labels", "valid": [N, M]}."""
    m = max(1, max(len(b) for b in boxes))
    n = len(boxes)
    out = {
        "boxes": np.zeros((n, m, 4), np.float32),
        "labels": np.zeros((n, m), np.int32),
        "valid": np.zeros((n, m), bool),
    }
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        out["boxes"][i, : len(b)], out["labels"][i, : len(lab)], out["valid"][i, : len(b)] = b, lab, True
    return out


def demo(config: TrainConfig, out: str | os.PathLike, *, given=(), progress: bool = True, echo=print) -> dict:
    """Train ``config`` on shapes into ``out``, evaluate on held-out shapes, draw ``out/detections.png``.

    Returns:
      {"AP", "AP50", "AP75", "voc_AP50_all", "per_class_AP", "held_out_images",
      "train_seconds", "total_seconds", "detections_png"}.
    """
    config = dataclasses.replace(config, data="shapes")
    out = Path(out)
    start = time.perf_counter()
    echo(
        f"training {config.model} on synthetic shapes for {config.steps} steps "
        f"(batch {config.batch_size}, {canvases(config).describe()}) into {out}"
    )
    train(config, out, given=set(given) | set(DEMO_OVERRIDES) | {"data"}, progress=progress, echo=echo)
    train_s = time.perf_counter() - start
    model, variables, class_names, config = load_trained(out)
    spec = canvases(config)  # the trained run's: evaluate and draw on it
    held_out = open_dataset("shapes", "val", shapes_examples=config.shapes_train_examples, image_size=config.image_size)
    metrics = evaluate(model, variables, held_out, config, progress=progress, spec=spec)
    assert metrics is not None  # one process: it scores
    images, preds, examples = predictions_on(model, variables, held_out, config, range(8), spec=spec)
    png = out / "detections.png"
    up = 3  # drawn 3x larger than the 128-pixel inputs, so labels stay legible
    pictures = viz.denormalize(images).repeat(up, axis=1).repeat(up, axis=2)
    preds = dict(preds, boxes=preds["boxes"] * up)
    targets = pad_targets([e["boxes"] * up for e in examples], [e["labels"] for e in examples])
    viz.save_detections_grid(
        pictures, preds, png, ["background", *class_names], targets, ncols=4, score_thresh=0.5, legend=True
    )
    summary = {k: metrics[k] for k in ("AP", "AP50", "AP75", "voc_AP50_all")}
    summary.update(
        per_class_AP=metrics["per_class_AP"],
        held_out_images=len(held_out),
        train_seconds=round(train_s, 1),
        total_seconds=round(time.perf_counter() - start, 1),
        detections_png=str(png),
    )
    return summary
