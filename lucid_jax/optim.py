"""The optimiser: SGD with momentum or AdamW, warmup and decay schedules, and the
labels that decide which parameters train at which rate and which stay frozen.

The schedules follow torchvision's detection references (linear warmup, then step
decay) with cosine and constant as alternatives; freezing follows torchvision's
``trainable_layers``. Everything is built on optax.
"""

from typing import Any

import flax
import optax

# torchvision's ``trainable_layers`` order: the last stages are trained first.
_BACKBONE_STAGES = ("layer4", "layer3", "layer2", "layer1", "stem")


def learning_rate_schedule(
    learning_rate: float,
    *,
    schedule: str = "step",
    total_steps: int = 1,
    warmup_steps: int = 0,
    warmup_factor: float = 1e-3,
    decay_steps: tuple[int, ...] = (),
    decay_factor: float = 0.1,
) -> optax.Schedule:
    """Linear warmup from ``warmup_factor * lr``, then "step", "cosine" or "constant"."""
    if schedule == "step":
        # The main schedule counts from the end of warmup. Decay steps inside the
        # warmup all take effect when it ends, so they share boundary 0 and their
        # factors multiply (a dict comprehension would keep only one of them).
        boundaries: dict[int, float] = {}
        for s in decay_steps:
            b = max(s - warmup_steps, 0)
            boundaries[b] = boundaries.get(b, 1.0) * decay_factor
        main = optax.piecewise_constant_schedule(learning_rate, boundaries)
    elif schedule == "cosine":
        main = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup_steps, 1))
    elif schedule == "constant":
        main = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f'schedule must be "step", "cosine" or "constant", got {schedule!r}')
    if warmup_steps <= 0:
        return main
    warmup = optax.linear_schedule(learning_rate * warmup_factor, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def param_labels(params, *, trainable_backbone_layers: int = 5, freeze_batchnorm: bool = False) -> Any:
    """Label every parameter "backbone", "heads" or "frozen" (a pytree like ``params``).

    Args:
      params: the detector's params.
      trainable_backbone_layers: 0..5 backbone stages trained, from the top:
        5 trains all, 3 (torchvision's default) freezes the stem and layer1, 0
        freezes the whole ResNet.
      freeze_batchnorm: also freeze every BatchNorm scale and bias (with
        ``norm_mode="frozen"``, as torchvision's FrozenBatchNorm2d). Meant for a
        pretrained backbone: a fresh one starts its residual branches at zero
        (zero-initialised last BN scale), which frozen BN would keep there.

    The backbone classifier ``backbone.net.fc`` is always "frozen" here.
    """
    if not 0 <= trainable_backbone_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable_backbone_layers}")
    frozen_stages = set(_BACKBONE_STAGES[trainable_backbone_layers:])
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    bn_modules = {path[:-1] for path in flat if path[-1] == "scale"}
    labels = {}
    for path in flat:
        in_net = path[:2] == ("backbone", "net")
        # The classifier head is kept for backbone pretraining only; no detection
        # loss reaches it, and freezing it keeps weight decay from eroding it.
        if in_net and len(path) > 2 and (path[2] in frozen_stages or path[2] == "fc"):
            labels[path] = "frozen"
        elif freeze_batchnorm and path[:-1] in bn_modules:
            labels[path] = "frozen"
        else:
            labels[path] = "backbone" if path[0] == "backbone" else "heads"
    return flax.traverse_util.unflatten_dict(labels)


def build_optimizer(
    params,
    *,
    optimizer: str = "sgd",
    learning_rate: float = 0.02,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    backbone_lr_mult: float = 1.0,
    clip_grad_norm: float | None = None,
    trainable_backbone_layers: int = 5,
    freeze_batchnorm: bool = False,
    labels: Any = None,
    **schedule_kwargs,
) -> optax.GradientTransformation:
    """SGD with momentum or AdamW, with warmup and decay, built on optax.

    The backbone gets ``backbone_lr_mult`` times the heads' learning rate (the
    seed's tip for fine-tuning a pretrained backbone), through
    ``optax.multi_transform`` over the ``backbone`` subtree; frozen parameters get
    ``optax.set_to_zero``.

    Args:
      params: the params to optimise (only their tree structure is used).
      optimizer: "sgd" or "adamw".
      learning_rate: the heads' peak learning rate.
      momentum: SGD momentum (AdamW's b1 stays 0.9).
      weight_decay: decoupled for AdamW, L2-style (added to the gradient) for SGD.
      backbone_lr_mult: backbone learning rate / heads' learning rate.
      clip_grad_norm: clip the global gradient norm to this, if given.
      trainable_backbone_layers, freeze_batchnorm: see ``param_labels``.
      labels: the labels of ``param_labels``, if already made; pass the same
        labels to ``make_train_step(frozen=...)`` so that the step and the
        optimiser agree on what is frozen. Given labels win over the two
        arguments above.
      **schedule_kwargs: ``learning_rate_schedule`` keywords (schedule,
        total_steps, warmup_steps, decay_steps, ...).
    """
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f'optimizer must be "sgd" or "adamw", got {optimizer!r}')

    def make(mult: float) -> optax.GradientTransformation:
        lr = learning_rate_schedule(learning_rate * mult, **schedule_kwargs)
        if optimizer == "adamw":
            return optax.adamw(lr, weight_decay=weight_decay)
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum))

    if labels is None:
        labels = param_labels(
            params, trainable_backbone_layers=trainable_backbone_layers, freeze_batchnorm=freeze_batchnorm
        )
    tx = optax.multi_transform(
        {"backbone": make(backbone_lr_mult), "heads": make(1.0), "frozen": optax.set_to_zero()}, labels
    )
    if clip_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
    return tx
