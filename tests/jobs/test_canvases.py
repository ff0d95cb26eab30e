"""train, eval and predict on ``--image-size SHORT:LONG`` canvases: one epoch of mixed
orientations compiles one train step per canvas, the metrics do not depend on the eval
batch size, and predict batches each file on its own canvas, as if it were alone."""

import contextlib
import io
import json
import shutil

import numpy as np
import pytest

from lucid_jax import cli, jobs
from lucid_jax.compile_count import count_compiles

IMAGE_SIZE = "64:128"  # landscape 64x128, portrait 128x64, square 96x96
CANVASES_LINE = "canvases: 64x128 landscape, 128x64 portrait, 96x96 square: at most 3 compiled step shapes"


@pytest.fixture(scope="module")
def run(tmp_path_factory, voc_mixed):
    """One epoch of training on the mixed VOC folder through the CLI: (run dir, stdout, train_step compiles)."""
    root = voc_mixed[0]
    config = jobs.TrainConfig(data=f"voc:{root}", image_size=IMAGE_SIZE, batch_size=2, num_workers=0)
    dataset = jobs.open_dataset(config.data, "train")
    loader = jobs.make_loader(dataset, config, train=True)
    canvases = {loader.batch_canvas(s) for s in range(len(loader))}
    assert len(canvases) == 3, canvases  # the epoch mixes all three canvases
    out = tmp_path_factory.mktemp("canvas_run")
    args = ["train", "--data", f"voc:{root}", "--image-size", IMAGE_SIZE, "--batch-size", "2"]
    args += ["--steps", str(len(loader)), "--out", str(out), "--no-progress", "--num-workers", "2", "--eval-every", "0"]
    with count_compiles("train_step") as compiles, contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert cli.main(args) == 0
    return out, stdout.getvalue(), compiles.count


def test_one_mixed_epoch_compiles_one_step_per_canvas_and_logs_the_canvases(run):
    out, stdout, compiles = run
    assert CANVASES_LINE in stdout
    assert compiles == len(jobs.canvases(jobs.TrainConfig(image_size=IMAGE_SIZE)).shapes) == 3
    config = jobs.load_trained(out)[3]
    assert config.image_size == IMAGE_SIZE


def test_eval_metrics_do_not_depend_on_the_batch_size(run, voc_mixed, tmp_path, capsys):
    out = run[0]
    root, written = voc_mixed
    capsys.readouterr()
    results = tmp_path / "dets3.json"
    argv = ["eval", "--data", f"voc:{root}", "--checkpoint", str(out), "--no-progress", "--batch-size", "3"]
    assert cli.main([*argv, "--results", str(results)]) == 0
    by_three = json.loads(capsys.readouterr().out)
    assert by_three["num_images"] == len(written["val"])
    model, variables, class_names, config = jobs.load_trained(out)
    dataset = jobs.open_dataset(f"voc:{root}", "val", class_names=class_names)
    one = config.__class__(**{**config.__dict__, "batch_size": 1})
    by_one = jobs.evaluate(model, variables, dataset, one, progress=False, results=tmp_path / "dets1.json")
    assert by_one is not None
    assert {k: by_one[k] for k in by_three} == by_three
    # the same detections, up to float rounding in batched convolutions
    detections, alone = json.loads(results.read_text()), json.loads((tmp_path / "dets1.json").read_text())
    assert detections and len(alone) == len(detections)
    for a, b in zip(alone, detections, strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        np.testing.assert_allclose(a["bbox"] + [a["score"]], b["bbox"] + [b["score"]], rtol=1e-4, atol=1e-4)


def test_predict_fits_each_file_on_its_canvas_as_if_it_were_alone(run, voc_mixed, tmp_path):
    out = run[0]
    images = sorted((voc_mixed[0] / "JPEGImages").glob("val_*_landscape.png"))[:2]
    images += sorted((voc_mixed[0] / "JPEGImages").glob("val_*_portrait.png"))[:1]
    folder = tmp_path / "images"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / path.name)
    argv = ["predict", str(folder), "--checkpoint", str(out), "--out", str(tmp_path / "all"), "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([*argv, "--batch-size", "2", "--score-thresh", "0.01"]) == 0
    together = json.loads((tmp_path / "all" / "detections.json").read_text())
    assert [r["image"] for r in together] == sorted(str(folder / p.name) for p in images)  # input order

    model, variables, class_names, config = jobs.load_trained(out)
    spec = jobs.canvases(config)
    used = {spec.shapes[spec.canvas_index(r["height"], r["width"])] for r in together}
    assert used == {(64, 128), (128, 64)}
    found = 0
    for entry in together:
        alone = jobs.detect_files(
            model,
            variables,
            class_names,
            spec,
            [entry["image"]],
            tmp_path / "alone",
            batch_size=1,
            score_thresh=0.01,
            num_workers=0,
            progress=False,
        ).results[0]
        assert (alone["height"], alone["width"]) == (entry["height"], entry["width"])
        got, expected = entry["detections"], alone["detections"]
        assert [d["label"] for d in got] == [d["label"] for d in expected]
        np.testing.assert_allclose([d["box_xyxy"] for d in got], [d["box_xyxy"] for d in expected], atol=0.02)
        np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in expected], atol=1e-3)
        # in the file's own pixels
        assert all(
            d["box_xyxy"][2] <= entry["width"] + 0.01 and d["box_xyxy"][3] <= entry["height"] + 0.01 for d in got
        )
        found += len(got)
    assert found > 0


def test_a_canvas_with_fewer_images_than_a_batch_is_named(voc_mixed):
    from lucid_jax.jobs.training import small_canvases

    config = jobs.TrainConfig(data=f"voc:{voc_mixed[0]}", image_size=IMAGE_SIZE, batch_size=3, num_workers=0)
    loader = jobs.make_loader(jobs.open_dataset(config.data, "train"), config, train=True)
    assert small_canvases(loader) == [
        "canvas 96x96: 2 image(s), fewer than the global batch of 3; "
        "training never sees them (use a smaller --batch-size)"
    ]
    square = jobs.make_loader(jobs.open_dataset(config.data, "train"), jobs.TrainConfig(batch_size=3), train=True)
    assert small_canvases(square) == []


def test_export_writes_one_artifact_per_canvas_that_serve_as_predict_does(run, voc_mixed, tmp_path):
    from lucid_jax import serving
    from lucid_jax.data import load_image

    out = run[0]
    path = tmp_path / "export" / "detector.jax"
    argv = ["export", "--checkpoint", str(out), "--out", str(path), "--platforms", "cpu", "--score-thresh", "0.01"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert cli.main(argv) == 0
    assert "canvas 64x128, 128x64, 96x96" in stdout.getvalue()
    names = {"detector.64x128.jax", "detector.128x64.jax", "detector.96x96.jax"}
    assert {p.name for p in path.parent.iterdir()} == names | {f"{n}.json" for n in names} | {"detector.jax.json"}
    index = json.loads((path.parent / "detector.jax.json").read_text())
    assert index["format"] == "jax.export canvases" and index["image_size"] == IMAGE_SIZE
    assert index["resize"] == {"short": 64, "long": 128, "multiple": 32, "band": 1.25}
    assert [(c["canvas"], c["orientation"]) for c in index["canvases"]] == [
        ([64, 128], "landscape"),
        ([128, 64], "portrait"),
        ([96, 96], "square"),
    ]
    for entry in index["canvases"]:  # each file is a whole artifact, with its own canvas
        meta = json.loads((path.parent / f"{entry['file']}.json").read_text())
        assert meta["canvas"] == entry["canvas"] and meta["batch_size"] == "any" and meta["platforms"] == ["cpu"]

    jpegs = voc_mixed[0] / "JPEGImages"
    files = [*sorted(jpegs.glob("val_*_landscape.png"))[:2], *sorted(jpegs.glob("val_*_portrait.png"))[:1]]
    files += sorted(jpegs.glob("val_*_crowded.png"))[:1]
    detector = serving.load(path, batch_size=2)
    assert detector.canvases == [(64, 128), (128, 64), (96, 96)]
    served = detector([load_image(f) for f in files], score_thresh=0.01)
    model, variables, class_names, config = jobs.load_trained(out)
    predicted = jobs.detect_files(
        model,
        variables,
        class_names,
        jobs.canvases(config),
        [str(f) for f in files],
        tmp_path / "predict",
        batch_size=1,
        score_thresh=0.01,
        num_workers=0,
        progress=False,
    ).results
    assert sum(len(d["labels"]) for d in served) > 0
    for got, expected in zip(served, predicted, strict=True):
        dets = expected["detections"]
        assert got["classes"] == [d["class"] for d in dets]
        np.testing.assert_allclose(got["boxes"], np.reshape([d["box_xyxy"] for d in dets], (-1, 4)), atol=0.02)
        np.testing.assert_allclose(got["scores"], [d["score"] for d in dets], atol=1e-3)


def test_size_divisibility_is_read_without_building_the_model():
    from lucid_jax.jobs.config import size_divisibility
    from lucid_jax.models import get_model

    for name in jobs.detector_names():
        assert size_divisibility(name) == get_model(name).backbone.size_divisibility == 32, name
    with pytest.raises(jobs.JobError, match="unknown model 'resnet_50'"):
        size_divisibility("resnet_50")  # a classifier has no canvases
