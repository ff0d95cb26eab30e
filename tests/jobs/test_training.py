"""The training job (``lucid_jax/jobs/training.py``): a resumed run refuses changed
settings before it compiles anything. (A run killed at random moments and resumed is
bit-identical to one that was not: tests/test_faults.py.)"""

import dataclasses
import json

from lucid_jax import jobs
from lucid_jax.jobs import TrainConfig
from tests.cli_run import fake_run, run_cli


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
