"""Conv: its matmul weight gradient equals XLA's (CPU path), a 1x1 convolution is a matrix product
equal to a float64 reference, and it honours precision and extra keywords."""

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_jax.models.conv import Conv, conv_general_dilated


@pytest.mark.parametrize(
    "kernel, stride, padding",
    [
        (3, 1, ((1, 1), (1, 1))),
        (3, 2, ((1, 1), (1, 1))),
        (1, 2, ((0, 0), (0, 0))),
        (7, 2, ((3, 3), (3, 3))),
        (1, 1, "SAME"),
        (3, 1, "SAME"),
        (3, 2, ((0, 1), (2, 0))),
    ],
)
def test_gradients_match_plain_conv(kernel, stride, padding):
    x = jax.random.normal(jax.random.key(0), (2, 17, 14, 5))
    ours = Conv(7, (kernel, kernel), strides=(stride, stride), padding=padding)
    plain = nn.Conv(7, (kernel, kernel), strides=(stride, stride), padding=padding)
    variables = plain.init(jax.random.key(1), x)
    cot = jax.random.normal(jax.random.key(2), plain.apply(variables, x).shape)
    grad = lambda m: jax.grad(lambda v, x: jnp.sum(m.apply(v, x) * cot), argnums=(0, 1))(variables, x)  # noqa: E731
    if kernel == 1:  # a matrix product: XLA's convolution's values up to summation order (see test_pointwise_*)
        y_ours, y_plain = np.asarray(ours.apply(variables, x)), np.asarray(plain.apply(variables, x))
        np.testing.assert_allclose(y_ours, y_plain, rtol=1e-6, atol=1e-6 * np.abs(y_plain).max())
    else:  # XLA's own convolution: the same bits
        np.testing.assert_array_equal(np.asarray(ours.apply(variables, x)), np.asarray(plain.apply(variables, x)))
    for a, b in zip(jax.tree_util.tree_leaves(grad(ours)), jax.tree_util.tree_leaves(grad(plain))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def _equations(jaxpr):
    """Every equation of a jaxpr, nested ones included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)


def _primitives(jaxpr) -> set:
    """Every primitive's name in a jaxpr, nested ones included."""
    return {eqn.primitive.name for eqn in _equations(jaxpr)}


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_is_a_matrix_product_equal_to_float64(stride):
    """A 1x1 kernel without padding: y = x[:, ::s, ::s] @ w, dx = dy @ w^T scattered back to
    the strided pixels, dw = x_s^T @ dy; against NumPy in float64, with no convolution left."""
    x = jax.random.normal(jax.random.key(0), (2, 15, 12, 24))
    w = jax.random.normal(jax.random.key(1), (1, 1, 24, 40)) * 0.2
    dn = ("NHWC", "HWIO", "NHWC")
    fn = lambda x, w: conv_general_dilated(x, w, (stride, stride), "VALID", dimension_numbers=dn)  # noqa: E731
    y, vjp = jax.vjp(fn, x, w)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    dx, dw = vjp(dy)

    x64, w64, dy64 = (np.asarray(a, np.float64) for a in (x, w[0, 0], dy))
    xs = x64[:, ::stride, ::stride]
    dx64 = np.zeros_like(x64)
    dx64[:, ::stride, ::stride] = dy64 @ w64.T
    dw64 = np.einsum("bhwc,bhwd->cd", xs, dy64)[None, None]
    np.testing.assert_allclose(np.asarray(y), xs @ w64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), dx64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), dw64, rtol=1e-5, atol=1e-5)
    assert y.shape == (2, -(-15 // stride), -(-12 // stride), 40)

    grads = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(fn(x, w) * dy), argnums=(0, 1)))(x, w)
    assert "conv_general_dilated" not in _primitives(grads.jaxpr)  # on every platform
    padded = jax.make_jaxpr(lambda x, w: conv_general_dilated(x, w, (1, 1), ((1, 1), (0, 0)), dimension_numbers=dn))
    assert "conv_general_dilated" in _primitives(padded(x, w).jaxpr)  # a padded 1x1 stays a convolution


def test_export_keeps_xla_weight_gradient_for_gpu_and_tpu():
    conv = Conv(4, (3, 3), padding=((1, 1), (1, 1)))
    x = jnp.ones((1, 8, 8, 3))
    variables = conv.init(jax.random.key(0), x)
    fn = jax.jit(jax.grad(lambda v, x: jnp.sum(conv.apply(v, x) ** 2)))
    exported = jax.export.export(fn, platforms=("cpu", "cuda", "tpu"))(variables, x)
    assert set(exported.platforms) == {"cpu", "cuda", "tpu"}


def _precisions(jaxpr) -> list:
    """The precision of every convolution and matmul in a jaxpr, nested ones included."""
    return [
        e.params["precision"] for e in _equations(jaxpr) if e.primitive.name in ("conv_general_dilated", "dot_general")
    ]


def test_precision_reaches_forward_and_both_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    ours = Conv(4, (3, 3), padding=((1, 1), (1, 1)), precision="highest")
    variables = ours.init(jax.random.key(1), x)
    jaxpr = jax.make_jaxpr(jax.grad(lambda v, x: jnp.sum(ours.apply(v, x) ** 2), argnums=(0, 1)))(variables, x)
    found = _precisions(jaxpr.jaxpr)
    highest = jax.lax.Precision.HIGHEST
    # forward, input gradient, and the weight gradient's CPU matmuls and XLA convolution
    assert len(found) >= 4 and all(p == (highest, highest) for p in found), found


def test_extra_keywords_take_xla_convolution():
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 3), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4), jnp.bfloat16)
    dn = ("NHWC", "HWIO", "NHWC")
    ours = conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn, preferred_element_type=jnp.float32)
    xla = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn, preferred_element_type=jnp.float32)
    assert ours.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(xla))
    with pytest.raises(TypeError, match="no_such_option"):
        conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn, no_such_option=True)
