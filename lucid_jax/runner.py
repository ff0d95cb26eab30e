"""End-to-end jobs behind the command line: train, evaluate, predict.

``train`` runs the jitted step over a seeded, resumable loader, logs every loss to
``OUT/log.jsonl``, checkpoints to ``OUT/checkpoints`` and resumes from there. The
step's randomness is ``fold_in(seed key, step)`` and the loader is a function of
(seed, step), so a run that is killed and resumed continues bit-identically.
"""

import dataclasses
import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from lucid_jax.checkpoint import Checkpointer, CheckpointError
from lucid_jax.data import COCODataset, DatasetError, Loader, ShapesDataset, VOCDataset, model_inputs, preprocess
from lucid_jax.evaluation import DetectionEvaluator
from lucid_jax.models import get_model, list_models
from lucid_jax.train import build_optimizer, create_train_state, make_train_step, param_labels


class JobError(RuntimeError):
    """A user-facing failure: bad arguments, data or checkpoints (one line)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; stored in the checkpoint metadata."""

    data: str = "shapes"
    model: str = "faster_rcnn_mini_fpn"
    image_size: int = 128
    batch_size: int = 8
    steps: int = 1000
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    backbone_lr_mult: float = 1.0
    max_boxes: int = 16
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int = 2
    shapes_train_examples: int = 2000


def open_dataset(spec: str, split: str = "train", *, shapes_examples: int = 2000, image_size: int = 128):
    """A dataset from ``shapes``, ``voc:DIR`` or ``coco:ANNOTATIONS.json:IMAGE_DIR``.

    For shapes, "train" and "val" are disjoint seeds; for VOC the split file
    ``ImageSets/Main/{split}.txt`` is used when it exists.
    """
    kind, _, rest = spec.partition(":")
    try:
        if kind == "shapes":
            seed = {"train": 0, "val": 1, "test": 2}.get(split, 1)
            n = shapes_examples if split == "train" else max(shapes_examples // 10, 64)
            return ShapesDataset(num_examples=n, image_size=image_size, seed=seed)
        if kind == "voc" and rest:
            split_file = Path(rest) / "ImageSets" / "Main" / f"{split}.txt"
            return VOCDataset(rest, split=split if split_file.exists() else None)
        if kind == "coco" and ":" in rest:
            annotations, images = rest.rsplit(":", 1)
            return COCODataset(annotations, images)
    except (DatasetError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise JobError(str(e)) from None
    raise JobError(f"--data must be shapes, voc:DIR or coco:ANNOTATIONS.json:IMAGE_DIR, got {spec!r}")


def build_model(name: str, num_classes: int):
    if name not in list_models():
        raise JobError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return get_model(name, num_classes=num_classes)


def make_loader(dataset, config: TrainConfig, *, train: bool) -> Loader:
    size = config.image_size
    transform = partial(preprocess, canvas=size, longer_side=size, flip_prob=0.5 if train else 0.0)
    return Loader(
        dataset,
        config.batch_size,
        transform=transform,
        max_boxes=config.max_boxes,
        shuffle=train,
        seed=config.seed,
        drop_remainder=train,
        num_workers=config.num_workers,
    )


def _initial_state(model, config: TrainConfig):
    size = config.image_size
    images = np.zeros((config.batch_size, 3, size, size), np.float32)
    variables = jax.jit(model.init)(jax.random.key(config.seed), images)
    optimizer = build_optimizer(
        variables["params"],
        optimizer=config.optimizer,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        backbone_lr_mult=config.backbone_lr_mult,
        schedule="cosine",
        total_steps=config.steps,
        warmup_steps=min(config.warmup_steps, config.steps // 4),
    )
    return create_train_state(model, variables, optimizer)


def train(config: TrainConfig, out: str | os.PathLike, *, progress: bool = True) -> dict:
    """Train (or resume) a detector; returns the last logged metrics.

    Writes ``OUT/log.jsonl`` (one JSON object per logged step) and
    ``OUT/checkpoints/<step>``. A run whose loss or gradient turns non-finite
    stops with a JobError; the last checkpoint stays the last sound state.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = open_dataset(config.data, "train", shapes_examples=config.shapes_train_examples, image_size=config.image_size)
    class_names = list(dataset.class_names)
    model = build_model(config.model, len(class_names) + 1)
    loader = make_loader(dataset, config, train=True)
    state = _initial_state(model, config)
    rng = jax.random.key(config.seed)
    metadata = {"config": dataclasses.asdict(config), "class_names": class_names}
    with Checkpointer(out / "checkpoints", keep_last=config.keep_checkpoints) as ckpt:
        start = 0
        if ckpt.latest_step() is not None:
            state, rng, saved = ckpt.restore(state)
            if saved.get("config", {}).get("model") != config.model:
                raise JobError(f"{out} holds a checkpoint of {saved.get('config', {}).get('model')!r}, not {config.model!r}")
            start = int(state.step)
        step_fn = make_train_step(model, frozen=param_labels(state.params))
        log = open(out / "log.jsonl", "a")
        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
        last, started = {}, time.perf_counter()
        try:
            for i, batch in enumerate(loader.iterate(start, config.steps - start), start=start + 1):
                state, metrics = step_fn(state, model_inputs(batch), jax.random.fold_in(rng, i))
                bar.update(1)
                if i % config.log_every and i != config.steps and bool(metrics["finite"]):
                    continue
                last = {k: float(v) for k, v in metrics.items()}
                last.update(step=i, seconds=round(time.perf_counter() - started, 2))
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix({k[:-5] if k.endswith("_loss") else k: f"{last[k]:.3f}" for k in
                                 ("total_loss", "rpn_cls_loss", "roi_cls_loss", "roi_reg_loss")})
                if not last["finite"]:
                    raise JobError(f"loss or gradient became non-finite at step {i}; stopped (the last checkpoint is intact)")
                if i % config.checkpoint_every == 0 or i == config.steps:
                    ckpt.save(i, state, rng, metrics=last, metadata=metadata)
        finally:
            bar.close()
            log.close()
    return last


def load_trained(checkpoint: str | os.PathLike, model_name: str | None = None):
    """(model, variables, class_names, config) from a training run's directory.

    Args:
      checkpoint: the ``--out`` of ``train`` (or its ``checkpoints`` folder).
      model_name: if given, the architecture the user expects; a checkpoint of
        another architecture is refused.
    """
    root = Path(checkpoint)
    directory = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not directory.is_dir():
        raise JobError(f"checkpoint directory not found: {checkpoint}")
    try:
        with Checkpointer(directory, read_only=True) as ckpt:
            if ckpt.latest_step() is None:
                raise JobError(f"no complete checkpoint in {directory}")
            saved = ckpt.metadata()
            if "config" not in saved or "class_names" not in saved:
                raise JobError(f"checkpoint {directory} was not written by lucid-jax train (no config in its metadata)")
            config = TrainConfig(**saved["config"])
            class_names = saved["class_names"]
            model = build_model(model_name or config.model, len(class_names) + 1)
            template = jax.eval_shape(lambda: _initial_state(model, dataclasses.replace(config, batch_size=1)))
            state, _, _ = ckpt.restore(template)
    except CheckpointError as e:
        raise JobError(str(e)) from None
    return model, {"params": state.params, "batch_stats": state.batch_stats}, class_names, config


def evaluate(model, variables, dataset, config: TrainConfig, *, progress: bool = True) -> dict:
    """AP, AP50, AP75, per-class AP and VOC AP50 of a model on a dataset."""
    loader = make_loader(dataset, config, train=False)
    predict = jax.jit(lambda v, x, s: model.apply(v, x, s, method="predict"))
    evaluator = DetectionEvaluator(list(dataset.class_names))
    for batch in tqdm(loader.epoch(0), total=len(loader), desc="eval", disable=not progress, dynamic_ncols=True):
        inputs = model_inputs(batch, ("images", "image_sizes"))
        evaluator.add(jax.device_get(predict(variables, inputs["images"], inputs["image_sizes"])), batch)
    return evaluator.compute()


def predictions_on(model, variables, dataset, config: TrainConfig, indices: Sequence[int]):
    """(normalised images [N, 3, S, S], predictions, targets) for a few examples."""
    examples = [preprocess(dataset[i], canvas=config.image_size, longer_side=config.image_size) for i in indices]
    images = np.stack([e["image"] for e in examples])
    sizes = np.stack([e["image_size"] for e in examples])
    predict = jax.jit(lambda v, x, s: model.apply(v, x, s, method="predict"))
    return images, jax.device_get(predict(variables, images, sizes)), examples
