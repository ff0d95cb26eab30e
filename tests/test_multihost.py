"""Training, checkpoints and evaluation across real processes joined by ``jax.distributed``.

Two processes with two CPU devices each, on loopback, against one process with
four devices: the sharded step, the data slices, a checkpoint that both processes
are killed after and resume from, and gathered evaluation. The processes are
launched a few times in all (module fixtures) and share a persistent compilation
cache. Every launch has a timeout, and a process that fails stops the others and
fails the test with its stderr.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lucid_jax.distributed import free_port
from tests import multihost_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
LAUNCH_TIMEOUT = 300  # seconds; the slowest launch takes about a minute on a 2-core CPU
# Cheaper compiles (the same flags in every process, so runs stay comparable).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of every launched process: CPU, the tree on the path, one compilation cache."""
    cache = tmp_path_factory.mktemp("compilation_cache")
    return {
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


def _xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def _wait(procs, logs, expected_codes, timeout):
    """Wait for every process; on a failure or the timeout, stop the rest and fail with stderr."""
    deadline = time.monotonic() + timeout
    failure = None
    while failure is None and [p.poll() for p in procs].count(None):  # poll every process, every time
        for i, p in enumerate(procs):
            if p.returncode is not None and p.returncode not in expected_codes:
                failure = f"process {i} exited with {p.returncode}"
        if time.monotonic() > deadline:
            failure = f"timed out after {timeout} s"
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    if failure is None:
        failure = next(
            (
                f"process {i} exited with {p.returncode}"
                for i, p in enumerate(procs)
                if p.returncode not in expected_codes
            ),
            None,
        )
    if failure is not None:
        tails = "\n".join(f"--- process {i} stderr:\n{log.read_text()[-4000:]}" for i, log in enumerate(logs))
        pytest.fail(f"{failure}\n{tails}")


def run_workers(out, num_processes, devices, *actions, env, expected_codes=(0,)):
    """Run tests/multihost_worker.py as ``num_processes`` joined processes with ``devices`` CPU devices each."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    logs = [out / f"stderr_{i}_{actions[0]}.txt" for i in range(num_processes)]
    with contextlib.ExitStack() as files:
        procs = [
            subprocess.Popen(
                [sys.executable, WORKER, str(out), str(num_processes), str(i), str(port), *map(str, actions)],
                cwd=ROOT,
                env={**env, "XLA_FLAGS": _xla_flags(devices)},
                stdout=subprocess.DEVNULL,
                stderr=files.enter_context(log.open("w")),
            )
            for i, log in enumerate(logs)
        ]
        _wait(procs, logs, expected_codes, LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def two(tmp_path_factory, env):
    """2 processes x 2 devices: the steps, an uninterrupted lucid-jax train run, its gathered
    evaluation, and last the same run killed after its checkpoint of step 2 (``killed``)."""
    out = tmp_path_factory.mktemp("two_processes")
    run_workers(
        out,
        2,
        2,
        "steps",
        "train",
        out / "uninterrupted",
        "eval",
        out / "uninterrupted",
        "killed",
        out / "killed",
        env=env,
        expected_codes=(-signal.SIGKILL,),
    )
    return out


@pytest.fixture(scope="module")
def one(tmp_path_factory, env, two):
    """1 process x 4 devices: the same steps, and a single-process evaluation of the two-process run."""
    out = tmp_path_factory.mktemp("one_process")
    run_workers(out, 1, 4, "steps", "eval", two / "uninterrupted", env=env)
    return out


def _steps(run):
    return json.loads((run / "steps.json").read_text())


def _max_param_diff(a, b):
    a, b = np.load(a), np.load(b)
    assert sorted(a.files) == sorted(b.files)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)


@pytest.mark.parametrize("sampling, tolerance", [("every_candidate", 1e-6), ("default", 1e-4)])
def test_two_processes_train_as_one_with_four_devices(two, one, sampling, tolerance):
    """3 sharded steps on 2 processes x 2 devices equal 3 on 1 process x 4 devices.

    Both see the same global batches (the loader's slices, stacked). With every
    RoI candidate sampled the only difference is the order of float reductions;
    the default sampling may also swap near-tied RoIs (see test_sharding).
    """
    two_steps, one_steps = _steps(two), _steps(one)
    assert (two_steps["process_count"], two_steps["device_count"]) == (2, 4)
    assert (one_steps["process_count"], one_steps["device_count"]) == (1, 4)
    diff = _max_param_diff(two / f"params_{sampling}.npz", one / f"params_{sampling}.npz")
    moved = _max_param_diff(two / f"params_{sampling}.npz", two / "params_initial.npz")
    print(f"{sampling}: params max |2x2 - 1x4| = {diff:.3g} (moved {moved:.3g} from the initial params)")
    assert moved > 1e-3
    assert diff <= tolerance
    for a, b in zip(two_steps["metrics"][sampling], one_steps["metrics"][sampling], strict=True):
        assert a["finite"] and b["finite"]
        assert abs(a["total_loss"] - b["total_loss"]) <= 100 * tolerance, (a, b)


def test_each_process_reads_a_disjoint_slice_of_the_global_batch(two, one):
    """The slices of the two processes, stacked, are the batches one loader of the global batch reads."""
    from lucid_jax.data import Loader, ShapesDataset

    ids = np.array(_steps(two)["slices"]["ids"])  # [process, step, per-process batch]
    reference = Loader(
        ShapesDataset(num_examples=14, image_size=64, seed=0), worker.GLOBAL_BATCH, shuffle=True, seed=0, num_workers=0
    )
    for step in range(ids.shape[1]):
        assert len(set(ids[:, step].ravel())) == worker.GLOBAL_BATCH  # disjoint
        assert ids[:, step].ravel().tolist() == reference.batch_indices(step)[1]  # complete, in order
    assert np.array_equal(np.array(_steps(one)["slices"]["ids"])[0], ids.transpose(1, 0, 2).reshape(ids.shape[1], -1))
    # one epoch is 3 global batches of the 14 examples' permutation; each example at most once
    epoch = ids[:, :3].ravel()
    assert len(set(epoch.tolist())) == len(epoch) == 12
    # resumed at step 4, every process continues the same global order
    assert np.array_equal(np.array(_steps(two)["slices"]["resumed_ids"]), ids[:, 4:7])


def test_a_bad_batch_on_one_process_stops_every_process(two, one):
    """Only process 1 holds the bad label; both processes raise, naming the image's global row."""
    single = _steps(one)["bad_batch_error"]
    assert single.startswith("label 99 of box 0 in image 3 is outside 1..3")
    assert _steps(two)["bad_batch_error"] == "process 1: " + single


def test_orbax_saves_and_restores_the_replicated_state_from_two_processes(two):
    round_trip = _steps(two)["checkpoint_round_trip"]
    assert round_trip == {"bit_identical": True, "step": worker.STEPS, "replicated": True, "rng": [0, 5]}
    assert (two / "state_checkpoint" / str(worker.STEPS) / "lucid_manifest.json").is_file()


def test_gathered_evaluation_equals_a_single_process_evaluation(two, one):
    two_metrics = json.loads((two / "eval.json").read_text())
    one_metrics = json.loads((one / "eval.json").read_text())
    assert two_metrics["num_images"] == 64 and two_metrics["num_detections"] > 0
    assert two_metrics == one_metrics
    # the very same detections, image by image
    two_results = json.loads((two / "eval_results.json").read_text())
    assert two_results == json.loads((one / "eval_results.json").read_text())


def test_validation_during_a_two_process_run_is_the_gathered_evaluation(two):
    """The run validated at its last step (--eval-every 4), each process predicting its slice;
    the AP it logged is the eval job's on the finished run."""
    records = [r for r in _log_steps(two / "uninterrupted") if "eval" in r]
    assert [r["step"] for r in records] == [4]
    evaluated = json.loads((two / "eval.json").read_text())
    for key in ("AP", "AP50", "AP75"):
        assert abs(records[-1]["eval"][key] - evaluated[key]) <= 1e-9, key
    assert all(np.isfinite(v) and v > 0 for v in records[-1]["val_loss"].values())


def _log_steps(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_killed_and_resumed_run_ends_bit_identical(two, env):
    """Both processes were killed right after the checkpoint of step 2; ``lucid-jax launch``
    restarts both, and the run ends where the uninterrupted two-process run ends, bit for bit."""
    from lucid_jax.checkpoint import Checkpointer

    run = two / "killed"
    assert [r["step"] for r in _log_steps(run)] == [1, 2]
    with Checkpointer(run / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [2]
    launch = subprocess.run(
        [
            sys.executable,
            "-m",
            "lucid_jax.cli",
            "launch",
            "--local",
            "2",
            "--devices-per-process",
            "2",
            "--timeout",
            str(LAUNCH_TIMEOUT),
            "--",
            "train",
            *worker.CLI_TRAIN,
            "--out",
            str(run),
        ],
        cwd=ROOT,
        env={**env, "XLA_FLAGS": FAST_COMPILE},
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT + 30,
        check=False,
    )
    assert launch.returncode == 0, launch.stderr[-6000:]
    printed = [line for line in launch.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0])["step"] == 4  # only process 0 prints

    uninterrupted = two / "uninterrupted"
    with (
        Checkpointer(run / "checkpoints", read_only=True) as a,
        Checkpointer(uninterrupted / "checkpoints", read_only=True) as b,
    ):
        assert a.latest_step() == b.latest_step() == 4
        resumed, straight = a.restore_variables(), b.restore_variables()
    resumed, straight = _flatten(resumed), _flatten(straight)
    assert sorted(resumed) == sorted(straight)
    assert all(resumed[k].dtype == straight[k].dtype and resumed[k].tobytes() == straight[k].tobytes() for k in resumed)
    # log.jsonl, written by process 0 alone: one line per step and the validation at step 4,
    # the same losses and the same held-out figures
    assert [(r["step"], "eval" in r) for r in _log_steps(run)] == [
        (1, False),
        (2, False),
        (3, False),
        (4, False),
        (4, True),
    ]
    assert _without_time(_log_steps(run)) == _without_time(_log_steps(uninterrupted))


def _without_time(rows):
    timings = ("seconds", "data_wait_fraction", "eval_seconds")
    return [{k: v for k, v in row.items() if k not in timings} for row in rows]


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def test_a_crashed_process_fails_the_launch_with_its_stderr(env, tmp_path):
    """Process 1 dies while process 0 waits for it in a collective: the test fails
    with process 1's exit code and stderr, and process 0 is stopped, not awaited."""
    with pytest.raises(pytest.fail.Exception, match="(?s)process 1 exited with 3.*process 1 crashed on purpose"):
        run_workers(tmp_path, 2, 1, "crash", env=env)
