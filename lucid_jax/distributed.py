"""Many processes on JAX's own distributed runtime: joining, cluster detection,
host-side reads of global arrays, gathering, and a local launcher for testing.

Every process runs the same program. ``initialize`` joins them through
``jax.distributed.initialize`` (explicit coordinator flags, or the cluster's own
environment on a TPU pod or under SLURM); after that ``jax.devices()`` spans all
hosts, ``jax.process_index()`` names this one, and each host feeds and reads only
its own devices. ``launch_local`` starts N such processes on one machine, each with
``--xla_force_host_platform_device_count`` CPU devices, joined over loopback.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

# Environment variables that say "this process is one of several in a cluster".
_TPU_HOST_LISTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")


def detect_cluster(environ=None) -> str | None:
    """The kind of cluster this process was started in, or None for a lone process.

    Returns:
      "coordinator" when ``JAX_COORDINATOR_ADDRESS`` is set, "tpu" on a Cloud TPU VM
      (several workers listed, a multislice coordinator, or the VM's TPU devices;
      read from ``environ`` alone when it is given), "slurm" for a SLURM job step
      with more than one task; None otherwise.
    """
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "coordinator"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS") or any("," in env.get(k, "") for k in _TPU_HOST_LISTS):
        return "tpu"
    if environ is None and _on_cloud_tpu_vm():
        return "tpu"  # JAX reads the pod's workers from the TPU VM's metadata (one worker: one process)
    if all(k in env for k in _SLURM_VARS) and int(env.get("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    return None


def _on_cloud_tpu_vm() -> bool:
    """True on a VM with TPU chips attached, found as JAX finds them (their PCI ids)."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, OSError):
        return False


def check_args(coordinator: str | None, num_processes: int | None, process_id: int | None) -> str | None:
    """A usage problem with ``--coordinator``, ``--num-processes``, ``--process-id``, or None.

    The three go together (all or none); the coordinator is HOST:PORT and the
    process id lies in 0..num_processes-1.
    """
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    missing = [flag for flag, value in given.items() if value is None]
    if len(missing) == 3:
        return None
    if missing:
        present = [flag for flag in given if flag not in missing]
        verb = "needs" if len(present) == 1 else "need"
        return f"{' and '.join(present)} also {verb} {' and '.join(missing)} (give all three, or none)"
    assert coordinator is not None and num_processes is not None and process_id is not None
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"--coordinator must be HOST:PORT, got {coordinator!r}"
    if num_processes < 1:
        return f"--num-processes must be >= 1, got {num_processes}"
    if not 0 <= process_id < num_processes:
        return f"--process-id must be in 0..{num_processes - 1} for --num-processes {num_processes}, got {process_id}"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Join the other processes of a run, before any other JAX call.

    Args:
      coordinator, num_processes, process_id: passed to
        ``jax.distributed.initialize`` when given (all three, see ``check_args``).
        Without them, the runtime is started only in a detected cluster
        (``detect_cluster``), where JAX reads the same values from the environment.

    Returns:
      True if this process joined a distributed runtime; False when it runs alone.
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    if coordinator is None and detect_cluster() is None:
        return False
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def is_primary() -> bool:
    """True on the process that logs, prints and writes the run's own files (process 0)."""
    import jax

    return jax.process_index() == 0


def host_value(x) -> np.ndarray:
    """A global array's value as NumPy, read from this process's devices only.

    A replicated array (a metric, the train state) is read from its first local
    shard; a fully addressable one is read whole. A sharded array spanning other
    hosts cannot be read here: gather it with ``gather`` first.
    """
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError(f"array of shape {x.shape} is split across processes; gather it first")
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)


def local_rows(x) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of an array split along axis 0, and their global row numbers.

    Args:
      x: a NumPy array, or a ``jax.Array`` sharded along its first axis (as
        ``shard_batch`` places a batch); shards replicated on several local devices
        count once.

    Returns:
      (values [R, ...] NumPy, rows [R] int: each value's row in the global array).
    """
    import jax

    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        values = np.asarray(x)
        return values, np.arange(len(values))
    pieces: dict[tuple[int, int], Any] = {}
    for shard in x.addressable_shards:
        rows = shard.index[0] if shard.index else slice(None)
        assert isinstance(rows, slice)
        start, stop, _ = rows.indices(x.shape[0])
        pieces.setdefault((start, stop), shard.data)
    spans = sorted(pieces)
    values = np.concatenate([np.asarray(pieces[s]) for s in spans])
    return values, np.concatenate([np.arange(a, b) for a, b in spans])


def gather(tree) -> dict:
    """Stack every process's copy of a pytree of host arrays: leaves [P, ...] in process order.

    Each process passes arrays of the same shapes; this is a collective, so every
    process must call it at the same point. With one process the leaves gain a
    leading axis of 1.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.tree.map(lambda v: np.asarray(v)[None], tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=False))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier named ``name`` (no-op alone)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def free_port() -> int:
    """A TCP port on loopback that no one is listening on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(
    num_processes: int,
    argv: Sequence[str],
    *,
    devices_per_process: int = 1,
    port: int | None = None,
    timeout: float | None = None,
    env: dict | None = None,
) -> int:
    """Run ``lucid-jax ARGV...`` as ``num_processes`` processes joined on this machine.

    Each process gets ``--coordinator 127.0.0.1:PORT --num-processes N --process-id I``
    and ``devices_per_process`` CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``).
    Output passes through. When one process fails, the others are stopped, as they
    would wait for it forever at the next collective.

    Args:
      num_processes: N.
      argv: the subcommand and its flags, e.g. ``["train", "--out", "runs/x"]``.
      devices_per_process: CPU devices in each process.
      port: the coordinator's port (default: a free one).
      timeout: seconds before every process is stopped (None: no limit).
      env: extra environment variables.

    Returns:
      0 if every process succeeded, else the first failing process's exit code
      (124 on timeout).
    """
    port = port or free_port()
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    # gloo: CPU collectives across processes (the default in recent JAX, not in all)
    child_env = {
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        **os.environ,
        **(env or {}),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"]),
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lucid_jax.cli",
                *argv,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(num_processes),
                "--process-id",
                str(i),
            ],
            env=child_env,
        )
        for i in range(num_processes)
    ]
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    try:
        while [p.poll() for p in procs].count(None):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                code = failed[0] if failed else 124
                break
            time.sleep(0.2)
        else:
            code = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return code
