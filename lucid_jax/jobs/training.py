"""Training jobs: train (or resume) a detector into a run directory, and load one back.

``train`` is :func:`prepare_run` (the settings, data, model and state of a run, each
computed once) then :func:`run_loop`: the jitted step over a seeded, resumable loader,
every loss logged to ``OUT/log.jsonl``, checkpoints in ``OUT/checkpoints``, where a
run resumes from. The step's randomness is ``fold_in(seed key, step)`` and the loader
is a function of (seed, step), so a run that is killed and resumed continues
bit-identically.

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
from typing import Any

import jax
from tqdm.auto import tqdm

from lucid_jax import distributed
from lucid_jax.checkpoint import Checkpointer
from lucid_jax.data import DroppedBoxes, Loader, dropped_boxes_summary, model_inputs, object_counts
from lucid_jax.data.canvases import Canvases
from lucid_jax.jobs.config import (
    JobError,
    TrainConfig,
    apply_init_recipe,
    canvases,
    check_config,
    describe_canvases,
    flag_name,
    output_folder,
    reconcile_resume,
)
from lucid_jax.jobs.data import DataWait, describe_data, make_loader, open_dataset, small_canvases
from lucid_jax.jobs.state import build_model, init_variables, initial_state, stored_run, uncommitted
from lucid_jax.manifest import CheckpointError
from lucid_jax.train import data_mesh, host_metrics, make_train_step, shard_batch


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


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run ready for its first step: what its loop reads, each computed once.

    Attributes:
      config: the settings it trains with (a resumed run's, or with the ``--init`` recipe).
      out: the run directory.
      spec: the canvases of ``config.image_size``.
      model: the detector.
      mesh: the data mesh over every device, or None on a single device.
      loader: this process's share of every global batch.
      state: the train state to continue from: restored, or at step 0.
      labels: which parameters train (see :func:`frozen_labels`).
      rng: the run's key; step i draws ``fold_in(rng, i)``.
      start: the steps already done (0 for a fresh run).
      metadata: what every checkpoint stores beside the state.
      dropped: the boxes over ``max_boxes`` that training drops.
    """

    config: TrainConfig
    out: Path
    spec: Canvases
    model: Any
    mesh: Any
    loader: Loader
    state: Any
    labels: Any
    rng: Any
    start: int
    metadata: dict
    dropped: DroppedBoxes


def train(config: TrainConfig, out: str | os.PathLike, *, given=None, progress: bool = True, echo=print) -> dict:
    """Train (or resume) a detector: :func:`prepare_run`, then :func:`run_loop`.

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
      progress: show a progress bar (process 0 only).
      echo: prints one-line notes (the init summary, resume notes); process 0 only.

    Returns:
      The last logged metrics.

    Every input is checked before anything is written or compiled.
    """
    if not distributed.is_primary():
        echo, progress = (lambda *_: None), False
    return run_loop(prepare_run(config, out, given=given, echo=echo), progress=progress, echo=echo)


def prepare_run(config: TrainConfig, out: str | os.PathLike, *, given=None, echo=print) -> Run:
    """Everything a run needs before its first step; every input is checked before
    anything is written or compiled.

    Args:
      config, out, given, echo: as for :func:`train`.

    Returns:
      The :class:`Run`, its state restored from ``OUT/checkpoints`` where a run is there.

    Raises:
      JobError: bad settings, a changed setting on resume, data that cannot be read or
        differs from the run's, or a batch that does not split over the devices.
    """
    # --- Settings: the flags, then a resumed run's or the --init recipe's -----------------------
    out = output_folder(out)
    check_config(config)
    stored = stored_run(out / "checkpoints")
    config, init = _settings(config, stored, given, echo)
    spec = canvases(config)  # once per run: the loader, the initialisation and the log share it
    mesh = training_mesh(config)

    # --- Data: this process's share of every global batch ---------------------------------------
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
    counts = object_counts(dataset)
    max_boxes = config.max_boxes or max(int(counts.max(initial=0)), 1)
    shards = {"num_shards": jax.process_count(), "shard_index": jax.process_index()}
    loader = make_loader(dataset, config, train=True, max_boxes=max_boxes, spec=spec, **shards)
    data_info = describe_data(dataset, echo)
    dropped = dropped_boxes_summary(counts, max_boxes)
    for note in (describe_canvases(spec), *small_canvases(loader), *([str(dropped)] if dropped.dropped else [])):
        echo(note)

    # --- State: fresh, from the --init weights, or the last checkpoint's ------------------------
    model = build_model(config.model, len(class_names) + 1, norm_mode=config.norm_mode)
    out.mkdir(parents=True, exist_ok=True)
    variables = init_variables(model, config, spec)
    if init is not None:
        variables = _pretrained(variables, init, model, out, echo)
    state, labels = initial_state(model, config, variables, mesh=mesh)
    rng, start = jax.random.key(config.seed), 0
    if stored is not None:
        with Checkpointer(out / "checkpoints", read_only=True) as ckpt:
            state, rng, _ = ckpt.restore(state)
        state = uncommitted(state) if mesh is None else state
        start = int(state.step)
    metadata = {"config": dataclasses.asdict(config), "class_names": class_names, "max_boxes": max_boxes, **data_info}
    return Run(config, out, spec, model, mesh, loader, state, labels, rng, start, metadata, dropped)


def _settings(config: TrainConfig, stored, given, echo) -> tuple[TrainConfig, tuple | None]:
    """The settings a run trains with, and the ``--init`` weights to load.

    Args:
      config: the settings asked for.
      stored: :func:`stored_run` of the run directory (None: a new run).
      given, echo: as for :func:`train`.

    Returns:
      (config, init): a resumed run's stored settings with the flags that may change
      (``init`` None), or ``config`` under the ``--init`` fine-tuning recipe where the
      flags set nothing else, with ``init`` = (flat weights, source).
    """
    if stored is not None:
        config, notes = reconcile_resume(stored[0], config, given)
        for note in notes:
            echo(note)
        return config, None
    if config.init is None:
        return config, None
    from lucid_jax import weights

    init = weights.read_source(config.init)
    config, recipe = apply_init_recipe(config, weights.detect_kind(init[0]), given)
    if recipe:
        echo("init: fine-tuning recipe " + ", ".join(f"{flag_name(k)} {v}" for k, v in recipe.items()))
    return config, init


def _pretrained(variables, init: tuple, model, out: Path, echo):
    """``variables`` with the ``--init`` weights loaded; the report goes to ``OUT/init_report.json``.

    Args:
      variables: the fresh variables.
      init: (flat weights, source) of :func:`_settings`.
      model: the detector.
      out: the run directory.
      echo: prints the report's summary.

    Returns:
      The variables.
    """
    from lucid_jax import weights

    flat, source = init
    variables, report = weights.load_pretrained(variables, flat, model=model)
    report.source = source
    if distributed.is_primary():
        weights.save_report(report, out / "init_report.json")
    echo(f"init: {report.summary()}")
    return variables


def run_loop(run: Run, *, progress: bool = True, echo=print) -> dict:
    """Train ``run`` from its start to ``config.steps``: log, checkpoint, stop on a non-finite step.

    Args:
      run: a prepared run (:func:`prepare_run`).
      progress: show a progress bar.
      echo: prints how long the step waited for data.

    Returns:
      The last logged metrics ({} when no step is left).

    Raises:
      JobError: the loss or gradient became non-finite (the last checkpoint is intact).
    """
    config, state, mesh = run.config, run.state, run.mesh
    step_fn = make_train_step(run.model, frozen=run.labels, mesh=mesh, channels_last=True)
    bar = tqdm(
        total=config.steps, initial=run.start, desc="train", unit="step", disable=not progress, dynamic_ncols=True
    )
    with Checkpointer(run.out / "checkpoints", keep_last=config.keep_checkpoints) as ckpt, _log(run) as log, bar:
        last, started, waiting = {}, time.perf_counter(), DataWait()
        for i, batch in enumerate(waiting.wrap(run.loader.iterate(run.start, config.steps - run.start)), run.start + 1):
            inputs = model_inputs(batch) if mesh is None else shard_batch(model_inputs(batch), mesh)
            state, metrics = step_fn(state, inputs, jax.random.fold_in(run.rng, i))
            bar.update(1)
            if i % config.log_every and i != config.steps and bool(distributed.host_value(metrics["finite"])):
                continue
            last = host_metrics(metrics)
            last.update(
                step=i, seconds=round(time.perf_counter() - started, 2), data_wait_fraction=round(waiting.fraction(), 4)
            )
            log.write(json.dumps(last) + "\n")
            log.flush()
            bar.set_postfix({k.removesuffix("_loss"): f"{last[k]:.3f}" for k in LOSSES_SHOWN})
            if not last["finite"]:
                raise JobError(
                    f"loss or gradient became non-finite at step {i}; stopped (the last checkpoint is intact)"
                )
            if i % config.checkpoint_every == 0 or i == config.steps:
                ckpt.save(i, state, run.rng, metrics=last, metadata=run.metadata)
    if waiting.steps:
        echo(f"data: the step waited for the loader {waiting.fraction():.1%} of the wall time ({waiting})")
    return last


LOSSES_SHOWN = ("total_loss", "rpn_cls_loss", "roi_cls_loss", "roi_reg_loss")  # on the progress bar


def _log(run: Run):
    """``OUT/log.jsonl``, opened to append (a null file on processes other than 0), with
    a first line for the boxes over ``max_boxes`` that training drops.

    Args:
      run: the prepared run.

    Returns:
      The open file.
    """
    log = open(run.out / "log.jsonl", "a") if distributed.is_primary() else open(os.devnull, "w")
    dropped = run.dropped
    if dropped.dropped:
        line = {
            "step": run.start,
            "dropped_boxes": dropped.dropped,
            "total_boxes": dropped.total,
            "images_with_dropped_boxes": dropped.images,
            "max_boxes": dropped.max_boxes,
        }
        log.write(json.dumps(line) + "\n")
    return log


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
    stored = stored_run(directory)
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
