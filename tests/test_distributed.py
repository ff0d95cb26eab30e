"""The host-side helpers of lucid_jax.distributed on one process: cluster detection,
the joining flags, reading local rows, and the local launcher's failure handling.
The real multi-process runs are in test_multihost.py."""

import sys

import numpy as np
import pytest

from lucid_jax import distributed


@pytest.mark.parametrize(
    "environ, kind",
    [
        ({}, None),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "coordinator"),
        ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, "tpu"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "tpu"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "1"}, "slurm"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),  # one task: run alone
    ],
)
def test_detect_cluster(environ, kind):
    assert distributed.detect_cluster(environ) == kind


def test_without_flags_or_cluster_a_process_runs_alone(monkeypatch):
    monkeypatch.setattr(distributed, "detect_cluster", lambda environ=None: None)
    monkeypatch.setattr("jax.distributed.is_initialized", lambda: False)
    monkeypatch.setattr("jax.distributed.initialize", lambda *a, **k: pytest.fail("initialize was called"))
    assert distributed.initialize() is False


def test_flags_or_a_cluster_join(monkeypatch):
    calls = []
    monkeypatch.setattr("jax.distributed.is_initialized", lambda: False)
    monkeypatch.setattr("jax.distributed.initialize", lambda *a: calls.append(a))
    assert distributed.initialize("10.0.0.1:1234", 2, 1) is True
    monkeypatch.setattr(distributed, "detect_cluster", lambda environ=None: "slurm")
    assert distributed.initialize() is True
    assert calls == [("10.0.0.1:1234", 2, 1), (None, None, None)]  # in a cluster, JAX reads the environment


def test_local_rows_of_a_host_array_are_all_rows():
    values, rows = distributed.local_rows(np.arange(6).reshape(3, 2))
    assert values.tolist() == [[0, 1], [2, 3], [4, 5]] and rows.tolist() == [0, 1, 2]


def test_gather_on_one_process_adds_the_process_axis():
    gathered = distributed.gather({"a": np.arange(3)})
    assert gathered["a"].tolist() == [[0, 1, 2]]


def test_launch_stops_the_others_when_one_process_fails(monkeypatch):
    """Process 1 fails at once; process 0 would run for minutes, and is stopped."""
    script = (
        "import sys, time; i = sys.argv[sys.argv.index('--process-id') + 1]; "
        "time.sleep(300) if i == '0' else sys.exit(3)"
    )
    real_popen = distributed.subprocess.Popen

    def popen(argv, **kwargs):
        return real_popen([sys.executable, "-c", script, *argv[3:]], **kwargs)

    monkeypatch.setattr(distributed.subprocess, "Popen", popen)
    assert distributed.launch_local(2, ["train"], timeout=60) == 3
