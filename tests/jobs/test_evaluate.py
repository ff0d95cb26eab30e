"""The eval job (``lucid_jax/jobs/evaluate.py``) through the command line: every box is
counted, and its AP is what pycocotools computes from the files it writes."""

import contextlib
import io
import json

import jax
import pytest

from lucid_jax import cli, jobs
from lucid_jax.evaluation import DetectionEvaluator
from lucid_jax.inference import make_predict_fn


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
    losses = [record for record in log if "total_loss" in record]  # the training records
    assert losses[-1]["step"] == 300 and losses[-1]["total_loss"] < losses[0]["total_loss"]
    assert not any("dropped_boxes" in row for row in log)  # --max-boxes defaults to the largest count
    assert all(0 <= row["data_wait_fraction"] < 1 for row in losses)  # the share of wall time spent waiting for data

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
