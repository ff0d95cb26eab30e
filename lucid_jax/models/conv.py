"""``Conv``: flax's ``nn.Conv`` computed as matrix products where XLA's CPU convolutions are slow.

XLA's CPU backend computes a convolution's weight gradient as another
convolution sliding over the whole activation map, at a fraction of its matmul
speed (docs/benchmarks.md has the measurements behind this file). The
weight gradient of a stride-s, k x k convolution is a sum over the k*k kernel
taps of ``x_tap^T @ dy``, where ``x_tap`` is the (padded, strided) input shifted
by that tap: k*k plain matrix products. On CPU we use that form; on GPU and TPU,
whose convolution libraries are fast, XLA's own. The forward pass and the input
gradient of these are XLA's everywhere.

A 1x1 convolution without padding (the ends of ResNet's bottlenecks and its
shortcuts, the FPN's laterals, the RPN's classifier and box regressor) is a
matrix product of the (strided) input's pixels [B*Ho*Wo, Cin] with the kernel
[Cin, Cout], and is computed as one on every platform, its input gradient
included (``dx = dy @ kernel^T``). On CPU, XLA's 1x1 convolution allocates
a scratch buffer the size of its input on every call, which glibc maps fresh
each time, and runs slower than the same product as a ``dot``.

Values agree with XLA's convolution up to float summation order.
"""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp


def _conv(x, w, strides, padding, precision):
    return jax.lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )


def _is_pointwise(kernel_hw, padding) -> bool:
    """A 1x1 kernel without padding: a matrix product over the (strided) pixels."""
    return tuple(kernel_hw) == (1, 1) and all(p == 0 for pads in padding for p in pads)


def _pointwise(x, w, strides, precision):
    """y [B, Ho, Wo, Cout] = x[:, ::sh, ::sw] [B, Ho, Wo, Cin] @ w[0, 0] [Cin, Cout]."""
    if strides != (1, 1):
        x = jax.lax.slice(x, (0, 0, 0, 0), x.shape, (1, *strides, 1))
    return jnp.dot(x, w[0, 0], precision=precision)


def _forward(x, w, strides, padding, precision):
    if _is_pointwise(w.shape[:2], padding):
        return _pointwise(x, w, strides, precision)
    return _conv(x, w, strides, padding, precision)


def _weight_grad_matmuls(x, dy, kernel_hw, strides, padding, precision):
    """dW [kh, kw, Cin, Cout] from x [B, H, W, Cin] and dy [B, Ho, Wo, Cout]."""
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))  # [B, H+pt+pb, W+pl+pr, Cin]
    b, ho, wo, cout = dy.shape
    cin = x.shape[-1]
    sh, sw = strides
    d = dy.reshape(-1, cout)  # [B*Ho*Wo, Cout]
    taps = []
    for i in range(kernel_hw[0]):
        for j in range(kernel_hw[1]):
            limit = (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin)
            xs = jax.lax.slice(xp, (0, i, j, 0), limit, (1, sh, sw, 1))  # [B, Ho, Wo, Cin]
            taps.append(jnp.dot(xs.reshape(-1, cin).T, d, precision=precision))  # [Cin, Cout]
    return jnp.stack(taps).reshape(kernel_hw[0], kernel_hw[1], cin, cout)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_with_matmul_wgrad(x, w, strides, padding, precision):
    return _forward(x, w, strides, padding, precision)


def _fwd(x, w, strides, padding, precision):
    return _forward(x, w, strides, padding, precision), (x, w)


def _bwd(strides, padding, precision, residuals, dy):
    x, w = residuals
    dx = jax.vjp(lambda x: _forward(x, w, strides, padding, precision), x)[1](dy)[0]
    dw = jax.lax.platform_dependent(
        cpu=lambda: _weight_grad_matmuls(x, dy, w.shape[:2], strides, padding, precision).astype(w.dtype),
        default=lambda: jax.vjp(lambda w: _forward(x, w, strides, padding, precision), w)[1](dy)[0],
    )
    return dx, dw


_conv_with_matmul_wgrad.defvjp(_fwd, _bwd)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """The ``conv_general_dilated`` flax's ``nn.Conv`` calls, for plain NHWC convolutions.

    ``precision`` applies to the forward pass and to both gradients, the matmul
    weight gradient included. Any other keyword of ``jax.lax.conv_general_dilated``
    (``preferred_element_type``, ``batch_group_count``) takes XLA's own convolution,
    gradients and all, so that it is honoured; an unknown keyword is a TypeError.
    """
    plain = (
        feature_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and not kwargs
    )
    if not plain or lhs.ndim != 4:
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            precision=precision,
            **kwargs,
        )
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    if isinstance(precision, list):
        precision = tuple(precision)  # a static argument of the custom VJP must be hashable
    return _conv_with_matmul_wgrad(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding), precision)


Conv = partial(nn.Conv, conv_general_dilated=conv_general_dilated)
