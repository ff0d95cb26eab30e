"""count_compiles: one compile per input signature, named by function, and nothing after the block."""

import jax
import jax.numpy as jnp
import numpy as np

from lucid_jax.compile_count import count_compiles


def _fresh():
    # a new function object each time, so no earlier test has filled its jit cache
    @jax.jit
    def doubled(x):
        return x * 2

    return doubled


def test_one_compile_for_two_calls_of_the_same_shape():
    fn = _fresh()
    with count_compiles(fn) as compiles:
        fn(jnp.ones(3))
        fn(jnp.zeros(3))
    assert compiles.count == 1


def test_two_compiles_for_two_shapes():
    fn = _fresh()
    with count_compiles(fn) as compiles:
        fn(jnp.ones(3))
        fn(jnp.ones(4))
        fn(jnp.ones(3))
    assert compiles.count == 2


def test_a_new_dtype_is_a_new_compile():
    fn = _fresh()
    with count_compiles(fn) as compiles:
        fn(jnp.ones(3, jnp.float32))
        fn(jnp.ones(3, jnp.int32))
    assert compiles.count == 2


def test_a_function_compiled_before_the_block_counts_zero():
    fn = _fresh()
    fn(jnp.ones(3))
    with count_compiles(fn) as compiles:
        fn(jnp.ones(3))
    assert compiles.count == 0


def test_counts_only_the_named_function():
    fn, other = _fresh(), jax.jit(lambda x: x + 1)
    x = np.arange(5.0)
    with count_compiles(fn) as compiles, count_compiles() as everything:
        fn(x)
        other(x)
        jnp.asarray(x)[jnp.asarray(x) > 2]  # eager ops compile small programs of their own
    assert compiles.count == 1
    assert everything.count >= 3 and "jit(doubled)" in everything.names and "jit(<lambda>)" in everything.names


def test_stops_counting_after_the_block():
    fn = _fresh()
    with count_compiles(fn) as compiles:
        fn(jnp.ones(3))
    fn(jnp.ones(6))
    assert compiles.count == 1
