"""The training job (``lucid_jax/jobs/training.py``): a run killed and resumed is
bit-identical to one that was not, and a resumed run refuses changed settings before
it compiles anything."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from lucid_jax import jobs
from lucid_jax.jobs import TrainConfig
from tests.cli_run import fake_run, run_cli


def test_resume_after_kill_is_bit_identical(tmp_path):
    args = [
        "train",
        "--data",
        "shapes",
        "--steps",
        "12",
        "--checkpoint-every",
        "4",
        "--log-every",
        "1",
        "--eval-every",
        "0",
        "--batch-size",
        "4",
        "--no-progress",
        "--num-workers",
        "1",
    ]
    # one compilation cache of their own, written on every compile, logged
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "compilation_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
        "JAX_DEBUG_LOG_MODULES": "jax._src.compiler",
    }
    straight = tmp_path / "straight"
    assert run_cli(*args, "--out", str(straight), env=cache)[0] == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lucid_jax.cli", *args, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **cache},
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        done = (
            [json.loads(line)["step"] for line in open(killed / "log.jsonl")] if (killed / "log.jsonl").exists() else []
        )
        if done and done[-1] >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 5 <= done[-1] < 12, done
    code, _, stderr = run_cli(*args, "--out", str(killed), env=cache)
    assert code == 0
    # the resumed run compiles nothing new: its step is the fresh runs' cached one
    assert "cache hit for 'jit_train_step'" in stderr
    assert "MISS for 'jit_train_step'" not in stderr

    _, a, _, _ = jobs.load_trained(straight)
    _, b, _, _ = jobs.load_trained(killed)
    same = jax.tree_util.tree_map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)
    assert all(jax.tree_util.tree_leaves(same))
    log = [json.loads(line) for line in open(killed / "log.jsonl")]
    print(f"killed after step {done[-1]}, resumed from the last checkpoint; log steps {[r['step'] for r in log]}")


def test_resume_refuses_changed_settings_before_compiling(tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(
        steps=2, batch_size=2, image_size=64, shapes_train_examples=4, num_workers=0, checkpoint_every=2, log_every=1
    )
    fake_run(out, config)
    # not given: taken from the run; given and different: refused, all differences in one line
    code, _, err = run_cli("train", "--out", out, "--batch-size", "4", "--lr", "0.5", "--model", "faster_rcnn_mini_fpn")
    assert code == 1
    assert err.strip() == (
        "lucid-jax: error: this run was started with other settings; resuming would change them: "
        "--batch-size 4 (the run has 2), --lr 0.5 (the run has 0.001). Drop these flags to continue "
        "it, or use a new --out"
    )
    resumed, notes = jobs.reconcile_resume(
        config, dataclasses.replace(config, steps=5, num_workers=3), given={"steps", "num_workers"}
    )
    assert resumed == dataclasses.replace(config, steps=5, num_workers=3)
    assert notes == ["--steps changed from 2 to 5: the cosine schedule is recomputed for 5 steps (warmup 1)"]
    # an old checkpoint's config (image_size stored as an int, fields missing) still reads
    old = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("norm_mode", "schedule", "init")}
    old["image_size"] = 64
    assert jobs.config_from_dict(json.loads(json.dumps(old))) == config
    assert config.image_size == "64" and jobs.canvases(config).shapes == ((64, 64),)
    # 64 (an old checkpoint's int) and "64" (the flag's string) are the same setting on resume
    assert (
        jobs.reconcile_resume(config, dataclasses.replace(config, image_size="64"), given={"image_size"})[0] == config
    )
    assert TrainConfig(image_size=" 64 : 128").image_size == "64:128"
