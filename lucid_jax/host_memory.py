"""Handing the compiler's freed host memory back to the system after each large compile.

Compiling the ResNet-101 FPN training step takes XLA's CPU compiler about a
gigabyte of host memory, which it frees when it is done. glibc keeps freed memory
in its heap for later allocations, and the compiler leaves that heap fragmented, so
it keeps nearly all of it. The step's own temporaries (1.3 GiB at 512x512, batch 2)
do not come from that heap: XLA maps them afresh on every call, so the process
carries both for as long as it trains. ``malloc_trim(0)`` returns every free page
of glibc's heaps to the system.

``install()`` (done by ``import lucid_jax``) listens to ``jax.monitoring``'s
backend-compile event and trims after every compilation that took at least
``min_seconds`` (1 s): the programs whose compile leaves a heap worth returning,
not the small programs eager ``jnp`` operations compile. The trim takes tens of
milliseconds, runs before the compiled program's first call, and changes no
computed value. It applies to any jitted function in the process, a plain
``jax.jit`` included. docs/benchmarks.md has the measurements. ``uninstall()``
stops it. On anything but Linux with glibc, ``install`` does nothing and returns
False.
"""

import ctypes
import ctypes.util
import sys

import jax

from lucid_jax.compile_count import BACKEND_COMPILE_EVENT

MIN_SECONDS = 1.0

_state: dict = {"listener": None}


def _glibc_trim():
    """glibc's ``malloc_trim``, or None where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "malloc_trim"):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc.malloc_trim


def install(min_seconds: float = MIN_SECONDS, trim=None) -> bool:
    """Trim glibc's heaps after every XLA compilation of at least ``min_seconds``.

    Replaces any listener an earlier ``install`` registered. Returns True where it
    is installed, False where there is no glibc (nothing is registered then).

    Args:
      min_seconds: the shortest compile (the event's duration) that is followed by a trim.
      trim: the function called with 0 to trim (glibc's ``malloc_trim`` by default).
    """
    if min_seconds < 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds}")
    trim = trim or _glibc_trim()
    uninstall()
    if trim is None:
        return False

    def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event == BACKEND_COMPILE_EVENT and duration_secs >= min_seconds:
            trim(0)

    jax.monitoring.register_event_duration_secs_listener(listener)
    _state["listener"] = listener
    return True


def uninstall() -> None:
    """Stop trimming after compiles (a no-op when nothing is installed)."""
    listener, _state["listener"] = _state["listener"], None
    if listener is not None:
        jax.monitoring.unregister_event_duration_listener(listener)
