"""A run's detector and train state: the model of its settings, its parameters at
step 0 (fresh or given), and what its checkpoints hold.

``train`` builds its state here; ``load_trained`` restores a trained run's into the
same structure.
"""

import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lucid_jax.checkpoint import Checkpointer
from lucid_jax.data.canvases import Canvases
from lucid_jax.jobs.config import (
    JobError,
    TrainConfig,
    best_mode,
    canvases,
    check_model_name,
    config_from_dict,
    warmup_steps,
)
from lucid_jax.manifest import MANIFEST_NAME, CheckpointError, verify_checkpoint
from lucid_jax.models import get_model
from lucid_jax.optim import build_optimizer, learning_rate_schedule, param_labels
from lucid_jax.train import create_train_state

# Run settings that are the builders' own keywords: None keeps the registered model's value.
MODEL_SETTINGS = ("rpn_pre_nms_top_n", "rpn_post_nms_top_n", "box_batch_size_per_image", "dropout_rate")


def build_model(name: str, num_classes: int, *, norm_mode: str = "batch", compute_dtype: str = "float32", **overrides):
    """The registered detector ``name`` for ``num_classes`` classes (background included).

    Args:
      name: a registered detector.
      num_classes: object classes, background included.
      norm_mode: "batch", "frozen" or "group" (every norm of the model).
      compute_dtype: "float32", or "bfloat16": convolutions and matmuls in bfloat16 on
        float32 parameters (the losses and detections stay float32).
      **overrides: builder keywords (``MODEL_SETTINGS``) that replace the model's own.

    Returns:
      The unbound model.

    Raises:
      JobError: ``name`` is not a registered detector.
    """
    check_model_name(name)
    return get_model(name, num_classes=num_classes, norm_mode=norm_mode, dtype=jnp.dtype(compute_dtype), **overrides)


def run_model(config: TrainConfig, num_classes: int, compute_dtype: str | None = None):
    """The detector of a run's settings (its ``compute_dtype`` unless another is given):
    the registered model with the run's ``MODEL_SETTINGS`` where they are set."""
    dtype = compute_dtype or config.compute_dtype
    overrides = {name: getattr(config, name) for name in MODEL_SETTINGS if getattr(config, name) is not None}
    return build_model(config.model, num_classes, norm_mode=config.norm_mode, compute_dtype=dtype, **overrides)


def frozen_labels(params, config: TrainConfig):
    """Which parameters train: the one labelling the optimiser and the step share."""
    return param_labels(
        params,
        trainable_backbone_layers=config.trainable_backbone_layers,
        freeze_batchnorm=config.norm_mode == "frozen",
    )


def _schedule(config: TrainConfig) -> dict:
    return dict(
        schedule=config.schedule,
        total_steps=config.steps,
        warmup_steps=warmup_steps(config),
        decay_steps=tuple(config.decay_steps),
        decay_factor=config.decay_factor,
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
        **_schedule(config),
    )


def learning_rate(config: TrainConfig):
    """The heads' learning rate as a function of the optimiser's count: step i uses ``lr(i - 1)``
    (the backbone's is ``--backbone-lr-mult`` times it)."""
    return learning_rate_schedule(config.lr, **_schedule(config))


def init_variables(model, config: TrainConfig, spec: Canvases | None = None):
    """Freshly initialised variables, seeded by ``config.seed``.

    Args:
      model: the detector.
      config: the run's settings.
      spec: the run's canvases (default: ``canvases(config)``); any canvas gives the
        same parameters.

    Returns:
      {"params", "batch_stats"}.
    """
    height, width = (canvases(config) if spec is None else spec).shapes[0]
    images = np.zeros((1, 3, height, width), np.float32)
    return jax.jit(model.init)(jax.random.key(config.seed), images)


def initial_state(model, config: TrainConfig, variables=None, *, mesh=None):
    """(train state, frozen labels) at step 0, from ``variables`` or a fresh init.

    With ``mesh`` the state is replicated over it (see ``create_train_state``).
    """
    variables = init_variables(model, config) if variables is None else variables
    labels = frozen_labels(variables["params"], config)
    state = create_train_state(model, variables, _optimizer(variables["params"], labels, config), mesh=mesh)
    return state, labels


def uncommitted(state):
    """The restored state as the fresh one is: arrays not committed to a device.

    Orbax hands back arrays committed to their device, and jit compiles a
    committed argument with its sharding written into the program. A resumed run
    then missed the compilation cache that a fresh run of the same config filled,
    and compiled its step again. Each array goes through the host once.
    """
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)) if isinstance(x, jax.Array) else x, state)


CORRUPT_FOLDER = "corrupt_checkpoints"  # in the run folder: steps set aside by a resume


def remove_unfinished(out: Path) -> list[Path]:
    """Remove what a killed run left half-written in its folder; call with the folder locked.

    That is orbax's temporary step folders, step folders never sealed, and the partial
    files of whole-file writes (``.NAME.partial-PID``, see :mod:`lucid_jax.files`).

    Returns:
      The paths removed.
    """
    checkpoints = out / "checkpoints"
    found = list(out.glob(".*.partial-*"))
    if checkpoints.is_dir():
        for path in checkpoints.iterdir():
            unsealed = path.name.isdigit() and path.is_dir() and not (path / MANIFEST_NAME).exists()
            if "orbax-checkpoint-tmp" in path.name or unsealed:
                found.append(path)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def sealed_steps(checkpoints: Path) -> list[int]:
    """The sealed steps of a ``checkpoints`` folder, oldest first, read from the folder alone.

    Without orbax, so that process 0 may call it by itself: orbax's manager waits for
    every process when it opens a folder.
    """
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and (p / MANIFEST_NAME).is_file())


def set_aside_corrupt(checkpoints: Path, aside: Path) -> list[tuple[int, Path, str]]:
    """Move the newest checkpoints that fail their manifest out of the way, down to a sound one.

    Args:
      checkpoints: the run's ``checkpoints`` folder.
      aside: where the corrupt steps go (created when one is found), each as ``aside/<step>``
        (``<step>-2`` and so on where that name is taken), kept for inspection.

    Returns:
      (step, where it went, the problem) for each step moved, newest first; the steps
      older than a sound one are not read. Orbax is not used (see :func:`sealed_steps`).
    """
    moved = []
    for step in reversed(sealed_steps(checkpoints)):
        try:
            verify_checkpoint(checkpoints / str(step))
            break
        except CheckpointError as e:
            problem = str(e).split(" is corrupt: ")[-1] if " is corrupt: " in str(e) else str(e)
            aside.mkdir(exist_ok=True)
            target, n = aside / str(step), 1
            while target.exists():
                n += 1
                target = aside / f"{step}-{n}"
            os.replace(checkpoints / str(step), target)
            moved.append((step, target, problem))
    return moved


def stored_run(checkpoints: Path):
    """(config, class names, latest step) of a run directory's checkpoints, or None.

    Args:
      checkpoints: the run's ``checkpoints`` folder.

    Returns:
      None where no complete checkpoint is there.

    Raises:
      JobError: unreadable checkpoints, or ones not written by ``train``.
    """
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


def select_step(directory: Path, config: TrainConfig, step: str | int) -> int:
    """The checkpoint ``--step`` names: "latest", "best" or a number, among the kept steps.

    Args:
      directory: the run's ``checkpoints`` folder.
      config: the run's settings (its ``best_metric``).
      step: "latest", "best" or a step number (an int or its text).

    Raises:
      JobError: "best" in a run without validation, or a step the run does not keep;
        the message lists the kept steps.
    """
    with Checkpointer(directory, read_only=True) as ckpt:
        kept = ckpt.all_steps()
        if not kept:
            raise JobError(f"no complete checkpoint in {directory}")
        if step == "latest":
            return kept[-1]
        if step == "best":
            if not config.best_metric:
                raise JobError(f"{directory}: the run trained without validation, so it keeps no best step")
            ranked = {s: (ckpt.metrics(s) or {}).get(config.best_metric) for s in kept}
            ranked = {s: v for s, v in ranked.items() if v is not None and v == v}  # validated, not NaN
            if not ranked:
                raise JobError(f"{directory}: no kept step was validated; use --step latest")
            pick = max if best_mode(config.best_metric) == "max" else min
            return pick(ranked, key=lambda s: (ranked[s], -s))
        try:
            number = int(step)
        except ValueError:
            raise JobError(f"--step must be latest, best or a step number, got {step!r}") from None
        if number not in kept:
            raise JobError(f"{directory} keeps no step {number}; kept steps: {', '.join(map(str, kept))}")
        return number


def load_trained(
    checkpoint: str | os.PathLike,
    model_name: str | None = None,
    *,
    step: str | int = "latest",
    compute_dtype: str | None = None,
    max_detections: int | None = None,
):
    """(model, variables, class_names, config) from a training run's directory.

    Args:
      checkpoint: the ``--out`` of ``train`` (or its ``checkpoints`` folder).
      model_name: if given, the architecture the user expects; a checkpoint of
        another architecture is refused.
      step: "latest", "best" (the best validated step by the run's ``--best-metric``)
        or a kept step's number.
      compute_dtype: "float32" or "bfloat16" (default: the run's own).
      max_detections: detections per image (default: the model's, 100); the
        test-time proposals rise to it where they are fewer
        (``FasterRCNN.with_max_detections``).

    Raises:
      JobError: no run there, another architecture, a step it does not keep, a
        checkpoint that cannot be read, or ``max_detections`` < 1.
    """
    if max_detections is not None and max_detections < 1:
        raise JobError(f"--max-detections must be >= 1, got {max_detections}")
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
    model = run_model(config, len(class_names) + 1, compute_dtype)
    number = select_step(directory, config, step)
    try:
        with Checkpointer(directory, read_only=True) as ckpt:
            template = jax.eval_shape(lambda: initial_state(model, config)[0])
            state, _, _ = ckpt.restore(template, number)
    except CheckpointError as e:
        raise JobError(str(e)) from None
    if max_detections is not None:
        model = model.with_max_detections(max_detections)
    return model, {"params": state.params, "batch_stats": state.batch_stats}, class_names, config
