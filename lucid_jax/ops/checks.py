"""Argument checks shared by the ops.

Plain Python on static shapes and dtypes, so bad input fails at trace time, before
anything runs. Every message starts with the op's name and the argument's name:
``"nms: boxes must have shape [N, 4], got (5, 3)"``.
"""

import operator

import jax.numpy as jnp
import numpy as np

_KINDS = {
    "floating": (jnp.floating, "a floating-point array"),
    "integer": (jnp.integer, "an integer array"),
    "bool": (jnp.bool_, "a bool array"),
}


def check_shape(fn: str, name: str, x, expected: str, ok: bool) -> None:
    """Raise ``ValueError`` naming the ``expected`` shape (e.g. ``"[N, 4]"``) unless ``ok``."""
    if not ok:
        raise ValueError(f"{fn}: {name} must have shape {expected}, got {tuple(np.shape(x))}")


def check_length(fn: str, name: str, x, size: int, axis: str, other: str) -> None:
    """``x`` must be 1-d of length ``size``, the length of axis ``axis`` of argument ``other``."""
    if np.shape(x) != (size,):
        raise ValueError(
            f"{fn}: {name} must have shape [{axis}] = ({size},) to match {other}, got {tuple(np.shape(x))}"
        )


def check_dtype(fn: str, name: str, x, kind: str, detail: str = "") -> None:
    """``x`` must have a dtype of ``kind``: ``"floating"``, ``"integer"`` or ``"bool"``.

    ``detail`` follows the kind in the message, e.g. ``" of shape [R, 4]"``.
    """
    dtype, words = _KINDS[kind]
    if not jnp.issubdtype(jnp.result_type(x), dtype):
        raise TypeError(f"{fn}: {name} must be {words}{detail}, got dtype {jnp.result_type(x)}")


def check_static_count(fn: str, name: str, value) -> int:
    """A Python int >= 0 that sets an output shape; returns it as an ``int``."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be a Python int (it sets the output shape), got {value!r}") from None
    if value < 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {value}")
    return value
