"""``GroupNorm`` (Wu & He, "Group Normalization", ECCV 2018): normalise each image's
channels in groups, with statistics of the image alone, so it behaves the same at
any batch size, in training and in evaluation. detectron2's from-scratch
detectors use it in the backbone, the FPN and the box head ("Rethinking ImageNet
Pre-training", He et al., 2019).

    x [..., H, W, C] -> groups of C / G channels -> (x - mean) / sqrt(var + eps) per
    image and group -> * scale + bias per channel

The variables are ``scale`` and ``bias`` (state-dict ``weight`` and ``bias``, as
torch's ``nn.GroupNorm``); there are no statistics to keep.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

MAX_GROUPS = 32


def num_groups(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """32 groups, or where the channels are few, the most groups that divide them with at
    least 2 channels each (16 channels: 8 groups; 8 channels: 4); 1 channel: 1 group."""
    for groups in range(min(max_groups, channels // 2), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class GroupNorm(nn.Module):
    """GroupNorm over the last axis: x [B, ..., C] -> [B, ..., C], statistics per image and group.

    Attributes:
      epsilon: added to the variance.
      dtype: the output's dtype (the normalisation is float32 or wider).
      scale_init: the initialiser of ``scale`` (``bias`` starts at 0).
    """

    epsilon: float = 1e-5
    dtype: Any = None
    scale_init: Callable[..., jax.Array] = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``mask`` is accepted for the norms' shared call and ignored: nothing is shared
        across the batch, so padded rows cannot change the others."""
        c = x.shape[-1]
        g = num_groups(c)
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        grouped = x32.reshape(*x.shape[:-1], g, c // g)
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)  # all but the batch and the group
        mean = jnp.mean(grouped, axes, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axes, keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype or jnp.result_type(x, jnp.float32))
