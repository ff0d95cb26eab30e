"""Training jobs: train (or resume) a detector into a run directory, and load one back.

``train`` runs the jitted step over a seeded, resumable loader, logs every loss to
``OUT/log.jsonl``, checkpoints to ``OUT/checkpoints`` and resumes from there. The
step's randomness is ``fold_in(seed key, step)`` and the loader is a function of
(seed, step), so a run that is killed and resumed continues bit-identically.

With several devices the step is data-parallel over ``data_mesh()``; under
``jax.distributed`` every process runs ``train`` with the same settings, loads its
own slice of each global batch, and takes part in every checkpoint, while only
process 0 prints, shows progress and writes ``log.jsonl``.
"""

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lucid_jax import distributed
from lucid_jax.checkpoint import Checkpointer, CheckpointError
from lucid_jax.data import dropped_boxes_summary, model_inputs, object_counts
from lucid_jax.jobs.config import (
    JobError,
    TrainConfig,
    apply_init_recipe,
    canvases,
    check_config,
    check_model_name,
    config_from_dict,
    describe_canvases,
    reconcile_resume,
    warmup_steps,
)
from lucid_jax.jobs.data import describe_data, make_loader, open_dataset
from lucid_jax.models import get_model
from lucid_jax.train import (
    build_optimizer,
    create_train_state,
    data_mesh,
    host_metrics,
    make_train_step,
    param_labels,
    shard_batch,
)


def build_model(name: str, num_classes: int, *, norm_mode: str = "batch"):
    check_model_name(name)
    return get_model(name, num_classes=num_classes, norm_mode=norm_mode)


def frozen_labels(params, config: TrainConfig):
    """Which parameters train: the one labelling the optimiser and the step share."""
    return param_labels(
        params,
        trainable_backbone_layers=config.trainable_backbone_layers,
        freeze_batchnorm=config.norm_mode == "frozen",
    )


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
        warmup_steps=warmup_steps(config),
        decay_steps=tuple(config.decay_steps),
        decay_factor=config.decay_factor,
    )


def _init_variables(model, config: TrainConfig):
    height, width = canvases(config).shapes[0]  # any canvas: the parameters do not depend on it
    images = np.zeros((1, 3, height, width), np.float32)
    return jax.jit(model.init)(jax.random.key(config.seed), images)


def initial_state(model, config: TrainConfig, variables=None, *, mesh=None):
    """(train state, frozen labels) at step 0, from ``variables`` or a fresh init.

    With ``mesh`` the state is replicated over it (see ``create_train_state``).
    """
    variables = _init_variables(model, config) if variables is None else variables
    labels = frozen_labels(variables["params"], config)
    state = create_train_state(model, variables, _optimizer(variables["params"], labels, config), mesh=mesh)
    return state, labels


def _uncommitted(state):
    """The restored state as the fresh one is: arrays not committed to a device.

    Orbax hands back arrays committed to their device, and jit compiles a
    committed argument with its sharding written into the program. A resumed run
    then missed the compilation cache that a fresh run of the same config filled,
    and compiled its step again. Each array goes through the host once.
    """
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)) if isinstance(x, jax.Array) else x, state)


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


def training_mesh(config: TrainConfig):
    """The data mesh over every device of every process, or None on a single device.

    Raises:
      JobError: ``--batch-size`` (the global batch) does not split evenly over the
        processes and devices.
    """
    processes, devices = jax.process_count(), jax.device_count()
    if devices == 1:
        return None
    if config.batch_size % devices:
        raise JobError(
            f"--batch-size {config.batch_size} must be a multiple of the {devices} devices "
            f"({processes} process(es)) it is split over"
        )
    return data_mesh()


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

    ``config.batch_size`` is the global batch: under ``jax.distributed`` each of
    the P processes loads ``batch_size / P`` images of every step, and the run
    reads the same examples in the same order as one process would.

    Args:
      config: the run's settings.
      out: the run directory; a run already there is resumed.
      given: names of the fields of ``config`` the user set explicitly (the
        command line's flags). Others take the stored values on resume and
        the fine-tuning recipe with ``init``. None: every field counts as given.
      echo: prints one-line notes (the init summary, resume notes).

    Every input is checked before anything is written or compiled.
    """
    primary = distributed.is_primary()
    if not primary:
        echo, progress = (lambda *_: None), False
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
    dataset = open_dataset(
        config.data,
        config.split,
        shapes_examples=config.shapes_train_examples,
        image_size=config.image_size,
        class_names=config.classes or (stored[1] if stored is not None else None),
    )
    class_names = list(dataset.class_names)
    if stored is not None and stored[1] is not None and stored[1] != class_names:
        raise JobError(f"the data's classes {class_names} differ from the run's {stored[1]}")
    model = build_model(config.model, len(class_names) + 1, norm_mode=config.norm_mode)
    mesh = training_mesh(config)
    counts = object_counts(dataset)
    max_boxes = config.max_boxes or max(int(counts.max(initial=0)), 1)
    loader = make_loader(
        dataset,
        config,
        train=True,
        max_boxes=max_boxes,
        num_shards=jax.process_count(),
        shard_index=jax.process_index(),
    )
    data_info = describe_data(dataset, echo)
    echo(describe_canvases(canvases(config)))
    for note in small_canvases(loader):
        echo(note)
    dropped = dropped_boxes_summary(counts, max_boxes)
    if dropped.dropped:
        echo(str(dropped))

    out.mkdir(parents=True, exist_ok=True)
    variables = _init_variables(model, config)
    if init_flat is not None:
        from lucid_jax import weights

        variables, report = weights.load_pretrained(variables, init_flat, model=model)
        report.source = init_source
        if primary:
            weights.save_report(report, out / "init_report.json")
        echo(f"init: {report.summary()}")
    state, labels = initial_state(model, config, variables, mesh=mesh)
    rng = jax.random.key(config.seed)
    metadata = {"config": dataclasses.asdict(config), "class_names": class_names, "max_boxes": max_boxes, **data_info}
    with Checkpointer(out / "checkpoints", keep_last=config.keep_checkpoints) as ckpt:
        start = 0
        if stored is not None:
            state, rng, _ = ckpt.restore(state)
            if mesh is None:
                state = _uncommitted(state)
            start = int(state.step)
        step_fn = make_train_step(model, frozen=labels, mesh=mesh)
        log = open(out / "log.jsonl", "a") if primary else open(os.devnull, "w")
        if dropped.dropped:
            log.write(
                json.dumps(
                    {
                        "step": start,
                        "dropped_boxes": dropped.dropped,
                        "total_boxes": dropped.total,
                        "images_with_dropped_boxes": dropped.images,
                        "max_boxes": max_boxes,
                    }
                )
                + "\n"
            )
        bar = tqdm(
            total=config.steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True
        )
        last, started = {}, time.perf_counter()
        waiting = DataWait()
        try:
            for i, batch in enumerate(waiting.wrap(loader.iterate(start, config.steps - start)), start=start + 1):
                inputs = model_inputs(batch) if mesh is None else shard_batch(model_inputs(batch), mesh)
                state, metrics = step_fn(state, inputs, jax.random.fold_in(rng, i))
                bar.update(1)
                if i % config.log_every and i != config.steps and bool(distributed.host_value(metrics["finite"])):
                    continue
                last = host_metrics(metrics)
                last.update(
                    step=i,
                    seconds=round(time.perf_counter() - started, 2),
                    data_wait_fraction=round(waiting.fraction(), 4),
                )
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(
                    {
                        k[:-5] if k.endswith("_loss") else k: f"{last[k]:.3f}"
                        for k in ("total_loss", "rpn_cls_loss", "roi_cls_loss", "roi_reg_loss")
                    }
                )
                if not last["finite"]:
                    raise JobError(
                        f"loss or gradient became non-finite at step {i}; stopped (the last checkpoint is intact)"
                    )
                if i % config.checkpoint_every == 0 or i == config.steps:
                    ckpt.save(i, state, rng, metrics=last, metadata=metadata)
        finally:
            bar.close()
            log.close()
    if waiting.steps:
        echo(f"data: the step waited for the loader {waiting.fraction():.1%} of the wall time ({waiting})")
    return last


class DataWait:
    """How long a loop waits for its loader: the time spent getting each next batch.

    The loop blocks on every step's result (it reads ``finite``), so the rest of the
    wall time is the step's: ``fraction`` is the share of the wall time the step
    starves. The clock starts after the first step, which compiles.
    """

    def __init__(self) -> None:
        self.waited = 0.0
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

    def fraction(self) -> float:
        wall = time.perf_counter() - self.started if self.started is not None else 0.0
        return self.waited / wall if wall > 0 else 0.0

    def __str__(self) -> str:
        return f"{self.waited:.1f} s over {self.steps} steps"


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
            template = jax.eval_shape(lambda: initial_state(model, config)[0])
            state, _, _ = ckpt.restore(template)
    except CheckpointError as e:
        raise JobError(str(e)) from None
    return model, {"params": state.params, "batch_stats": state.batch_stats}, class_names, config
