"""Fixed-shape batches and a seeded, resumable, prefetching loader.

Every batch has the same shapes, ``images [B, S, S, 3]`` and targets padded to
``max_boxes`` with a ``valid`` mask, so a jit-compiled step compiles once (the static
shape rule of docs/architecture.md; torchvision instead batches lists of varying size).
The images are channels-last, the model's internal layout: an internal format, fed
to the model with ``channels_last=True`` (``make_train_step(model,
channels_last=True)``, ``model.apply(..., method="predict", channels_last=True)``). A short
final batch is padded with empty rows flagged by ``image_valid`` rather than dropped
or shrunk, which would change the shape.

The loader is a pure function of ``(seed, step)``: step s reads epoch
``s // steps_per_epoch`` of a per-epoch permutation, and each example's random
transform (the flip) is seeded by ``(seed, epoch, index)``. So resuming at step k
gives exactly the batches a fresh run gives after k steps, and the number of
prefetch threads changes nothing but speed. Host sharding (``num_shards``,
``shard_index``; e.g. ``jax.process_count()`` and ``jax.process_index()``) cuts the
global batch of every step, ``num_shards * batch_size`` consecutive examples of the
epoch's permutation, into one contiguous slice per host. The slices are disjoint,
cover the global batch exactly once, and stacked in shard order they are the batch
one unsharded loader of the global batch size reads at that step; a resumed run
continues the same global order on every host.

With aspect-ratio ``canvases`` (``--image-size SHORT:LONG``) every image has a canvas,
a pure function of its size read without decoding (``image_shapes``), and every
global batch holds one canvas: each epoch's permutation is cut into per-canvas
batches and the batches are shuffled (``grouped_batches``, seeded by (seed, epoch)),
then each host takes its contiguous slice of the step's global batch as above. A
batch is ``images [B, Hc, Wc, 3]`` on its canvas, so a run compiles at most one step
per canvas; an epoch has ``sum over canvases of floor (or ceil, padded) of
n_canvas / global batch`` steps, the same every epoch.
"""

import collections
import functools
import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from lucid_jax.data.canvases import Canvases, grouped_batches
from lucid_jax.data.dataset import Dataset, image_shapes
from lucid_jax.data.transforms import preprocess

# The arrays the train step needs; the rest of a batch ("ids", "difficult", ...) is for evaluation.
TRAIN_KEYS = ("images", "boxes", "labels", "valid", "image_sizes")


def largest_boxes(boxes: np.ndarray, max_boxes: int) -> np.ndarray:
    """Indices of the ``max_boxes`` largest boxes by area, in their original order.

    Args:
      boxes: [M, 4] xyxy.

    Returns:
      [min(M, max_boxes)] int indices, increasing. Ties keep the earlier box.
    """
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.sort(np.argsort(-area, kind="stable")[:max_boxes])


def collate(examples: Sequence[dict], max_boxes: int, batch_size: int | None = None, *, warn: bool = True) -> dict:
    """Stack preprocessed examples into one fixed-shape batch.

    Args:
      examples: outputs of :func:`lucid_jax.data.transforms.preprocess` (image
        [H, W, 3] float32, boxes [M, 4], labels [M], difficult [M], image_size [2],
        optional scale [2], id), all with the same image shape.
      max_boxes: M of the padded targets; an example with more objects keeps its
        ``max_boxes`` largest, with a warning unless ``warn`` is False (a caller
        that reports the drops once, as ``dropped_boxes_summary`` does).
      batch_size: pad to this many rows with empty, ``image_valid=False`` examples.

    Returns:
      {"images": [B, H, W, 3] float32 (channels-last), "boxes": [B, M, 4] float32, "labels": [B, M]
      int32 (0 where padded), "valid": [B, M] bool, "difficult": [B, M] bool,
      "image_sizes": [B, 2] float32 (h, w), "scales": [B, 2] float32 (sy, sx),
      "image_valid": [B] bool, "ids": list of B ids (None for padding rows)}.
    """
    if not examples:
        raise ValueError("collate: no examples")
    b = len(examples) if batch_size is None else batch_size
    if len(examples) > b:
        raise ValueError(f"collate: {len(examples)} examples do not fit a batch of {b}")
    shape = examples[0]["image"].shape
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"collate: images must be [H, W, 3] (use transforms.preprocess), got {shape}")
    batch: dict[str, Any] = {
        "images": np.zeros((b, *shape), np.float32),
        "boxes": np.zeros((b, max_boxes, 4), np.float32),
        "labels": np.zeros((b, max_boxes), np.int32),
        "valid": np.zeros((b, max_boxes), bool),
        "difficult": np.zeros((b, max_boxes), bool),
        "image_sizes": np.tile(np.array(shape[:2], np.float32), (b, 1)),  # padding rows: the whole canvas
        "scales": np.ones((b, 2), np.float32),
        "image_valid": np.zeros(b, bool),
        "ids": [None] * b,
    }
    for i, ex in enumerate(examples):
        if ex["image"].shape != shape:
            raise ValueError(
                f"collate: example {ex.get('id')!r} has image shape {ex['image'].shape}, expected {shape}; "
                "preprocess every example onto the same canvas"
            )
        boxes = np.asarray(ex["boxes"], np.float32).reshape(-1, 4)
        keep = np.arange(len(boxes))
        if len(boxes) > max_boxes and warn:
            warnings.warn(
                f"example {ex.get('id')!r} has {len(boxes)} objects; keeping the {max_boxes} largest "
                "(raise max_boxes to keep them all)",
                RuntimeWarning,
                stacklevel=2,
            )
        if len(boxes) > max_boxes:
            keep = largest_boxes(boxes, max_boxes)
        m = len(keep)
        batch["images"][i] = ex["image"]
        batch["boxes"][i, :m] = boxes[keep]
        batch["labels"][i, :m] = np.asarray(ex["labels"])[keep]
        batch["valid"][i, :m] = True
        if "difficult" in ex:
            batch["difficult"][i, :m] = np.asarray(ex["difficult"], bool)[keep]
        batch["image_sizes"][i] = ex.get("image_size", shape[:2])
        batch["scales"][i] = ex.get("scale", (1.0, 1.0))
        batch["image_valid"][i] = True
        batch["ids"][i] = ex.get("id")
    return batch


def model_inputs(batch: dict, keys: Sequence[str] = TRAIN_KEYS) -> dict:
    """The array entries a jitted step takes (``ids`` is a Python list, not a JAX type)."""
    return {k: batch[k] for k in keys}


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """[n] dataset indices in the order epoch ``epoch`` reads them."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


# Seeds the order of an epoch's grouped batches, a stream apart from the example rngs
# (seeded by (seed, epoch, index) with index < 2**32).
_BATCH_ORDER_STREAM = 0x6261746368  # "batch"


class Loader:
    """Iterates over a dataset in fixed-shape batches, prefetching on a thread pool.

    Args:
      dataset: a :class:`lucid_jax.data.Dataset`.
      batch_size: rows per batch (per host when sharded).
      transform: ``(example, rng) -> preprocessed example``; default
        :func:`preprocess` with no resize and no padding (fine when all images share
        one size that the model accepts, as the shapes dataset's do).
      max_boxes: targets per image (see :func:`collate`).
      shuffle: a new seeded permutation every epoch.
      seed: seeds the permutations and the per-example transform rngs.
      drop_remainder: drop the examples that do not fill a last batch; otherwise the
        last batch is padded with ``image_valid=False`` rows (use for evaluation).
      num_workers: threads decoding and transforming; 0 loads in the calling thread.
      prefetch: batches submitted ahead of the one being consumed.
      num_shards, shard_index: this host's share of every epoch.
      warn_dropped: warn for each example with more than ``max_boxes`` objects (off
        when the caller reports the drops once, as ``lucid-jax train`` does).
      canvases: group every batch onto one canvas of these (see the module); the
        transform is then called as ``transform(example, rng, canvas=(Hc, Wc))``.
        None, or a square-only ``Canvases``, reads as one canvas, the transform's.

    ``for batch in loader`` is an endless stream from step 0; use :meth:`epoch` or
    ``iterate(start_step, num_steps)`` for a finite one.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        transform: Callable | None = None,
        max_boxes: int = 100,
        shuffle: bool = False,
        seed: int = 0,
        drop_remainder: bool = True,
        num_workers: int = 4,
        prefetch: int = 2,
        num_shards: int = 1,
        shard_index: int = 0,
        warn_dropped: bool = True,
        canvases: Canvases | None = None,
    ):
        if batch_size < 1 or max_boxes < 1 or num_workers < 0 or prefetch < 1:
            raise ValueError(
                f"need batch_size, max_boxes, prefetch >= 1 and num_workers >= 0, got "
                f"{batch_size}, {max_boxes}, {prefetch}, {num_workers}"
            )
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index}, {num_shards}")
        self.dataset, self.batch_size, self.max_boxes = dataset, batch_size, max_boxes
        self.warn_dropped = warn_dropped
        self.transform: Callable[..., dict] = transform or _default_transform
        self.shuffle, self.seed, self.drop_remainder = shuffle, seed, drop_remainder
        self.num_workers, self.prefetch = num_workers, prefetch
        self.num_shards, self.shard_index = num_shards, shard_index
        n = len(dataset)
        # Every shard takes the same number of steps, so hosts stay in lockstep.
        self.global_batch_size = batch_size * num_shards
        rounding = math.floor if drop_remainder else math.ceil
        self.canvases = canvases if canvases is not None and not canvases.square_only else None
        self.canvas_ids: np.ndarray | None = None  # [N] canvas of every example, when grouped
        if self.canvases is None:
            self.steps_per_epoch = rounding(n / self.global_batch_size)
        else:
            shapes = image_shapes(dataset)
            self.canvas_ids = np.array([self.canvases.canvas_index(int(h), int(w)) for h, w in shapes], np.int64)
            counts = np.bincount(self.canvas_ids, minlength=len(self.canvases.shapes))
            self.steps_per_epoch = sum(rounding(int(c) / self.global_batch_size) for c in counts)
            self._grouped_epoch = functools.lru_cache(maxsize=4)(self._grouped_batches)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"a dataset of {n} examples gives no full batch of {batch_size} on {num_shards} shard(s); "
                "use a smaller batch or drop_remainder=False"
            )

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _grouped_batches(self, epoch: int) -> list[tuple[int, list[int]]]:
        """[(canvas index, global batch of dataset indices)] of one epoch, grouped by canvas."""
        assert self.canvas_ids is not None
        order = _epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        rng = np.random.default_rng([self.seed, epoch, _BATCH_ORDER_STREAM]) if self.shuffle else None
        return grouped_batches(
            self.canvas_ids, order, self.global_batch_size, drop_remainder=self.drop_remainder, rng=rng
        )

    def batch_indices(self, step: int) -> tuple[int, list[int]]:
        """(epoch, dataset indices) of this shard at global step ``step``.

        The global batch is ``order[pos * G : (pos + 1) * G]`` (G = num_shards *
        batch_size) of the epoch's permutation, or with canvases the epoch's
        ``pos``-th grouped batch, and this shard reads its ``shard_index``-th slice
        of batch_size; fewer (or none) only in a padded last batch (of a canvas).
        """
        epoch, pos = divmod(step, self.steps_per_epoch)
        start = self.shard_index * self.batch_size
        if self.canvases is not None:
            members = self._grouped_epoch(epoch)[pos][1]
            return epoch, members[start : start + self.batch_size]
        order = _epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        start += pos * self.global_batch_size
        return epoch, [int(i) for i in order[start : start + self.batch_size]]

    def batch_canvas(self, step: int) -> tuple[int, int] | None:
        """(Hc, Wc) of every image at global step ``step``; None without canvases (the transform's)."""
        if self.canvases is None:
            return None
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self.canvases.shapes[self._grouped_epoch(epoch)[pos][0]]

    def _collate(self, examples: list[dict], epoch: int, step: int) -> dict:
        if examples:
            return collate(examples, self.max_boxes, self.batch_size, warn=self.warn_dropped)
        canvas = self.batch_canvas(step)
        if canvas is not None:  # padding rows on the step's canvas
            blank = {"image": np.zeros((*canvas, 3), np.float32), "boxes": np.zeros((0, 4)), "labels": np.zeros(0)}
            batch = collate([blank], self.max_boxes, self.batch_size)
            batch["image_valid"][0], batch["ids"][0] = False, None
            return batch
        # This shard's slice of a padded last batch is empty: padding rows on the
        # canvas of the step's first example, so that every host's batch has one shape.
        first = _epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)[
            (step % self.steps_per_epoch) * self.global_batch_size
        ]
        example = self._load(int(first), epoch)
        blank = {
            "image": np.zeros_like(example["image"]),
            "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros(0, np.int32),
        }
        batch = collate([blank], self.max_boxes, self.batch_size)
        batch["image_valid"][0], batch["ids"][0] = False, None
        return batch

    def _load(self, index: int, epoch: int, canvas: tuple[int, int] | None = None) -> dict:
        rng = np.random.default_rng([self.seed, epoch, index])
        if canvas is None:
            return self.transform(self.dataset[index], rng)
        return self.transform(self.dataset[index], rng, canvas=canvas)

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
        """Batches of global steps ``start_step, start_step + 1, ...``, across epochs.

        Args:
          start_step: first step (resume a run here; nothing before it is loaded).
          num_steps: how many batches; None for an endless stream.

        Yields:
          :func:`collate` batches.
        """
        steps = itertools.count(start_step) if num_steps is None else iter(range(start_step, start_step + num_steps))
        if self.num_workers == 0:
            for step in steps:
                epoch, indices = self.batch_indices(step)
                canvas = self.batch_canvas(step)
                yield self._collate([self._load(i, epoch, canvas) for i in indices], epoch, step)
            return
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="lucid_jax-loader")
        pending: collections.deque = collections.deque()  # bounded: at most prefetch + 1 batches in flight

        def submit() -> None:
            step = next(steps, None)
            if step is not None:
                epoch, indices = self.batch_indices(step)
                canvas = self.batch_canvas(step)
                pending.append((epoch, step, [pool.submit(self._load, i, epoch, canvas) for i in indices]))

        try:
            for _ in range(self.prefetch):
                submit()
            while pending:
                epoch, step, futures = pending.popleft()
                submit()
                yield self._collate([f.result() for f in futures], epoch, step)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def epoch(self, epoch: int = 0) -> Iterator[dict]:
        """The batches of one epoch (e.g. one evaluation pass)."""
        return self.iterate(epoch * self.steps_per_epoch, self.steps_per_epoch)

    def __iter__(self) -> Iterator[dict]:
        return self.iterate()


def _default_transform(example: Mapping, rng: np.random.Generator) -> dict:
    h, w = example["image"].shape[:2]
    return preprocess(dict(example), rng, canvas=(h, w))
