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
    best_mode,
    canvases,
    check_config,
    describe_canvases,
    flag_name,
    output_folder,
    reconcile_resume,
)
from lucid_jax.jobs.data import DataWait, describe_data, make_loader, open_dataset, small_canvases
from lucid_jax.jobs.run_lock import RunLock
from lucid_jax.jobs.run_log import RunLog, truncate_log
from lucid_jax.jobs.state import (
    CORRUPT_FOLDER,
    init_variables,
    initial_state,
    learning_rate,
    remove_unfinished,
    run_model,
    sealed_steps,
    set_aside_corrupt,
    stored_run,
    uncommitted,
)
from lucid_jax.jobs.validation import (
    Validation,
    best_value,
    held_out_data,
    make_validation,
    overlap_note,
    resolve,
    validate,
)
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
      validation: the held-out data and the programs that score it, or None.
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
    validation: Validation | None = None
    lock: RunLock | None = None


def train(config: TrainConfig, out: str | os.PathLike, *, given=None, progress: bool = True, echo=print) -> dict:
    """Train (or resume) a detector: :func:`prepare_run`, then :func:`run_loop`.

    Writes ``OUT/log.jsonl`` (one JSON object per logged step and validation),
    TensorBoard events in ``OUT/tb/``, ``OUT/checkpoints/<step>`` and, at the end,
    ``OUT/curves.png``. A run whose loss or gradient turns non-finite
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
    run = prepare_run(config, out, given=given, echo=echo)
    try:
        return run_loop(run, progress=progress, echo=echo)
    finally:
        if run.lock is not None:
            run.lock.release()


def prepare_run(config: TrainConfig, out: str | os.PathLike, *, given=None, echo=print) -> Run:
    """Everything a run needs before its first step; every input is checked before
    anything is written or compiled.

    Args:
      config, out, given, echo: as for :func:`train`.

    Returns:
      The :class:`Run`, its state restored from ``OUT/checkpoints`` where a run is there,
      holding the folder's lock (:class:`RunLock`, process 0) until it is released.

    Raises:
      JobError: bad settings, a folder another run is using, a changed setting on
        resume, data that cannot be read or differs from the run's, or a batch that
        does not split over the devices.
    """
    # --- Settings: the flags, then a resumed run's or the --init recipe's -----------------------
    out = output_folder(out)
    check_config(config)
    locks: list[RunLock] = []
    if out.is_dir() and distributed.is_primary():  # a folder in use is refused before anything else
        locks.append(RunLock(out, echo))
    try:
        return _prepare(config, out, locks, given, echo)
    except BaseException:
        for lock in locks:
            lock.release()
        raise


def _prepare(config: TrainConfig, out: Path, locks: list, given, echo) -> Run:
    """:func:`prepare_run` once the folder, if it exists, is locked (``locks``: process 0's lock,
    appended here where the folder is new)."""
    stored = _sound_run(out, echo)
    config, init = _settings(config, stored, given, echo)
    if stored is not None:
        echo(f"resuming from step {stored[2]} of {config.steps} ({out / 'checkpoints' / str(stored[2])})")
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
    held_out = held_out_data(config, class_names)
    config = resolve(config, held_out is not None, resumed=stored is not None)
    counts = object_counts(dataset)
    max_boxes = config.max_boxes or max(int(counts.max(initial=0)), 1)
    shards = {"num_shards": jax.process_count(), "shard_index": jax.process_index()}
    loader = make_loader(dataset, config, train=True, max_boxes=max_boxes, spec=spec, **shards)
    data_info = describe_data(dataset, echo)
    dropped = dropped_boxes_summary(counts, max_boxes)
    for note in (describe_canvases(spec), *small_canvases(loader), *([str(dropped)] if dropped.dropped else [])):
        echo(note)
    model = run_model(config, len(class_names) + 1)
    validation = None
    if held_out is not None and config.eval_every:
        validation = make_validation(model, config, *held_out, spec)
        echo(
            f"validation: every {validation.every} steps on {len(validation.dataset)} held-out images "
            f"({validation.source}); the best step by {validation.best_metric} is kept"
        )
        overlap = overlap_note(validation.dataset, config, getattr(dataset, "ids", None))
        if overlap:
            echo(overlap)
    elif config.eval_every == 0:
        echo("validation: off (--eval-every 0)" if held_out is not None else _NO_VALIDATION.get(config.data[:4], ""))

    # --- State: fresh, from the --init weights, or the last checkpoint's ------------------------
    if not locks and distributed.is_primary():  # every input is valid: now the folder is made, and ours
        out.mkdir(parents=True, exist_ok=True)
        locks.append(RunLock(out, echo))
        if stored is None and sealed_steps(out / "checkpoints"):
            raise JobError(f"another run wrote checkpoints into {out} while this one started; run again to resume it")
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
    if distributed.is_primary():
        dropped_records = truncate_log(out, start)
        if dropped_records:
            echo(f"log: dropped {dropped_records} record(s) past step {start}, written after the last checkpoint")
    metadata = {"config": dataclasses.asdict(config), "class_names": class_names, "max_boxes": max_boxes, **data_info}
    lock = locks[0] if locks else None
    return Run(config, out, spec, model, mesh, loader, state, labels, rng, start, metadata, dropped, validation, lock)


def _sound_run(out: Path, echo):
    """:func:`stored_run` of the newest sound checkpoint: corrupt newer ones are set aside.

    A step whose files fail their manifest is moved to ``OUT/corrupt_checkpoints/``
    (process 0), said in one line, and the run resumes from the newest step before it.
    """
    checkpoints = out / "checkpoints"
    if distributed.is_primary():
        remove_unfinished(out)
        for step, moved, problem in set_aside_corrupt(checkpoints, out / CORRUPT_FOLDER):
            echo(f"checkpoint step {step} is corrupt ({problem}); moved it to {moved}, resuming from an earlier step")
    distributed.barrier("lucid_jax_sound_checkpoints")
    return stored_run(checkpoints)


# Why a run without --eval-data has no validation, by the kind of its --data.
_NO_VALIDATION = {
    "coco": "validation: off; a COCO annotation file is one split: give --eval-data coco:VAL.json:IMAGE_DIR",
    "voc:": "validation: off; the VOC folder lists no val split (ImageSets/Main/val.txt): give --eval-data",
}


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
    """Train ``run`` from its start to ``config.steps``: log, validate, checkpoint, stop on a
    non-finite step; draw ``OUT/curves.png`` at the end.

    Args:
      run: a prepared run (:func:`prepare_run`).
      progress: show a progress bar.
      echo: prints how long the step waited for data, and what validation cost.

    Returns:
      The last logged metrics ({} when no step is left).

    Raises:
      JobError: the loss or gradient became non-finite (the last checkpoint is intact).
    """
    config, state, mesh, validation = run.config, run.state, run.mesh, run.validation
    step_fn = make_train_step(run.model, frozen=run.labels, mesh=mesh, channels_last=True)
    lr = learning_rate(config)
    validation_key = jax.random.fold_in(run.rng, 0)  # training steps draw fold_in(rng, i >= 1)
    bar = tqdm(
        total=config.steps, initial=run.start, desc="train", unit="step", disable=not progress, dynamic_ncols=True
    )
    ranking = config.best_metric  # set without validation only where a resumed run stopped validating
    checkpoints = Checkpointer(
        run.out / "checkpoints",
        keep_last=config.keep_checkpoints,
        best_metric=ranking,
        best_mode=best_mode(ranking or "AP"),
    )
    log = RunLog(run.out, enabled=distributed.is_primary(), start=run.start)
    with checkpoints as ckpt, log, bar:
        _note_dropped(run, log)
        last, started, waiting, validating = {}, time.perf_counter(), DataWait(), 0.0
        postfix: dict[str, str] = {}
        for i, batch in enumerate(waiting.wrap(run.loader.iterate(run.start, config.steps - run.start)), run.start + 1):
            inputs = model_inputs(batch) if mesh is None else shard_batch(model_inputs(batch), mesh)
            state, metrics = step_fn(state, inputs, jax.random.fold_in(run.rng, i))
            bar.update(1)
            validates = validation is not None and validation.due(i, config.steps)
            saves = validates or i % config.checkpoint_every == 0 or i == config.steps
            logs = saves or i % config.log_every == 0
            if not logs and bool(distributed.host_value(metrics["finite"])):
                continue
            last = host_metrics(metrics)
            last.update(
                step=i,
                lr=float(lr(i - 1)),
                seconds=round(time.perf_counter() - started, 2),
                data_wait_fraction=round(waiting.fraction(), 4),
            )
            log.write(last)
            postfix.update({k.removesuffix("_loss"): f"{last[k]:.3f}" for k in LOSSES_SHOWN})
            bar.set_postfix(postfix)
            if not last["finite"]:
                raise JobError(
                    f"loss or gradient became non-finite at step {i}; stopped (the last checkpoint is intact)"
                )
            ranked = dict(last)
            if validates:
                assert validation is not None
                record = {"step": i, **validate(validation, run.model, state, config, run.spec, validation_key)}
                validating += record["eval_seconds"]
                waiting.exclude(record["eval_seconds"])
                log.write(record)
                shown = {k: record["eval"][k] for k in ("AP", "AP50")}
                postfix.update({k: "-" if v is None else f"{v:.3f}" for k, v in shown.items()})  # None: no objects
                bar.set_postfix(postfix)
                ranked[validation.best_metric] = best_value(record, validation.best_metric)
            if saves:
                ckpt.save(i, state, run.rng, metrics=ranked, metadata=run.metadata)
    if waiting.steps:
        echo(f"data: the step waited for the loader {waiting.fraction():.1%} of the wall time ({waiting})")
    if validating:
        wall = time.perf_counter() - started
        echo(f"validation: {validating:.1f} s, {validating / wall:.1%} of the run's {wall:.0f} s")
    if distributed.is_primary() and (run.out / "log.jsonl").is_file():
        from lucid_jax.jobs.curves import plot_run

        plot_run(run.out)
    return last


LOSSES_SHOWN = ("total_loss", "rpn_cls_loss", "roi_cls_loss", "roi_reg_loss")  # on the progress bar


def _note_dropped(run: Run, log: RunLog) -> None:
    """The log's record of the boxes over ``max_boxes`` that training drops, if any."""
    dropped = run.dropped
    if dropped.dropped and run.start == 0:  # a resumed run's log has it from its start
        log.write(
            {
                "step": run.start,
                "dropped_boxes": dropped.dropped,
                "total_boxes": dropped.total,
                "images_with_dropped_boxes": dropped.images,
                "max_boxes": dropped.max_boxes,
            }
        )
