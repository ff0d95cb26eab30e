"""Validation during training: held-out data scored every ``--eval-every`` steps with the
code of ``lucid-jax eval``, and its loss in the model's training mode.

A run validates at every multiple of ``eval_every`` and at its last step. Each
validation is a checkpoint too, whose metrics rank it for ``--best-metric``, so the
AP a run logs at step N is the AP ``lucid-jax eval --step N`` gives for that run.

The held-out data comes from ``--eval-data``, else from the training data's own
held-out part: the held-out shapes, or the val split of a VOC folder. A COCO
annotation file is one split, so COCO validates only with ``--eval-data``.

Compiled once per run: the prediction (one program per canvas, shared by every
validation) and the validation loss (likewise). Neither touches the train step, so
validating never recompiles it.
"""

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lucid_jax import distributed
from lucid_jax.data import Loader, model_inputs, object_counts
from lucid_jax.data.canvases import Canvases
from lucid_jax.inference import compiler_options, make_predict_fn
from lucid_jax.jobs.config import JobError, TrainConfig, flag_name
from lucid_jax.jobs.data import make_loader, open_dataset
from lucid_jax.jobs.evaluate import evaluate
from lucid_jax.train import TARGET_KEYS

# The metrics a validation record keeps (``log.jsonl``'s ``eval``), in this order.
EVAL_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "per_class_AP")
# The share of a run's steps between validations when --eval-every is not given.
DEFAULT_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Validation:
    """What a run validates on, and the programs it validates with (each made once).

    Attributes:
      dataset: the held-out examples.
      source: where they come from, for the notes (e.g. "voc:DIR, split val").
      every: steps between validations.
      best_metric: the metric that ranks the validated checkpoints.
      loader: the held-out loader: in order, padded, with every object of each image.
      predict: the compiled prediction, shared by every validation.
      loss: the compiled validation loss (:func:`make_validation_loss`).
    """

    dataset: Any
    source: str
    every: int
    best_metric: str
    loader: Loader
    predict: Callable
    loss: Callable

    def due(self, step: int, last: int) -> bool:
        """Whether the run validates after ``step`` of ``last``."""
        return step % self.every == 0 or step == last


def held_out_data(config: TrainConfig, class_names) -> tuple[Any, str] | None:
    """The run's held-out dataset and its description, or None where there is none.

    Args:
      config: the run's settings (``eval_data``, else the data's own held-out part).
      class_names: the training data's classes; the held-out data must have the same.

    Raises:
      JobError: ``--eval-data`` cannot be read, or has other classes.
    """
    spec = config.eval_data
    if spec is None:
        kind, _, rest = config.data.partition(":")
        if kind == "shapes":
            spec = "shapes"
        elif kind == "voc" and (Path(rest) / "ImageSets" / "Main" / "val.txt").is_file():
            spec = config.data
        else:
            return None
    kind, _, rest = spec.partition(":")
    split = "val"
    if kind == "voc" and not (Path(rest) / "ImageSets" / "Main" / "val.txt").is_file():
        split = "all"
    dataset = open_dataset(
        spec,
        split,
        shapes_examples=config.shapes_train_examples,
        image_size=config.image_size,
        class_names=list(class_names) if kind == "voc" else None,
    )
    if list(dataset.class_names) != list(class_names):
        raise JobError(f"--eval-data {spec}: its classes {list(dataset.class_names)} differ from the training data's")
    source = f"{spec}, split {split}" if kind == "voc" else spec
    return dataset, source


def overlap_note(dataset, config: TrainConfig, image_ids) -> str | None:
    """A note when held-out images are training images too (VOC trainval against val)."""
    held_out_ids = getattr(dataset, "ids", None)
    if image_ids is None or held_out_ids is None or config.eval_data not in (None, config.data):
        return None
    shared = len(set(held_out_ids) & set(image_ids))
    if not shared:
        return None
    return (
        f"validation: {shared} of the {len(held_out_ids)} held-out images are also training images "
        f"(split {config.split}); its metrics will flatter the model"
    )


def resolve(config: TrainConfig, has_held_out: bool, *, resumed: bool = False) -> TrainConfig:
    """``config`` with ``eval_every`` and ``best_metric`` settled: what the run stores.

    Args:
      config: the settings asked for (``eval_every`` None: the default period).
      has_held_out: whether the run has held-out data.
      resumed: the run resumes. ``--eval-every 0`` then stops validating and keeps
        the run's ``best_metric``, so the best step stays kept.

    Raises:
      JobError: ``--eval-every`` or ``--best-metric`` given with no held-out data, or
        a new run's ``--best-metric`` with ``--eval-every 0``.
    """
    every = config.eval_every
    if not has_held_out:
        if every or config.best_metric:
            what = flag_name("eval_every") if every else flag_name("best_metric")
            raise JobError(
                f"{what} needs held-out data: give --eval-data (COCO: --eval-data coco:VAL.json:IMAGE_DIR; "
                "VOC: a val split in ImageSets/Main/val.txt)"
            )
        return dataclasses.replace(config, eval_every=0)
    if every is None:
        every = max(1, round(config.steps * DEFAULT_FRACTION))
    if every == 0:
        if config.best_metric and not resumed:
            raise JobError("--best-metric needs validation; drop --eval-every 0")
        return dataclasses.replace(config, eval_every=0)
    return dataclasses.replace(config, eval_every=every, best_metric=config.best_metric or "AP")


def make_validation(model, config: TrainConfig, dataset, source: str, spec: Canvases) -> Validation:
    """The run's :class:`Validation` of ``dataset`` (``config`` resolved by :func:`resolve`)."""
    max_boxes = max(int(object_counts(dataset).max(initial=0)), 1)
    loader = make_loader(
        dataset,
        config,
        train=False,
        max_boxes=max_boxes,
        batch_size=config.batch_size // jax.process_count(),
        num_shards=jax.process_count(),
        shard_index=jax.process_index(),
        spec=spec,
    )
    predict = make_predict_fn(model, channels_last=True)
    assert config.eval_every and config.best_metric
    return Validation(
        dataset, source, config.eval_every, config.best_metric, loader, predict, make_validation_loss(model)
    )


def make_validation_loss(model) -> Callable:
    """``loss(variables, batch, key, indices) -> {name: [B]}``: each image's training loss, compiled.

    The training step's loss (``FasterRCNN.loss``: batch-statistics BatchNorm, the
    sampled anchors and RoIs) of each image alone, so an image's loss depends neither
    on the others in its batch nor on the padding of the last batch. The sampling key
    of the image with dataset index i is ``fold_in(key, i)``: every validation of a
    run samples the same anchors and RoIs for the same detector.

    Args (of the returned function):
      variables: {"params", "batch_stats"}.
      batch: the Loader's batch: images [B, H, W, 3], boxes [B, M, 4], labels and
        valid [B, M], image_sizes [B, 2].
      key: the validation's key.
      indices: [B] int32 dataset indices of the batch's images (any value for padding).
    """

    def one_image(variables, image, targets, size, key):
        dropout_key, sampling_key = jax.random.split(key)
        losses, _ = model.apply(
            variables,
            image[None],
            {k: v[None] for k, v in targets.items()},
            size[None],
            method="loss",
            channels_last=True,
            rngs={"dropout": dropout_key, "sampling": sampling_key},
            mutable=["batch_stats"],
        )
        return losses

    def batch_losses(variables, batch, key, indices):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
        targets = {k: batch[k] for k in TARGET_KEYS}
        return jax.vmap(one_image, in_axes=(None, 0, 0, 0, 0))(
            variables, batch["images"], targets, batch["image_sizes"], keys
        )

    return jax.jit(batch_losses, compiler_options=compiler_options())


def local_variables(state) -> dict:
    """The state's {"params", "batch_stats"} readable on this process alone.

    On one device they are the state's own arrays; a state replicated over a mesh is
    read from this process's copy, so that prediction runs on its local batches.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    leaves = jax.tree.leaves(variables)
    if all(isinstance(x, jax.Array) and x.is_fully_addressable and len(x.devices()) == 1 for x in leaves):
        return variables
    return jax.tree.map(lambda x: jnp.asarray(distributed.host_value(x)), variables)


def validate(validation: Validation, model, state, config: TrainConfig, spec: Canvases, key) -> dict:
    """Score the held-out data with the current state: one ``log.jsonl`` record.

    Every process calls it (the evaluation is gathered); each gets the same record,
    ``{"eval": {AP, AP50, AP75, APs, APm, APl, per_class_AP}, "val_loss": {name: mean},
    "eval_seconds"}``. The held-out images' losses are averaged over the images.
    """
    started = time.perf_counter()
    variables = local_variables(state)
    sums: dict[str, float] = {}
    count = [0]

    def add_loss(step: int, batch: dict) -> None:
        rows = validation.loader.batch_indices(step)[1]
        indices = np.array(rows + [0] * (validation.loader.batch_size - len(rows)), np.int32)
        inputs = model_inputs(batch, ("images", "image_sizes", *TARGET_KEYS))
        losses = jax.device_get(validation.loss(variables, inputs, key, indices))
        real = np.asarray(batch["image_valid"], bool)
        for name, values in losses.items():
            sums[name] = sums.get(name, 0.0) + float(np.asarray(values, np.float64)[real].sum())
        count[0] += int(real.sum())

    metrics = evaluate(
        model,
        variables,
        validation.dataset,
        config,
        progress=False,
        spec=spec,
        loader=validation.loader,
        predict=validation.predict,
        on_batch=add_loss,
    )
    names = sorted(sums)
    totals = np.asarray(distributed.gather(np.array([sums[n] for n in names] + [count[0]], np.float64))).sum(axis=0)
    val_loss = {n: float(totals[i] / max(totals[-1], 1)) for i, n in enumerate(names)}
    # Process 0 scored; every process takes its numbers, so every checkpoint ranks alike.
    values = np.array([_metric(metrics, k) if metrics else 0.0 for k in EVAL_KEYS[:-1]], np.float64)
    values = distributed.gather(values)[0]
    # JSON has no NaN: a metric without ground truth to score (e.g. APl with no large object) is null.
    record: dict = {"eval": {k: v if np.isfinite(v) else None for k, v in zip(EVAL_KEYS[:-1], values.tolist())}}
    record["eval"]["per_class_AP"] = metrics["per_class_AP"] if metrics else {}
    record["val_loss"] = val_loss
    record["eval_seconds"] = round(time.perf_counter() - started, 2)
    return record


def _metric(metrics: dict, key: str) -> float:
    """A COCO figure of ``evaluate``'s dict: AP, AP50 and AP75 at its top, the others in ``coco_stats``."""
    return float(metrics[key] if key in metrics else metrics["coco_stats"][key])


def best_value(record: dict, metric: str) -> float:
    """The value of ``--best-metric`` in a validation record."""
    value = record["val_loss"]["total_loss"] if metric == "val_loss" else record["eval"][metric]
    return float("nan") if value is None else value
