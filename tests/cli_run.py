"""The ``lucid-jax`` console script run as a user runs it (a fresh interpreter, its exit
code and both streams), and a run directory made without training."""

import dataclasses
import os
import subprocess
import sys


def run_cli(*args, timeout=600, env=None) -> tuple[int, str, str]:
    """``python -m lucid_jax.cli ARGS``; (returncode, stdout, stderr). ``env`` adds variables."""
    proc = subprocess.run(
        [sys.executable, "-m", "lucid_jax.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )
    return proc.returncode, proc.stdout, proc.stderr


def fake_run(out, config) -> None:
    """A run directory at ``out`` with one checkpoint (step 2) of ``config``, written without training."""
    from lucid_jax import jobs
    from lucid_jax.checkpoint import Checkpointer

    model = jobs.build_model(config.model, 4)
    state, _ = jobs.initial_state(model, config)
    with Checkpointer(out / "checkpoints") as ckpt:
        ckpt.save(2, state, metadata={"config": dataclasses.asdict(config), "class_names": ["a", "b", "c"]})
