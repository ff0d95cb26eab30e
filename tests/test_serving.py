"""The serving API: ``serving.load`` of the exported artifact (tests/conftest.py) detects
what ``lucid-jax predict`` writes, in each image's own pixels, and refuses other images."""

import json
import os

import numpy as np
import pytest

from lucid_jax import cli, serving


def test_serving_load_equals_lucid_jax_predict(trained, artifact, photos, tmp_path):
    folder, images = photos
    assert (
        cli.main(
            [
                "predict",
                str(folder),
                "--checkpoint",
                str(trained),
                "--out",
                str(tmp_path / "pred"),
                "--score-thresh",
                "0.3",
                "--no-progress",
            ]
        )
        == 0
    )
    listed = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert [os.path.basename(r["image"]) for r in listed] == sorted(images)
    detect = serving.load(artifact, batch_size=4)
    served = detect([images[name] for name in sorted(images)])
    assert sum(len(d["boxes"]) for d in served) >= 6
    for entry, dets, name in zip(listed, served, sorted(images), strict=True):
        h, w = images[name].shape[:2]
        assert (entry["height"], entry["width"]) == (h, w)
        np.testing.assert_allclose(
            dets["boxes"], np.array([d["box_xyxy"] for d in entry["detections"]]).reshape(-1, 4), atol=0.011
        )  # the JSON rounds to 0.01 px
        assert dets["classes"] == [d["class"] for d in entry["detections"]]
        np.testing.assert_allclose(dets["scores"], [d["score"] for d in entry["detections"]], atol=6e-5)
        assert (dets["boxes"][:, 2] <= w + 0.01).all() and (dets["boxes"][:, 3] <= h + 0.01).all()
    with pytest.raises(ValueError, match=r"images\[0\] must be uint8 \[H, W, 3\] RGB"):
        detect([images["1.png"].astype(np.float32)])


def test_an_image_off_the_canvas_is_refused_with_how_to_fit_it(artifact):
    from lucid_jax.export import read_artifact

    program, meta = read_artifact(artifact)
    assert meta["canvas"] == [128, 128] and program.platforms == ("cpu", "cuda", "tpu")  # the program's own
    with pytest.raises(ValueError) as err:
        program.call(np.zeros((1, 96, 128, 3), np.uint8), np.array([[96, 128]], np.int32))
    assert str(err.value) == (
        "this artifact takes images on its 128x128 canvas, uint8 [B, 128, 128, 3], got [1, 96, 128, 3]: "
        "resize each image so that it fits 128x128 with its aspect ratio kept, pad it right and below, "
        "and give its resized (height, width) in image_sizes; lucid_jax.serving.load(FILE) does all of that"
    )
    with pytest.raises(ValueError, match=r"^image_sizes must be int32 \[2, 2\], got \[2\]$"):
        program.call(np.zeros((2, 128, 128, 3), np.uint8), np.array([128, 128], np.int32))
    images = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    sizes = np.array([[128, 128], [96, 128]], np.int32)
    checked, bare = program.call(images, sizes), program.exported.call(images, sizes)  # the check only checks
    for key in ("boxes", "scores", "labels", "valid"):
        np.testing.assert_array_equal(np.asarray(checked[key]), np.asarray(bare[key]))


def test_tiled_serving_equals_tiled_predict(trained, artifact, photos, tmp_path):
    folder, images = photos
    argv = ["predict", str(folder / "1.png"), str(folder / "4.png"), "--checkpoint", str(trained)]
    argv += ["--out", str(tmp_path / "pred"), "--score-thresh", "0.3", "--tile", "64", "--overlap", "0.25"]
    assert cli.main([*argv, "--no-progress"]) == 0
    listed = json.loads((tmp_path / "pred" / "detections.json").read_text())
    detect = serving.load(artifact, batch_size=4)
    assert detect.meta["nms_thresh"] == 0.5
    served = detect([images["1.png"], images["4.png"]], tile=64, overlap=0.25)
    assert sum(len(d["boxes"]) for d in served) >= 2
    for entry, dets in zip(listed, served, strict=True):
        expected = np.array([d["box_xyxy"] for d in entry["detections"]]).reshape(-1, 4)
        np.testing.assert_allclose(dets["boxes"], expected, atol=0.011)
        assert dets["classes"] == [d["class"] for d in entry["detections"]]
