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
from lucid_jax.data import (
    COCODataset, DatasetError, Loader, ShapesDataset, VOCDataset, dropped_boxes_summary, model_inputs, object_counts,
    preprocess,
)
from lucid_jax.evaluation import coco_ground_truth, coco_results, evaluate_dataset, unpad_detections
from lucid_jax.models import get_model, list_models
from lucid_jax.train import build_optimizer, create_train_state, make_predict_fn, make_train_step, param_labels


class JobError(RuntimeError):
    """A user-facing failure: bad arguments, data or checkpoints (one line)."""


def _flag(default, help: str, **kwargs):
    """A TrainConfig field that is also a ``lucid-jax train`` flag with this help."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(text).split(",") if v.strip())


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on: the one home of every default.

    Stored in each checkpoint's metadata; ``lucid-jax train`` makes one flag per
    field (``--batch-size`` for ``batch_size``) whose help shows this default.
    """

    data: str = _flag("shapes", "shapes | voc:DIR | coco:ANNOTATIONS.json:IMAGE_DIR")
    model: str = _flag("faster_rcnn_mini_fpn", "a registered model name", choices="models")
    image_size: int = _flag(128, "square canvas in pixels, a multiple of 32", type=int)
    batch_size: int = _flag(8, "images per step", type=int)
    steps: int = _flag(1000, "training steps in all (may change on resume)", type=int)
    lr: float = _flag(1e-3, "peak learning rate of the heads", type=float)
    optimizer: str = _flag("adamw", "adamw or sgd (momentum 0.9)", choices=("adamw", "sgd"))
    weight_decay: float = _flag(1e-4, "decoupled for AdamW, L2 for SGD", type=float)
    schedule: str = _flag("cosine", "learning-rate schedule after warmup", choices=("constant", "cosine", "step"))
    warmup_steps: int = _flag(50, "linear warmup steps (at most a quarter of --steps)", type=int)
    decay_steps: tuple[int, ...] = _flag((), "steps where --schedule step multiplies the LR by --decay-factor, "
                                         "e.g. 16000,22000", type=_ints)
    decay_factor: float = _flag(0.1, "the step schedule's factor", type=float)
    clip_grad_norm: float | None = _flag(None, "clip the global gradient norm to this (none: no clipping)", type=float)
    backbone_lr_mult: float = _flag(1.0, "backbone LR / heads' LR", type=float)
    trainable_backbone_layers: int = _flag(5, "backbone stages trained, from the top, as torchvision counts them: "
                                           "5 all, 3 freezes the stem and layer1, 0 the whole ResNet "
                                           "(with --init: 3)", type=int, choices=range(6))
    norm_mode: str = _flag("batch", "batch: BatchNorm trains its statistics, scale and bias; frozen: fixed "
                           "statistics, scale and bias, as torchvision's FrozenBatchNorm2d (with --init: frozen)",
                           choices=("batch", "frozen"))
    init: str | None = _flag(None, "start from pretrained weights: .lcd, .safetensors, .npz, .pth or a run "
                             "directory (Lucid detector or backbone, torchvision ResNet or FasterRCNN); "
                             "ignored when the run resumes")
    max_boxes: int | None = _flag(None, "objects per image kept in training (none: the largest object count "
                                  "in the training split, so nothing is dropped)", type=int)
    split: str = _flag("train", "VOC training split, ImageSets/Main/<split>.txt (VOC 2007: trainval); without "
                       "the file, every image not listed in val.txt or test.txt")
    classes: tuple[str, ...] | None = _flag(None, "VOC class list, e.g. cat,dog (none: classes.txt beside the "
                                            "data, or the names found in the XML)", type=_names)
    seed: int = _flag(0, "seed of the initialisation, data order and sampling", type=int)
    checkpoint_every: int = _flag(200, "steps between checkpoints", type=int)
    keep_checkpoints: int = _flag(2, "newest checkpoints kept", type=int)
    log_every: int = _flag(10, "steps between log.jsonl lines", type=int)
    num_workers: int = _flag(2, "threads loading images", type=int)
    shapes_train_examples: int = _flag(2000, "synthetic training images (--data shapes)", type=int)


# Flags that may differ when a run resumes: they change neither the model nor the data order.
RESUMABLE_CHANGES = ("steps", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints", "init")
# What ``lucid-jax demo`` changes from TrainConfig's defaults.
DEMO_OVERRIDES = {"steps": 800}


def config_from_dict(saved: dict) -> TrainConfig:
    """A TrainConfig from checkpoint metadata (JSON lists become tuples; unknown keys are an error)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise JobError(f"the checkpoint's config has settings this version does not know: {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    return TrainConfig(**values)


def check_config(config: TrainConfig) -> None:
    """Raise JobError for values no run can use (one line, naming the flag)."""
    def flag(name):
        return "--" + name.replace("_", "-")

    for name in ("image_size", "batch_size", "steps", "checkpoint_every", "keep_checkpoints", "log_every",
                 "shapes_train_examples"):
        if getattr(config, name) < 1:
            raise JobError(f"{flag(name)} must be >= 1, got {getattr(config, name)}")
    if config.image_size % 32:
        raise JobError(f"--image-size must be a positive multiple of 32, got {config.image_size}")
    if config.max_boxes is not None and config.max_boxes < 1:
        raise JobError(f"--max-boxes must be >= 1, got {config.max_boxes}")
    for name in ("weight_decay", "backbone_lr_mult", "warmup_steps", "num_workers"):
        if getattr(config, name) < 0:
            raise JobError(f"{flag(name)} must be >= 0, got {getattr(config, name)}")
    if not config.lr > 0:
        raise JobError(f"--lr must be > 0, got {config.lr}")
    if config.clip_grad_norm is not None and not config.clip_grad_norm > 0:
        raise JobError(f"--clip-grad-norm must be > 0, got {config.clip_grad_norm}")
    if not 0 < config.decay_factor <= 1:
        raise JobError(f"--decay-factor must be in (0, 1], got {config.decay_factor}")
    if config.schedule == "step" and not config.decay_steps:
        raise JobError("--schedule step needs --decay-steps, e.g. --decay-steps 16000,22000")
    if list(config.decay_steps) != sorted(config.decay_steps) or any(s < 1 for s in config.decay_steps):
        raise JobError(f"--decay-steps must be increasing positive steps, got {','.join(map(str, config.decay_steps))}")


def reconcile_resume(stored: TrainConfig, config: TrainConfig, given) -> tuple[TrainConfig, list[str]]:
    """The config a resumed run continues with, and the notes to print.

    Flags the user did not give take their stored values. A given flag with a
    different value is an error, except for ``RESUMABLE_CHANGES``.

    Args:
      stored: the config saved in the checkpoint.
      config: the config asked for now.
      given: names of the fields the user set (None: every field of ``config``).

    Raises:
      JobError: one line listing every difference, e.g. ``--batch-size 4 (the run has 8)``.
    """
    given = {f.name for f in dataclasses.fields(TrainConfig)} if given is None else set(given)
    changed = {k for k in given if getattr(config, k) != getattr(stored, k)}
    refused = sorted(changed - set(RESUMABLE_CHANGES))
    if refused:
        diffs = ", ".join(f"--{k.replace('_', '-')} {_show(getattr(config, k))} (the run has {_show(getattr(stored, k))})"
                          for k in refused)
        raise JobError(f"this run was started with other settings; resuming would change them: {diffs}. "
                       "Drop these flags to continue it, or use a new --out")
    notes = []
    resumed = dataclasses.replace(stored, **{k: getattr(config, k) for k in changed if k != "init"})
    if "init" in given and config.init is not None:
        notes.append("resuming from the run's own checkpoint; --init is ignored")
    if "steps" in changed:
        notes.append(f"--steps changed from {stored.steps} to {config.steps}: the {stored.schedule} schedule is "
                     f"recomputed for {config.steps} steps (warmup {_warmup(resumed)})")
    return resumed, notes


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _warmup(config: TrainConfig) -> int:
    return min(config.warmup_steps, config.steps // 4)


def apply_init_recipe(config: TrainConfig, kind: str, given) -> tuple[TrainConfig, dict]:
    """torchvision's fine-tuning recipe for pretrained weights, where the user set nothing else."""
    from lucid_jax.weights import fine_tuning_defaults

    given = {f.name for f in dataclasses.fields(TrainConfig)} if given is None else set(given)
    recipe = {k: v for k, v in fine_tuning_defaults(kind).items() if k not in given}
    return dataclasses.replace(config, **recipe), recipe


def open_dataset(spec: str, split: str = "train", *, shapes_examples: int = 2000, image_size: int = 128,
                 class_names=None):
    """A dataset from ``shapes``, ``voc:DIR`` or ``coco:ANNOTATIONS.json:IMAGE_DIR``.

    Args:
      spec: the ``--data`` value.
      split: shapes: "train", "val" or "test" (disjoint seeds). VOC:
        ``ImageSets/Main/<split>.txt``; without that file "train" and
        "trainval" take every image no held-out split lists, "all" takes every
        image, and any other split is an error. COCO: the annotation file is
        the split.
      class_names: VOC's class list (None: ``classes.txt`` or the names found).
    """
    kind, _, rest = spec.partition(":")
    try:
        if kind == "shapes":
            seed = {"train": 0, "val": 1, "test": 2}.get(split, 1)
            n = shapes_examples if split == "train" else max(shapes_examples // 10, 64)
            return ShapesDataset(num_examples=n, image_size=image_size, seed=seed)
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
    where = "" if source in (None, "class_names") else f" ({'found in the annotations' if source == 'discovered' else source})"
    echo(f"data: {len(dataset)} images; classes{where}: " + ", ".join(f"{k} ({v:,})" for k, v in counts.items()))
    invalid = getattr(dataset, "dropped_invalid_boxes", 0)
    if invalid:
        echo(f"data: dropped {invalid:,} annotated boxes with no area (zero width or height, or inverted)")
    return {"class_counts": counts, "dropped_invalid_boxes": int(invalid)}


def detector_names() -> list[str]:
    """The registered detectors (the registry also holds bare ResNet classifiers)."""
    return [name for name in list_models() if name.startswith("faster_rcnn")]


def build_model(name: str, num_classes: int, *, norm_mode: str = "batch"):
    if name not in detector_names():
        raise JobError(f"unknown model {name!r}; known models: {', '.join(detector_names())}")
    return get_model(name, num_classes=num_classes, norm_mode=norm_mode)


def make_loader(dataset, config: TrainConfig, *, train: bool, max_boxes: int | None = None) -> Loader:
    size = config.image_size
    transform = partial(preprocess, canvas=size, longer_side=size, flip_prob=0.5 if train else 0.0)
    try:
        return Loader(
            dataset,
            config.batch_size,
            transform=transform,
            max_boxes=max_boxes or config.max_boxes or 16,
            shuffle=train,
            seed=config.seed,
            drop_remainder=train,
            num_workers=config.num_workers,
        )
    except ValueError as e:
        if len(dataset) < config.batch_size:
            raise JobError(f"the data has {len(dataset)} image(s), fewer than --batch-size {config.batch_size}; "
                           f"use --batch-size {max(len(dataset), 1)} or less") from None
        raise JobError(str(e)) from None


def frozen_labels(params, config: TrainConfig):
    """Which parameters train: the one labelling the optimiser and the step share."""
    return param_labels(params, trainable_backbone_layers=config.trainable_backbone_layers,
                        freeze_batchnorm=config.norm_mode == "frozen")


def _optimizer(params, labels, config: TrainConfig):
    return build_optimizer(
        params,
        labels=labels,
        optimizer=config.optimizer,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        backbone_lr_mult=config.backbone_lr_mult,
        clip_grad_norm=config.clip_grad_norm,
        schedule=config.schedule,
        total_steps=config.steps,
        warmup_steps=_warmup(config),
        decay_steps=tuple(config.decay_steps),
        decay_factor=config.decay_factor,
    )


def _init_variables(model, config: TrainConfig):
    size = config.image_size
    images = np.zeros((1, 3, size, size), np.float32)
    return jax.jit(model.init)(jax.random.key(config.seed), images)


def _initial_state(model, config: TrainConfig, variables=None):
    """(train state, frozen labels) at step 0, from ``variables`` or a fresh init."""
    variables = _init_variables(model, config) if variables is None else variables
    labels = frozen_labels(variables["params"], config)
    return create_train_state(model, variables, _optimizer(variables["params"], labels, config)), labels


def _stored_run(checkpoints: Path):
    """(config, class names, latest step) of a run directory's checkpoints, or None."""
    if not checkpoints.is_dir():
        return None
    try:
        with Checkpointer(checkpoints, read_only=True) as ckpt:
            step = ckpt.latest_step()
            if step is None:
                return None
            saved = ckpt.metadata(step)
    except CheckpointError as e:
        raise JobError(str(e)) from None
    if "config" not in saved:
        raise JobError(f"{checkpoints} was not written by lucid-jax train (no config in its metadata)")
    return config_from_dict(saved["config"]), saved.get("class_names"), step


def train(config: TrainConfig, out: str | os.PathLike, *, given=None, progress: bool = True, echo=print) -> dict:
    """Train (or resume) a detector; returns the last logged metrics.

    Writes ``OUT/log.jsonl`` (one JSON object per logged step) and
    ``OUT/checkpoints/<step>``. A run whose loss or gradient turns non-finite
    stops with a JobError; the last checkpoint stays the last sound state.

    Args:
      config: the run's settings.
      out: the run directory; a run already there is resumed.
      given: names of the fields of ``config`` the user set explicitly (the
        command line's flags). Others take the stored values on resume and
        the fine-tuning recipe with ``init``. None: every field counts as given.
      echo: prints one-line notes (the init summary, resume notes).

    Every input is checked before anything is written or compiled.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise JobError(f"--out {out} is a file; give a directory")
    check_config(config)
    stored = _stored_run(out / "checkpoints")
    init_flat = None
    if stored is not None:
        config, notes = reconcile_resume(stored[0], config, given)
        for note in notes:
            echo(note)
    elif config.init is not None:
        from lucid_jax import weights

        init_flat, init_source = weights.read_source(config.init)
        config, recipe = apply_init_recipe(config, weights.detect_kind(init_flat), given)
        if recipe:
            echo("init: fine-tuning recipe " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items()))
    dataset = open_dataset(config.data, config.split, shapes_examples=config.shapes_train_examples,
                           image_size=config.image_size,
                           class_names=config.classes or (stored[1] if stored is not None else None))
    class_names = list(dataset.class_names)
    if stored is not None and stored[1] is not None and stored[1] != class_names:
        raise JobError(f"the data's classes {class_names} differ from the run's {stored[1]}")
    model = build_model(config.model, len(class_names) + 1, norm_mode=config.norm_mode)
    counts = object_counts(dataset)
    max_boxes = config.max_boxes or max(int(counts.max(initial=0)), 1)
    loader = make_loader(dataset, config, train=True, max_boxes=max_boxes)
    data_info = describe_data(dataset, echo)
    dropped = dropped_boxes_summary(counts, max_boxes)
    if dropped.dropped:
        echo(str(dropped))

    out.mkdir(parents=True, exist_ok=True)
    variables = _init_variables(model, config)
    if init_flat is not None:
        from lucid_jax import weights

        variables, report = weights.load_pretrained(variables, init_flat, model=model)
        report.source = init_source
        weights.save_report(report, out / "init_report.json")
        echo(f"init: {report.summary()}")
    state, labels = _initial_state(model, config, variables)
    rng = jax.random.key(config.seed)
    metadata = {"config": dataclasses.asdict(config), "class_names": class_names, "max_boxes": max_boxes, **data_info}
    with Checkpointer(out / "checkpoints", keep_last=config.keep_checkpoints) as ckpt:
        start = 0
        if stored is not None:
            state, rng, _ = ckpt.restore(state)
            start = int(state.step)
        step_fn = make_train_step(model, frozen=labels)
        log = open(out / "log.jsonl", "a")
        if dropped.dropped:
            log.write(json.dumps({"step": start, "dropped_boxes": dropped.dropped, "total_boxes": dropped.total,
                                  "images_with_dropped_boxes": dropped.images, "max_boxes": max_boxes}) + "\n")
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
    stored = _stored_run(directory)
    if stored is None:
        raise JobError(f"no complete checkpoint in {directory}")
    config, class_names, _ = stored
    if class_names is None:
        raise JobError(f"checkpoint {directory} was not written by lucid-jax train (no class names in its metadata)")
    if model_name is not None and model_name != config.model:
        raise JobError(f"{checkpoint} holds a {config.model}, not a {model_name}")
    model = build_model(config.model, len(class_names) + 1, norm_mode=config.norm_mode)
    try:
        with Checkpointer(directory, read_only=True) as ckpt:
            template = jax.eval_shape(lambda: _initial_state(model, config)[0])
            state, _, _ = ckpt.restore(template)
    except CheckpointError as e:
        raise JobError(str(e)) from None
    return model, {"params": state.params, "batch_stats": state.batch_stats}, class_names, config


def evaluate(model, variables, dataset, config: TrainConfig, *, progress: bool = True,
             results: str | os.PathLike | None = None, ground_truth: str | os.PathLike | None = None) -> dict:
    """COCO AP, AP50, AP75, per-class AP and VOC AP50 against every annotated object.

    Predictions are mapped back to each image's own pixels and scored against the
    dataset's annotations, not the padded training targets, so ``max_boxes``
    plays no part. COCO numbers are pycocotools' COCOeval (on the original
    annotation file for COCO data).

    Args:
      results: write the detections here in COCO results format (the file's own
        image and category ids for COCO, synthetic ones otherwise).
      ground_truth: write the matching COCO ground truth here (VOC difficult
        objects as ``iscrowd: 1``, which COCOeval ignores).

    Returns:
      ``evaluate_dataset``'s dict: AP, AP50, AP75, per_class_AP, voc_AP50_11pt,
      voc_AP50_all, num_ground_truth, ...
    """
    loader = make_loader(dataset, config, train=False, max_boxes=1)
    predict = make_predict_fn(model)
    detections = []
    for batch in tqdm(loader.epoch(0), total=len(loader), desc="eval", disable=not progress, dynamic_ncols=True):
        inputs = model_inputs(batch, ("images", "image_sizes"))
        detections += unpad_detections(jax.device_get(predict(variables, inputs["images"], inputs["image_sizes"])), batch)
    metrics = evaluate_dataset(dataset, detections)
    if results is not None:
        Path(results).write_text(json.dumps(coco_results(dataset, detections)))
    if ground_truth is not None:
        Path(ground_truth).write_text(json.dumps(coco_ground_truth(dataset)))
    return metrics


def predictions_on(model, variables, dataset, config: TrainConfig, indices: Sequence[int]):
    """(normalised images [N, 3, S, S], predictions, targets) for a few examples."""
    examples = [preprocess(dataset[i], canvas=config.image_size, longer_side=config.image_size) for i in indices]
    images = np.stack([e["image"] for e in examples])
    sizes = np.stack([e["image_size"] for e in examples])
    return images, jax.device_get(make_predict_fn(model)(variables, images, sizes)), examples
