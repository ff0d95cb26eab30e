"""The normalisation layer of a stage, chosen by one field: its ``norm_mode``.

Every stage that normalises (the ResNet's convolutions, the FPN's, the conv box
head's) names its norm by one of ``NORM_MODES`` and builds it here, so that a mode
means the same everywhere:

| mode       | training                                  | evaluation           |
|------------|-------------------------------------------|----------------------|
| ``batch``  | batch statistics; running averages kept; scale and bias trained | stored statistics |
| ``frozen`` | stored statistics, never updated (torchvision's ``FrozenBatchNorm2d``) | stored statistics |
| ``group``  | GroupNorm: each image's own statistics, per group of channels; scale and bias trained | the same |

A stage whose norm is optional (the FPN, the box head) takes ``None`` for none:
its convolutions then carry a bias, as torchvision's v1 layers do.

State-dict names: a norm's ``weight`` and ``bias`` (flax's ``scale``, ``bias``)
and, for BatchNorm, ``running_mean``, ``running_var`` (flax's batch_stats ``mean``,
``var``). GroupNorm keeps no statistics, so batch size never matters to it: the
norm to train from scratch with small batches.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lucid_jax.models.batch_norm import BatchNorm
from lucid_jax.models.group_norm import GroupNorm

NORM_MODES = ("batch", "frozen", "group")


def check_norm_mode(mode: str | None, *, optional: bool = False, where: str = "norm_mode") -> None:
    """Raise ValueError for a mode outside ``NORM_MODES`` (or None, where ``optional``)."""
    if mode is None and optional:
        return
    if mode not in NORM_MODES:
        allowed = NORM_MODES + ((None,) if optional else ())
        raise ValueError(f"{where} must be one of {allowed}, got {mode!r}")


def norm_layer(
    mode: str,
    *,
    train: bool,
    name: str,
    axis_name: str | None = None,
    dtype: Any = jnp.float32,
    scale_init: Callable[..., jax.Array] = nn.initializers.ones,
) -> nn.Module:
    """The norm module of ``mode`` for a call in training (``train``) or evaluation.

    Call it inside a compact method; the module is named ``name`` in its parent.

    Args:
      mode: one of ``NORM_MODES``.
      train: whether the stage runs in training mode.
      name: the module's name (its state-dict name in the parent).
      axis_name: a mapped axis over which batch statistics are averaged.
      dtype: the output dtype.
      scale_init: the scale's initialiser (zeros for a residual branch's last norm).
    """
    check_norm_mode(mode)
    if mode == "group":
        return GroupNorm(epsilon=1e-5, dtype=dtype, scale_init=scale_init, name=name)
    # Frozen BN normalises with the stored statistics and never updates them,
    # in training too (torchvision's FrozenBatchNorm2d, for fine-tuning).
    use_running_average = (not train) or mode == "frozen"
    return BatchNorm(
        use_running_average=use_running_average,
        momentum=0.9,  # torch's momentum=0.1 in flax's convention
        epsilon=1e-5,
        dtype=dtype,
        axis_name=None if use_running_average else axis_name,
        scale_init=scale_init,
        name=name,
    )
