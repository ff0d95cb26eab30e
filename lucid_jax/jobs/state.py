"""A run's detector and train state: the model of its settings, its parameters at
step 0 (fresh or given), and what its checkpoints hold.

``train`` builds its state here; ``load_trained`` restores a trained run's into the
same structure.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lucid_jax.checkpoint import Checkpointer
from lucid_jax.data.canvases import Canvases
from lucid_jax.jobs.config import JobError, TrainConfig, canvases, check_model_name, config_from_dict, warmup_steps
from lucid_jax.manifest import CheckpointError
from lucid_jax.models import get_model
from lucid_jax.optim import build_optimizer, param_labels
from lucid_jax.train import create_train_state


def build_model(name: str, num_classes: int, *, norm_mode: str = "batch"):
    """The registered detector ``name`` for ``num_classes`` classes (background included).

    Args:
      name: a registered detector.
      num_classes: object classes, background included.
      norm_mode: "batch" or "frozen" BatchNorm.

    Returns:
      The unbound model.

    Raises:
      JobError: ``name`` is not a registered detector.
    """
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
