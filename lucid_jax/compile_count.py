"""Count XLA compilations of a jitted function, through ``jax.monitoring``'s public listeners.

jax records ``/jax/core/compile/backend_compile_duration`` once per XLA compilation,
named ``jit(<function name>)``; a call that hits jit's in-memory cache records
nothing. Counting these events tells a test whether a function recompiled without
reaching into jit's private cache.
"""

import contextlib
import dataclasses

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class Compiles:
    """What ``count_compiles`` saw: ``names`` of every compiled function, in order."""

    fun_name: str | None
    names: list = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        """Compilations of ``fun_name`` (of every function when it is None)."""
        if self.fun_name is None:
            return len(self.names)
        return sum(name == f"jit({self.fun_name})" for name in self.names)


@contextlib.contextmanager
def count_compiles(fn=None):
    """Count XLA compilations inside the ``with`` block.

    Args:
      fn: a jitted function (or its name) to count; None counts every compilation,
        including the small programs that eager jnp operations compile.

    Yields:
      a ``Compiles`` whose ``count`` grows as compilations happen.
    """
    fun_name = fn if isinstance(fn, str) or fn is None else fn.__name__
    seen = Compiles(fun_name)

    def listener(event: str, duration: float, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            seen.names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
