"""lucid_jax.host_memory: glibc's heaps are trimmed after each long XLA compile, before the
program runs, and not after short ones; a fragmented heap's free pages really go back.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from lucid_jax import host_memory

glibc_only = pytest.mark.skipif(host_memory._glibc_trim() is None, reason="malloc_trim is glibc's")


@pytest.fixture
def trims():
    calls = []
    yield calls
    host_memory.install()  # the default again, as import lucid_jax left it


def test_trims_after_long_compiles_only(trims):
    x = jnp.ones(7)  # made before: eager operations compile programs of their own
    assert host_memory.install(min_seconds=0.0, trim=trims.append)
    jax.jit(lambda x: x * 3 - 1)(x)  # a new program: one backend compile
    assert trims == [0]
    host_memory.install(min_seconds=3600.0, trim=trims.append)
    jax.jit(lambda x: x * 5 + 2)(x)
    assert trims == [0]  # a compile shorter than the threshold
    host_memory.uninstall()
    jax.jit(lambda x: x * 7)(x)
    assert trims == [0]


def test_a_negative_threshold_is_refused(trims):
    with pytest.raises(ValueError, match="min_seconds must be >= 0, got -1"):
        host_memory.install(min_seconds=-1, trim=trims.append)


def test_the_trim_runs_before_the_program():
    order = []
    x = jnp.ones(3)
    host_memory.install(min_seconds=0.0, trim=lambda _: order.append("trim"))
    try:
        f = jax.jit(lambda x: jax.pure_callback(lambda v: order.append("run") or v, x, x))
        jax.block_until_ready(f(x))
    finally:
        host_memory.install()
    assert order == ["trim", "run"]


# A heap of 2000 freed 100 KiB blocks (below glibc's mmap threshold), pinned by one
# block above them so that free() cannot shrink it; then a compile. VmRSS before and
# after, in MiB.
SCRIPT = """
import ctypes, json, sys
import jax, jax.numpy as jnp
from lucid_jax import host_memory
if sys.argv[1] == "off":
    host_memory.uninstall()
else:
    host_memory.install(min_seconds=0.0)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
x = jnp.ones(13)
blocks = [libc.malloc(100 * 1024) for _ in range(2000)]
for b in blocks:
    ctypes.memset(b, 1, 100 * 1024)
pin = libc.malloc(100 * 1024)
for b in blocks:
    libc.free(b)
before = rss()
jax.jit(lambda x: x * 11 + 4)(x)
print(json.dumps({"before": before, "after": rss()}))
"""


def rss_change(mode):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=dict(os.environ), check=True
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return got["after"] - got["before"]


@glibc_only
def test_a_fragmented_heap_goes_back_after_a_compile():
    assert rss_change("on") < -100  # most of the 195 MiB of freed blocks returned
    assert rss_change("off") > -20  # kept in the heap without the trim
