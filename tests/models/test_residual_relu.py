"""``resnet.residual_relu``: jax.nn.relu's values and derivative, written for XLA's benefit."""

import jax
import jax.numpy as jnp
import numpy as np

from lucid_jax.models.resnet import residual_relu

EDGES = [-2.0, -0.0, 0.0, 1e-30, -1e-30, 3.0, np.nan, -np.inf, np.inf]


def _inputs():
    rng = np.random.default_rng(0)
    return np.concatenate([np.array(EDGES, np.float32), rng.standard_normal(55).astype(np.float32)])


def test_values_are_relus_with_nan_kept_and_no_negative_zero():
    x = _inputs()
    got = np.asarray(jax.jit(residual_relu)(x))
    np.testing.assert_array_equal(got, np.asarray(jax.nn.relu(x)))  # NaN where NaN, -0.0 == 0.0
    assert not np.signbit(got[~np.isnan(got)]).any()


def test_first_and_second_derivatives_are_jax_relus_at_zero_nan_and_infinities():
    """The derivative reads the output's sign (the input's is the same): 0 at 0 and at NaN."""
    x = _inputs()
    w = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)

    def grad_of(relu):
        return jax.jit(jax.grad(lambda v: jnp.sum(w * relu(v))))

    np.testing.assert_array_equal(np.asarray(grad_of(residual_relu)(x)), np.asarray(grad_of(jax.nn.relu)(x)))
    expected = np.where(x > 0, w, 0)  # NumPy's own comparison: False for NaN and for both zeros
    np.testing.assert_array_equal(np.asarray(grad_of(residual_relu)(x)), expected)
    hessian_diag = jax.jit(jax.grad(lambda v: jnp.sum(jax.grad(lambda u: jnp.sum(residual_relu(u) ** 2))(v))))
    np.testing.assert_array_equal(np.asarray(hessian_diag(x)), np.where(x > 0, 2.0, 0.0).astype(np.float32))
