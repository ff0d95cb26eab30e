"""The predict job (``lucid_jax/jobs/predict.py``): detections in each file's own pixels,
drawings, globs and folders in batches, unreadable files skipped, COCO results."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from lucid_jax import cli, jobs


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


def test_predict_batches_globs_skips_unreadable_files_and_writes_coco_results(trained, photos, tmp_path):
    folder, images = photos
    (folder / "notes.txt").write_text("not an image, and not an image suffix: a folder scan leaves it out")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    one, four = tmp_path / "one", tmp_path / "four"
    args = ["--checkpoint", str(trained), "--score-thresh", "0.3", "--no-progress"]
    assert cli.main(["predict", str(folder), "--out", str(one), "--batch-size", "1", *args]) == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lucid_jax.cli",
            "predict",
            str(folder / "*.png"),
            str(broken),
            "--out",
            str(four),
            "--batch-size",
            "4",
            "--results",
            str(tmp_path / "coco.json"),
            "--draw",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"skipped {broken}" in proc.stderr and "1 file(s) could not be read" in proc.stderr
    by_one = json.loads((one / "detections.json").read_text())
    by_four = json.loads((four / "detections.json").read_text())
    assert [r["image"] for r in by_four] == [str(folder / name) for name in sorted(images)]
    assert all(r["detections_png"] is None for r in by_one)
    assert all(os.path.isfile(r["detections_png"]) for r in by_four)
    # the batch size changes nothing but speed
    for a, b in zip(by_one, by_four, strict=True):
        assert [d["class"] for d in a["detections"]] == [d["class"] for d in b["detections"]]
        np.testing.assert_allclose(
            np.array([d["box_xyxy"] for d in a["detections"]]).reshape(-1, 4),
            np.array([d["box_xyxy"] for d in b["detections"]]).reshape(-1, 4),
            atol=0.011,
        )
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert {r["image_id"] for r in coco} <= {1, 2, 3, 4, 5, 6}  # numeric file names are the image ids
    assert len(coco) == sum(len(r["detections"]) for r in by_four) > 0
    first = next(r for r in by_four if r["detections"])["detections"][0]
    x1, y1, x2, y2 = first["box_xyxy"]
    assert any(abs(r["bbox"][0] - x1) < 0.01 and abs(r["bbox"][2] - (x2 - x1)) < 0.02 for r in coco)


def test_max_detections_reaches_predict_eval_and_export(trained, photos, voc, tmp_path, capsys):
    """--max-detections K: predict keeps up to K per image (the test-time proposals rise to K),
    eval scores COCO with maxDets (1, 10, K) and says so, export's artifact returns K rows."""
    folder, _ = photos
    image = folder / "3.png"
    counts = {}
    for k in (None, 300):
        out = tmp_path / f"k{k}"
        flags = [] if k is None else ["--max-detections", str(k)]
        argv = ["predict", str(image), "--checkpoint", str(trained), "--out", str(out), "--score-thresh", "0"]
        assert cli.main([*argv, "--no-progress", *flags]) == 0
        counts[k] = len(json.loads((out / "detections.json").read_text())[0]["detections"])
    # score 0 keeps every candidate the per-class NMS leaves: at most the model's 100, and
    # with K = 300 (300 proposals x 3 classes before the NMS) more than 100
    assert counts[None] <= 100 < counts[300] <= 300, counts
    model, _, _, _ = jobs.load_trained(trained, max_detections=300)
    assert model.roi_heads.detections_per_img == 300 and model.rpn.post_nms_top_n[1] == 300

    capsys.readouterr()
    argv = ["eval", "--data", f"voc:{voc[0]}", "--checkpoint", str(trained), "--no-progress"]
    assert cli.main([*argv, "--max-detections", "300"]) == 0
    assert json.loads(capsys.readouterr().out)["coco_max_dets"] == [1, 10, 300]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["coco_max_dets"] == [1, 10, 100]

    artifact = tmp_path / "k300.jax"
    argv = ["export", "--checkpoint", str(trained), "--out", str(artifact), "--platforms", "cpu"]
    assert cli.main([*argv, "--max-detections", "300", "--batch-size", "1"]) == 0
    meta = json.loads((tmp_path / "k300.jax.json").read_text())
    exported = jax.export.deserialize(bytearray(artifact.read_bytes()))
    assert meta["max_detections"] == 300 and exported.out_avals[0].shape == (1, 300, 4)
    assert (
        cli.main(
            [
                "predict",
                str(image),
                "--checkpoint",
                str(trained),
                "--out",
                str(tmp_path / "bad"),
                "--max-detections",
                "0",
                "--no-progress",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == "lucid-jax: error: --max-detections must be >= 1, got 0"


def test_drawings_of_big_images_are_shrunk_to_draw_max_side(trained, photos, tmp_path):
    from PIL import Image

    folder, _ = photos
    out = tmp_path / "drawn"
    argv = ["predict", str(folder / "4.png"), str(folder / "3.png"), "--checkpoint", str(trained), "--out", str(out)]
    assert cli.main([*argv, "--draw", "--draw-max-side", "100", "--no-progress"]) == 0
    results = json.loads((out / "detections.json").read_text())
    # 4.png is 200 wide and 64 high: drawn at 100 x 32; 3.png (128 x 128) at 100 x 100
    assert [Image.open(r["detections_png"]).size for r in results] == [(100, 32), (100, 100)]
    assert [(r["width"], r["height"]) for r in results] == [(200, 64), (128, 128)]  # the JSON keeps file pixels
