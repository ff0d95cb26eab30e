"""``BatchNorm`` (Ioffe & Szegedy, 2015) with its training-mode gradient written out.

The values, the variables and their names are flax's ``nn.BatchNorm``'s: params
``scale`` and ``bias``, batch_stats ``mean`` and ``var`` (the biased batch
variance, averaged with ``momentum``), so state dicts do not change. In training
mode the statistics come from the batch (over every axis but the last, and over
``axis_name`` where one is given), and the gradient is the closed form

    dx = scale * rstd * (dy - (sum(dy) + xhat * sum(dy * xhat)) / n),
    xhat = (x - mean) * rstd,

which keeps only ``x`` and two [C] vectors for the backward pass and reads
``x`` and ``dy`` in two passes. With a ``mask`` (the box head's padded RoIs), the
statistics are those of the unmasked rows alone, and the sums' share of ``dx``
goes to those rows only: ``dx = scale * rstd * (dy - mask * (...) / n)``, n
counting unmasked rows. Differentiating flax's forward instead keeps more
full-size intermediates and makes more passes over them: on CPU the ResNet-101
training step spent more time and memory there. With stored statistics
(evaluation, or ``norm_mode="frozen"``) BN is a per-channel affine map, left to
autodiff, computed in the same order as flax's, so the values are the same bits.
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _reduce_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _batch_moments(x: jax.Array, weights, axis_name: str | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: [..., C] -> mean [C], biased variance [C] in float32 and the row count, across ``axis_name`` too.

    ``weights`` (None, or 0/1 of a shape broadcasting to ``x[..., :1]``) picks the rows counted.
    """
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if weights is None:
        mean = jnp.mean(x32, _reduce_axes(x))
        mean2 = jnp.mean(jnp.square(x32), _reduce_axes(x))
        count = jnp.float32(x.size // x.shape[-1])
        if axis_name is not None:
            mean, mean2 = jax.lax.pmean(jnp.stack([mean, mean2]), axis_name)
            count = count * jax.lax.psum(1, axis_name)
    else:
        w = jnp.broadcast_to(weights.astype(x32.dtype), x.shape[:-1] + (1,))
        sums = jnp.stack([jnp.sum(w * x32, _reduce_axes(x)), jnp.sum(w * jnp.square(x32), _reduce_axes(x))])
        count = jnp.sum(w)
        if axis_name is not None:
            sums, count = jax.lax.psum((sums, count), axis_name)
        mean, mean2 = sums / jnp.maximum(count, 1.0)
    return mean, jnp.maximum(0.0, mean2 - jnp.square(mean)), count


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
    """(x - mean) * (rsqrt(var + eps) * scale) + bias, in flax's order of operations."""
    x32 = x.astype(mean.dtype)
    return ((x32 - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def batch_normalize(x, scale, bias, weights, epsilon: float, axis_name: str | None, dtype: Any):
    """Training-mode BN of x [..., C] with its batch statistics; returns (y [..., C], mean [C], var [C]).

    ``weights``: None (every row counts) or a 0/1 mask broadcasting to ``x[..., :1]``
    whose zero rows are left out of the statistics (they are still normalised).
    mean and var are outputs for the running averages; no gradient flows through them.
    """
    return _forward(x, scale, bias, weights, epsilon, axis_name, dtype)[0]


def _forward(x, scale, bias, weights, epsilon, axis_name, dtype):
    mean, var, count = _batch_moments(x, weights, axis_name)
    y = _normalize(x, mean, var, scale, bias, epsilon, dtype)
    return (y, mean, var), (x, weights, count, mean, jax.lax.rsqrt(var + epsilon), scale)


def _backward(epsilon, axis_name, dtype, residuals, cotangents):
    x, weights, n, mean, rstd, scale = residuals
    dy = cotangents[0].astype(mean.dtype)  # the statistics' cotangents are dropped (see the docstring)
    xhat = (x.astype(mean.dtype) - mean) * rstd
    dbias = jnp.sum(dy, _reduce_axes(x))
    dscale = jnp.sum(dy * xhat, _reduce_axes(x))
    if axis_name is None:
        total_dbias, total_dscale = dbias, dscale
    else:
        # The statistics span every device on the axis, so x's gradient sums over
        # them all; the parameters' gradients stay this device's share, as autodiff
        # through pmean gives them.
        total_dbias, total_dscale = jax.lax.psum(jnp.stack([dbias, dscale]), axis_name)
    shared = (total_dbias + xhat * total_dscale) / jnp.maximum(n, 1.0)
    if weights is not None:
        shared = weights.astype(mean.dtype) * shared
    dx = (scale * rstd) * (dy - shared)
    dweights = None if weights is None else jnp.zeros_like(weights)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype), dweights


batch_normalize.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
    """BatchNorm over the last axis: x [..., C] -> [..., C]; flax's variables, names and values.

    Attributes:
      use_running_average: normalise with the stored statistics (and never update them).
      momentum: running average ``ra = momentum * ra + (1 - momentum) * batch``.
      epsilon: added to the variance.
      dtype: the output's dtype (statistics and the normalisation are float32 or wider).
      axis_name: a pmap/shard_map/vmap axis over which the batch statistics are averaged.
      scale_init: the initialiser of ``scale`` (``bias`` starts at 0, ``mean`` 0, ``var`` 1).
    """

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    axis_name: str | None = None
    scale_init: Callable[..., jax.Array] = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x [..., C] -> [..., C]; ``mask`` (bool, broadcasting to ``x[..., :1]``) picks
        the rows whose batch statistics count in training (default: all)."""
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        dtype = self.dtype or jnp.result_type(x, jnp.float32)
        if self.use_running_average:
            return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, dtype)
        weights = None if mask is None else jnp.asarray(mask, jnp.float32)
        y, mean, var = batch_normalize(x, scale, bias, weights, self.epsilon, self.axis_name, dtype)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
