"""The lucid-jax command line: train -> eval end to end, resume after a kill, and
one-line errors for bad input."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lucid_jax import cli, jobs
from lucid_jax.evaluation import DetectionEvaluator
from lucid_jax.inference import make_predict_fn


def _run(*args, timeout=600, env=None):
    """Run the console script in a fresh interpreter; (returncode, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lucid_jax.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )
    return proc.returncode, proc.stdout, proc.stderr


def _pycocotools(ground_truth, results) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ground_truth))
        run = COCOeval(gt, gt.loadRes(str(results)), "bbox")
        run.evaluate()
        run.accumulate()
        run.summarize()
    return [float(v) for v in run.stats]


def test_voc_train_eval_counts_every_box_and_equals_pycocotools(trained, voc, tmp_path, capsys):
    root, written = voc
    capsys.readouterr()
    results, truth = tmp_path / "dets.json", tmp_path / "gt.json"
    assert (
        cli.main(
            [
                "eval",
                "--data",
                f"voc:{root}",
                "--checkpoint",
                str(trained),
                "--no-progress",
                "--results",
                str(results),
                "--ground-truth",
                str(truth),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    print("held-out VOC:", {k: round(result[k], 4) for k in ("AP", "AP50", "AP75", "voc_AP50_all", "voc_AP50_11pt")})
    assert result["AP50"] >= 0.5
    assert sum(result["num_ground_truth"].values()) == written["val_objects"]
    assert result["num_images"] == len(written["val"])
    stats = _pycocotools(truth, results)  # pycocotools on the files alone
    for key, value in zip(("AP", "AP50", "AP75"), stats):
        assert abs(result[key] - value) <= 1e-9, (key, result[key], value)
    log = [json.loads(line) for line in open(trained / "log.jsonl")]
    assert log[-1]["step"] == 300 and log[-1]["total_loss"] < log[0]["total_loss"]
    assert not any("dropped_boxes" in row for row in log)  # --max-boxes defaults to the largest count
    assert all(0 <= row["data_wait_fraction"] < 1 for row in log)  # the share of wall time spent waiting for data

    # The metrics do not depend on the eval batch size (the last batch is padded, not dropped).
    capsys.readouterr()
    assert (
        cli.main(["eval", "--data", f"voc:{root}", "--checkpoint", str(trained), "--no-progress", "--batch-size", "5"])
        == 0
    )
    again = json.loads(capsys.readouterr().out)
    assert {k: again[k] for k in ("AP", "AP50", "AP75", "voc_AP50_all")} == {
        k: result[k] for k in ("AP", "AP50", "AP75", "voc_AP50_all")
    }

    # Before: padded targets kept the 16 largest objects per image and counted fewer misses.
    model, variables, class_names, config = jobs.load_trained(trained)
    dataset = jobs.open_dataset(f"voc:{root}", "val", class_names=class_names)
    padded = jobs.make_loader(dataset, config, train=False, max_boxes=16)
    old = DetectionEvaluator(class_names)
    predict = make_predict_fn(model, channels_last=True)
    counted = 0
    for batch in padded.epoch(0):
        old.add(jax.device_get(predict(variables, batch["images"], batch["image_sizes"])), batch)
        counted += int((batch["valid"] & ~batch["difficult"]).sum())
    before = old.compute()
    print(
        f"padded to 16 boxes: {counted} objects counted, AP {before['AP']:.4f}, AP50 {before['AP50']:.4f}; "
        f"every box: {written['val_objects']} objects, AP {result['AP']:.4f}, AP50 {result['AP50']:.4f}"
    )
    assert counted < written["val_objects"]


def test_eval_on_shapes_writes_results_that_pycocotools_reproduces(trained, tmp_path, capsys):
    capsys.readouterr()
    results, truth = tmp_path / "dets.json", tmp_path / "gt.json"
    assert (
        cli.main(
            [
                "eval",
                "--data",
                "shapes",
                "--checkpoint",
                str(trained),
                "--no-progress",
                "--results",
                str(results),
                "--ground-truth",
                str(truth),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert set(result["per_class_AP"]) == {"rectangle", "ellipse", "triangle"}
    stats = _pycocotools(truth, results)
    assert [result["AP"], result["AP50"], result["AP75"]] == pytest.approx(stats[:3], abs=1e-9)


def test_predict_writes_pngs_and_json(trained, tmp_path):
    from PIL import Image

    from lucid_jax.data import ShapesDataset, preprocess

    ds = ShapesDataset(num_examples=2, seed=5, image_size=(96, 160))
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(ds[i]["image"]).save(paths[-1])
    assert (
        cli.main(
            [
                "predict",
                *map(str, paths),
                "--checkpoint",
                str(trained),
                "--out",
                str(tmp_path / "out"),
                "--draw",
                "--no-progress",
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [r["image"] for r in results] == list(map(str, paths))
    model, variables, class_names, config = jobs.load_trained(trained)
    predict = jax.jit(lambda v, x, s: model.apply(v, x, s, method="predict", score_thresh=0.5, channels_last=True))
    for r, i in zip(results, range(2)):
        assert Image.open(r["detections_png"]).size == Image.open(paths[i]).size
        # the JSON holds the model's detections mapped back to the file's 160x96 pixels
        ex = preprocess(ds[i], canvas=128, longer_side=128)
        dets = jax.device_get(predict(variables, ex["image"][None], ex["image_size"][None]))
        keep = dets["valid"][0]
        sy, sx = ex["scale"]
        expected = dets["boxes"][0][keep] / np.array([sx, sy, sx, sy])
        got = np.array([d["box_xyxy"] for d in r["detections"]]).reshape(-1, 4)
        np.testing.assert_allclose(got, expected, atol=0.01)
        assert [d["class"] for d in r["detections"]] == [class_names[lab - 1] for lab in dets["labels"][0][keep]]
        assert ((got[:, 2] <= 160.01) & (got[:, 3] <= 96.01)).all()


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
    assert _run(*args, "--out", str(straight), env=cache)[0] == 0

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
    code, _, stderr = _run(*args, "--out", str(killed), env=cache)
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


def _voc(root, xml):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "Annotations" / "a.xml").write_text(xml)
    from PIL import Image

    Image.new("RGB", (64, 48)).save(root / "JPEGImages" / "a.jpg")
    return root


GOOD_XML = """<annotation><filename>a.jpg</filename><size><width>64</width><height>48</height></size>
<object><name>dog</name><difficult>0</difficult><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>30</xmax><ymax>30</ymax></bndbox></object>
</annotation>"""


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_voc", "not found|does not exist|no such"),
        ("malformed_xml", "a.xml"),
        ("malformed_json", "json"),
        ("unknown_model", "unknown model 'faster_rcnn_nope'"),
        ("unknown_class", "dog"),
        ("no_split_file", r"val\.txt: split file for split 'val' not found; pass --split all to score every image"),
        ("other_architecture", "holds a faster_rcnn_mini_fpn, not a faster_rcnn_resnet_50_fpn"),
        ("missing_checkpoint", "checkpoint directory not found"),
        ("bad_size", "multiple of 32"),
    ],
)
def test_errors_are_one_line(case, match, tmp_path, trained):
    if case == "missing_voc":
        args = ["train", "--data", f"voc:{tmp_path / 'nope'}", "--out", str(tmp_path / "o")]
    elif case == "malformed_xml":
        root = _voc(tmp_path / "voc", "<annotation><object><name>dog</name>")
        args = ["train", "--data", f"voc:{root}", "--out", str(tmp_path / "o")]
    elif case == "malformed_json":
        (tmp_path / "ann.json").write_text("{not json")
        args = ["train", "--data", f"coco:{tmp_path / 'ann.json'}:{tmp_path}", "--out", str(tmp_path / "o")]
    elif case == "unknown_model":
        args = ["train", "--data", "shapes", "--model", "faster_rcnn_nope", "--out", str(tmp_path / "o")]
    elif case == "unknown_class":
        root = _voc(tmp_path / "voc", GOOD_XML)
        args = ["eval", "--data", f"voc:{root}", "--split", "all", "--checkpoint", str(trained)]
    elif case == "no_split_file":
        root = _voc(tmp_path / "voc", GOOD_XML)
        args = ["eval", "--data", f"voc:{root}", "--checkpoint", str(trained)]
    elif case == "other_architecture":
        args = ["eval", "--data", "shapes", "--checkpoint", str(trained), "--model", "faster_rcnn_resnet_50_fpn"]
    elif case == "missing_checkpoint":
        args = ["eval", "--data", "shapes", "--checkpoint", str(tmp_path / "none")]
    else:
        args = ["train", "--data", "shapes", "--image-size", "100", "--out", str(tmp_path / "o")]
    code, out, err = _run(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("lucid-jax: error:"), err
    assert "Traceback" not in err
    import re

    assert re.search(match, lines[0], re.IGNORECASE), lines[0]
