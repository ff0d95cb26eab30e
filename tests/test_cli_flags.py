"""The command line's flags (``cli_parser.py``): every default comes from TrainConfig or
the jobs' options and is shown in --help, usage errors exit with 2 before anything is
written, and ``bench`` dispatches to every script."""

import dataclasses
import json
import os

import pytest

from lucid_jax import cli, jobs
from lucid_jax.jobs import TrainConfig
from tests.cli_run import fake_run, run_cli


def _actions(command) -> dict:
    return {a.dest: a for a in _subparsers()[command]._actions}


def test_train_flags_are_trainconfig_with_its_defaults_and_the_models():
    actions = _actions("train")
    for field in dataclasses.fields(TrainConfig):
        action = actions[field.name]
        assert action.option_strings == ["--" + field.name.replace("_", "-")]
        assert action.default is None  # so that the run knows which flags were given
        shown = field.metadata.get("shown") or ("none" if field.default in (None, ()) else str(field.default))
        assert action.help.endswith(f"(default: {shown})"), (field.name, action.help)
    assert actions["model"].help == (
        "a registered model name: " + ", ".join(jobs.detector_names()) + f" (default: {TrainConfig.model})"
    )
    assert "resnet_101," not in actions["model"].help  # classifiers are not trainable detectors


def test_demo_help_shows_the_demos_own_overrides():
    assert _actions("demo")["steps"].help.endswith(f"(default: {jobs.DEMO_OVERRIDES['steps']})")


def test_help_prints(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    assert "--trainable-backbone-layers" in capsys.readouterr().out


def _subparsers():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


@pytest.mark.parametrize("command", ["demo", "train", "eval", "predict", "export", "plot", "bench", "seed", "launch"])
def test_every_optional_flag_of_every_subcommand_states_its_default(command):
    parser = _subparsers()[command]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.required:
            continue
        if action.const is True:  # a switch such as --no-progress: off unless given
            continue
        assert action.help and "(default: " in action.help, (command, action.option_strings)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-boxes", "0"], "--max-boxes must be >= 1, got 0"),
        (["--lr", "-0.1"], "--lr must be > 0, got -0.1"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (
            ["--image-size", "100"],
            "--image-size must be a positive multiple of 32 (faster_rcnn_mini_fpn's largest stride), got 100",
        ),
        (["--image-size", "800x1333"], "--image-size must be S or SHORT:LONG with positive integers"),
        (["--image-size", "1333:800"], "--image-size SHORT:LONG needs SHORT <= LONG, got '1333:800'"),
        (["--schedule", "step"], "--schedule step needs --decay-steps"),
        (["--decay-steps", "300,200"], "--decay-steps must be increasing positive steps, got 300,200"),
        (["--trainable-backbone-layers", "7"], "invalid choice"),
        (
            ["--rpn-pre-nms-top-n", "2000"],
            "--rpn-pre-nms-top-n takes TRAIN,TEST, two positive counts, e.g. 2000,1000; got 2000",
        ),
        (["--rpn-post-nms-top-n", "300,0"], "--rpn-post-nms-top-n takes TRAIN,TEST, two positive counts"),
        (["--box-batch-size-per-image", "0"], "--box-batch-size-per-image must be >= 1, got 0"),
        (["--dropout-rate", "1"], "--dropout-rate must be in [0, 1), got 1.0"),
    ],
)
def test_usage_errors_exit_2_and_create_nothing(tmp_path, flags, message):
    out = tmp_path / "run"
    code, _, err = run_cli("train", "--data", "shapes", "--out", out, *flags)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("train", "--data", "shapes", "--out", tmp_path / "file")
    assert code == 1 and err.strip() == f"lucid-jax: error: --out {tmp_path / 'file'} is a file; give a directory"


def test_bench_without_arguments_runs_every_benchmark(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda argv: calls.append(argv) or 0)
    assert cli.main(["bench"]) == 0
    assert [os.path.basename(c[1]) for c in calls] == ["bench_ops.py", "bench_predict.py", "bench_train.py"]
    calls.clear()
    assert cli.main(["bench", "predict", "--extra", "--rounds", "1"]) == 0
    assert [(os.path.basename(c[1]), c[2:]) for c in calls] == [("bench_predict.py", ["--rounds", "1"])]


def test_bench_unknown_name_is_a_usage_error(capsys):
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'; choose from ops, predict, train" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--num-processes", "2", "--process-id", "0"],
            "--num-processes and --process-id also need --coordinator (give all three, or none)",
        ),
        (
            ["--coordinator", "127.0.0.1:1234"],
            "--coordinator also needs --num-processes and --process-id (give all three, or none)",
        ),
        (
            ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
            "--process-id must be in 0..1 for --num-processes 2, got 2",
        ),
        (
            ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "-1"],
            "--process-id must be in 0..1 for --num-processes 2, got -1",
        ),
        (
            ["--coordinator", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"],
            "--num-processes must be >= 1, got 0",
        ),
        (
            ["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
            "--coordinator must be HOST:PORT, got 'localhost'",
        ),
    ],
)
@pytest.mark.parametrize("command", ["train", "eval"])
def test_distributed_flag_errors_are_usage_errors(tmp_path, capsys, command, flags, message):
    where = ["--out", str(tmp_path / "run")] if command == "train" else ["--checkpoint", str(tmp_path / "run")]
    assert cli.main([command, "--data", "shapes", *where, *flags]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"lucid-jax: error: {message}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--data", "shapes", "--max-detections", "0"], "--max-detections must be >= 1, got 0"),
        (["export", "--out", "x.jax", "--max-detections", "-5"], "--max-detections must be >= 1, got -5"),
        (["predict", "x.png", "--out", "p", "--tile", "0"], "--tile must be >= 1 pixel, got 0"),
        (["eval", "--data", "shapes", "--tile", "512", "--overlap", "1"], "--overlap must be in [0, 1), got 1.0"),
        (
            ["predict", "x.png", "--out", "p", "--draw-max-side", "-1"],
            "--draw-max-side must be >= 0 (0: no limit), got -1",
        ),
    ],
)
def test_prediction_flag_errors_are_usage_errors(tmp_path, argv, message):
    code, _, err = run_cli(*argv, "--checkpoint", tmp_path / "run")  # the console script, as a user runs it
    assert code == 2 and err.strip() == f"lucid-jax: error: {message}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--local", "0", "--", "train"], "--local and --devices-per-process must be >= 1, got 0 and 1"),
        (
            ["--local", "2", "--", "predict", "x.png"],
            "launch runs train or eval: lucid-jax launch --local N -- train ...",
        ),
        (["--local", "2"], "launch runs train or eval"),
        (
            ["--local", "2", "--", "train", "--process-id", "1"],
            "launch sets --coordinator, --num-processes and --process-id",
        ),
        (["--local", "2", "--timeout", "0", "--", "train"], "--timeout must be > 0, got 0.0"),
    ],
)
def test_launch_usage_errors(capsys, argv, message):
    assert cli.main(["launch", *argv]) == 2
    assert message in capsys.readouterr().err


def test_launch_passes_the_command_and_the_flags_to_each_process(monkeypatch):
    from lucid_jax import distributed

    seen = {}
    monkeypatch.setattr(distributed, "launch_local", lambda n, argv, **kw: seen.update(n=n, argv=argv, **kw) or 0)
    assert cli.main(["launch", "--local", "3", "--devices-per-process", "2", "--", "train", "--data", "shapes"]) == 0
    assert seen == {
        "n": 3,
        "argv": ["train", "--data", "shapes"],
        "devices_per_process": 2,
        "port": None,
        "timeout": None,
    }


def test_export_of_a_canvases_run_writes_one_artifact_per_canvas_and_refuses_bad_platforms(tmp_path):
    out = tmp_path / "run"
    fake_run(out, TrainConfig(image_size="64:96", batch_size=2, shapes_train_examples=4, num_workers=0))
    target = tmp_path / "export" / "detector.jax"
    code, stdout, err = run_cli(
        "export", "--checkpoint", out, "--out", target, "--platforms", "cpu", "--batch-size", "1"
    )
    assert code == 0, err
    names = ["detector.64x96.jax", "detector.96x64.jax", "detector.96x96.jax"]
    assert sorted(p.name for p in target.parent.glob("*.jax")) == sorted(names) and not target.exists()
    index = json.loads((target.parent / "detector.jax.json").read_text())
    assert [c["file"] for c in index["canvases"]] == names and index["batch_size"] == 1
    assert "canvas 64x96, 96x64, 96x96, batch 1, cpu" in stdout
    code, _, err = run_cli("export", "--checkpoint", out, "--out", tmp_path / "x.jax", "--platforms", "cpu,metal")
    assert code == 2 and "--platforms must be among cpu, cuda, tpu, got cpu, metal" in err
    assert not list(tmp_path.glob("x.jax*"))


def test_group_norm_color_and_proposal_counts_train_and_evaluate(tmp_path):
    """--norm-mode group (no batch statistics anywhere), --augment jitter,color and the
    proposal, RoI-sample and dropout settings, end to end: the run stores them and the
    model rebuilt from it has them."""
    out = tmp_path / "gn"
    counts = ("--rpn-pre-nms-top-n", "200,150", "--rpn-post-nms-top-n", "60,40")
    counts += ("--box-batch-size-per-image", "48", "--dropout-rate", "0")
    code, stdout, err = run_cli(
        "train",
        *("--data", "shapes", "--model", "faster_rcnn_mini_fpn", "--norm-mode", "group", "--augment", "jitter,color"),
        *counts,
        *("--steps", "2", "--batch-size", "2", "--image-size", "64", "--shapes-train-examples", "4"),
        *("--eval-every", "0", "--no-progress", "--num-workers", "0", "--log-every", "1", "--out", out),
    )
    assert code == 0, err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "total_loss" in r] == [1, 2]
    assert all(r["finite"] == 1.0 for r in records if "total_loss" in r)
    model, variables, _, config = jobs.load_trained(out)
    assert (config.norm_mode, config.augment) == ("group", "jitter,color")
    assert not variables["batch_stats"] and model.backbone.norm_mode == "group"
    assert (model.rpn.pre_nms_top_n, model.rpn.post_nms_top_n) == ((200, 150), (60, 40))
    assert (model.roi_heads.batch_size_per_image, model.roi_heads.dropout_rate) == (48, 0.0)
    assert jobs.build_model("faster_rcnn_mini_fpn", 4).rpn.post_nms_top_n == (300, 100)  # the model's own
    code, stdout, err = run_cli("eval", "--checkpoint", out, "--data", "shapes", "--no-progress")
    assert code == 0 and "AP50" in stdout, err
    code, _, err = run_cli("train", "--data", "shapes", "--augment", "none,flip", "--out", tmp_path / "bad")
    assert code == 2 and err.strip() == "lucid-jax: error: --augment none stands alone; got 'none,flip'"
