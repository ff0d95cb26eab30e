"""The data a job reads: datasets from ``--data`` specs, what training will see, loaders,
and how long a loop waits for them."""

import time
from collections.abc import Callable
from functools import partial

import numpy as np

from lucid_jax.data import (
    COCODataset,
    DatasetError,
    Loader,
    ShapesDataset,
    VOCDataset,
    preprocess,
    preprocess_on_canvas,
)
from lucid_jax.data.canvases import Canvases
from lucid_jax.data.jitter import jitter_preprocess
from lucid_jax.data.photometric import with_color_jitter
from lucid_jax.jobs.config import JobError, TrainConfig, augment_parts, canvases


def shapes_image_size(image_size: int | str) -> int:
    """The side of the synthetic shapes' square images for ``--image-size``: S, or SHORT of SHORT:LONG."""
    return int(str(image_size).replace(" ", "").split(":")[0])


def open_dataset(
    spec: str, split: str = "train", *, shapes_examples: int = 2000, image_size: int | str = 128, class_names=None
):
    """A dataset from ``shapes``, ``voc:DIR`` or ``coco:ANNOTATIONS.json:IMAGE_DIR``.

    Args:
      spec: the ``--data`` value.
      split: shapes: "train", "val" or "test" (disjoint seeds). VOC:
        ``ImageSets/Main/<split>.txt``; without that file "train" and
        "trainval" take every image no held-out split lists, "all" takes every
        image, and any other split is an error. COCO: the annotation file is
        the split.
      image_size: shapes: the ``--image-size`` (S x S images, or SHORT x SHORT for SHORT:LONG).
      class_names: VOC's class list (None: ``classes.txt`` or the names found).
    """
    kind, _, rest = spec.partition(":")
    try:
        if kind == "shapes":
            seed = {"train": 0, "val": 1, "test": 2}.get(split, 1)
            n = shapes_examples if split == "train" else max(shapes_examples // 10, 64)
            return ShapesDataset(num_examples=n, image_size=shapes_image_size(image_size), seed=seed)
        if kind == "voc" and rest:
            return VOCDataset(rest, split=split, class_names=class_names)
        if kind == "coco" and ":" in rest:
            annotations, images = rest.rsplit(":", 1)
            return COCODataset(annotations, images)
    except (DatasetError, OSError, ValueError) as e:
        raise JobError(str(e)) from None
    raise JobError(f"--data must be shapes, voc:DIR or coco:ANNOTATIONS.json:IMAGE_DIR, got {spec!r}")


def describe_data(dataset, echo=print) -> dict:
    """Print what a training run will see: classes with their object counts, boxes dropped at load."""
    counts = getattr(dataset, "class_counts", None)
    if counts is None:
        labels = np.concatenate([dataset.annotation(i)["labels"] for i in range(len(dataset))] or [np.zeros(0, int)])
        counts = {name: int((labels == k).sum()) for k, name in enumerate(dataset.class_names, start=1)}
    source = getattr(dataset, "class_source", None)
    where = (
        ""
        if source in (None, "class_names")
        else f" ({'found in the annotations' if source == 'discovered' else source})"
    )
    echo(f"data: {len(dataset)} images; classes{where}: " + ", ".join(f"{k} ({v:,})" for k, v in counts.items()))
    invalid, clipped = getattr(dataset, "dropped_invalid_boxes", 0), getattr(dataset, "clipped_boxes", 0)
    if clipped:
        echo(f"data: clipped {clipped:,} boxes to their image, dropped {invalid:,} with no area")
    elif invalid:
        echo(f"data: dropped {invalid:,} annotated boxes with no area (zero width or height, or inverted)")
    mismatches = getattr(dataset, "size_mismatches", [])
    if mismatches:
        xml, (h, w), (ih, iw) = mismatches[0]
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        echo(f"warning: {xml} gives <size> {w}x{h}, but its image is {iw}x{ih}; the image's size is used{more}")
    return {"class_counts": counts, "dropped_invalid_boxes": int(invalid), "clipped_boxes": int(clipped)}


def make_loader(
    dataset,
    config: TrainConfig,
    *,
    train: bool,
    max_boxes: int | None = None,
    batch_size=None,
    num_shards: int = 1,
    shard_index: int = 0,
    spec: Canvases | None = None,
) -> Loader:
    """The loader of a training run (shuffled, flipped) or of an evaluation (in order, padded).

    ``--image-size S`` puts every image on one S x S canvas (longer side S);
    ``SHORT:LONG`` groups the batches by canvas (see :class:`lucid_jax.data.Loader`):
    images [B, 3, Hc, Wc] with (Hc, Wc) one of ``canvases(config).shapes``.

    Args:
      dataset: the examples.
      config: the run's settings (augmentation, seed, workers, ``--image-size``).
      train: a training loader (shuffled, augmented, no partial batch) or an evaluation one.
      max_boxes: objects per example (default: ``config.max_boxes``, else 16).
      batch_size: images per shard and step (default: ``config.batch_size``, the
        global batch, split evenly over ``num_shards``).
      num_shards, shard_index: the processes reading the data, and this one.
      spec: the run's canvases, computed once per run (default: ``canvases(config)``).

    Returns:
      The loader.

    Raises:
      JobError: the loader refuses the data, e.g. fewer images than one batch.
    """
    batch_size = batch_size or config.batch_size // num_shards
    spec = canvases(config) if spec is None else spec
    multiple = spec.multiple  # the model's size divisibility
    parts = augment_parts(config.augment) if train else frozenset()
    flip = 0.5 if "flip" in parts else 0.0
    transform: Callable
    if spec.square_only:  # one canvas, given here; the loader passes none
        size = spec.long
        if "jitter" in parts:
            transform = partial(jitter_preprocess, canvas=size)
        else:
            transform = partial(preprocess, canvas=size, longer_side=size, flip_prob=flip, size_divisibility=multiple)
    elif "jitter" in parts:  # the loader passes each batch's canvas
        transform = jitter_preprocess
    else:
        transform = partial(preprocess_on_canvas, canvases=spec, flip_prob=flip, size_divisibility=multiple)
    if "color" in parts:
        transform = partial(with_color_jitter, transform)
    try:
        return Loader(
            dataset,
            batch_size,
            transform=transform,
            max_boxes=max_boxes or config.max_boxes or 16,
            shuffle=train,
            seed=config.seed,
            drop_remainder=train,
            num_workers=config.num_workers,
            num_shards=num_shards,
            shard_index=shard_index,
            warn_dropped=False,  # train reports the drops in one line; eval scores against the annotations
            canvases=spec,
        )
    except ValueError as e:
        if len(dataset) < config.batch_size:
            raise JobError(
                f"the data has {len(dataset)} image(s), fewer than --batch-size {config.batch_size}; "
                f"use --batch-size {max(len(dataset), 1)} or less"
            ) from None
        raise JobError(str(e)) from None


def small_canvases(loader) -> list[str]:
    """A note for each canvas with fewer images than one global batch: training drops them every epoch."""
    if loader.canvases is None:
        return []
    counts = np.bincount(loader.canvas_ids, minlength=len(loader.canvases.shapes))
    return [
        f"canvas {h}x{w}: {n} image(s), fewer than the global batch of {loader.global_batch_size}; "
        "training never sees them (use a smaller --batch-size)"
        for (h, w), n in zip(loader.canvases.shapes, counts.tolist(), strict=True)
        if 0 < n < loader.global_batch_size
    ]


class DataWait:
    """How long a loop waits for its loader: the time spent getting each next batch.

    The loop blocks on every step's result (it reads ``finite``), so the rest of the
    wall time is the step's: ``fraction`` is the share of the wall time the step
    starves. The clock starts after the first step, which compiles.
    """

    def __init__(self) -> None:
        self.waited = 0.0
        self.excluded = 0.0
        self.steps = 0
        self.started: float | None = None

    def wrap(self, batches):
        iterator = iter(batches)
        batch = next(iterator, None)
        while batch is not None:
            yield batch
            before = time.perf_counter()
            self.started = before if self.started is None else self.started
            batch = next(iterator, None)
            if batch is not None:
                self.waited += time.perf_counter() - before
                self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` of other work (a validation) out of the wall time."""
        self.excluded += seconds

    def fraction(self) -> float:
        wall = time.perf_counter() - self.started - self.excluded if self.started is not None else 0.0
        return self.waited / wall if wall > 0 else 0.0

    def __str__(self) -> str:
        return f"{self.waited:.1f} s over {self.steps} steps"
