"""Tiled prediction (``lucid_jax/tiling.py``): the windows, the merge rule, NMS against
torchvision's, and, with a trained detector, tiled detections against each window's
own prediction and objects on window borders found once."""

import json

import jax
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from lucid_jax import cli, jobs
from lucid_jax.data.shapes import _PALETTE, rasterize
from lucid_jax.data.transforms import fit_to_canvas
from lucid_jax.inference import image_detections, uint8_predict_fn
from lucid_jax.tiling import detect_tiled, merge_tiles, nms_numpy, tile_windows
from tests.cli_run import run_cli


@pytest.mark.parametrize(
    "height, width, tile, overlap",
    [(224, 320, 128, 0.25), (1035, 1249, 416, 0.25), (100, 90, 128, 0.5), (128, 1000, 128, 0.0), (300, 300, 64, 0.9)],
)
def test_windows_cover_the_image_whole_and_overlap_as_asked(height, width, tile, overlap):
    windows = tile_windows(height, width, tile, overlap)
    covered = np.zeros((height, width), int)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert (x1 - x0, y1 - y0) == (min(tile, width), min(tile, height))  # whole windows only
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    # Neighbours share at least the overlap (the last one, moved back to the edge, more).
    for axis, side in ((0, width), (1, height)):
        starts = np.unique(windows[:, axis])
        if side > tile:
            assert (np.diff(starts) <= round(tile * (1 - overlap))).all() and starts[-1] == side - tile
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\), got 1.0"):
        tile_windows(height, width, tile, 1.0)
    with pytest.raises(ValueError, match="tile must be >= 1 pixel, got 0"):
        tile_windows(height, width, 0, overlap)


def test_nms_equals_torchvision():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (300, 2))], 1)
    scores = rng.uniform(0, 1, 300)
    for threshold in (0.3, 0.5, 0.7):
        expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).numpy()
        np.testing.assert_array_equal(nms_numpy(boxes, scores, threshold), expected)


def _dets(*rows):
    """Window detections from (x0, y0, x1, y1, score, label) rows."""
    a = np.asarray(rows, np.float64).reshape(-1, 6)
    return {"boxes": a[:, :4], "scores": a[:, 4], "labels": a[:, 5].astype(np.int32)}


def test_a_cut_box_gives_way_to_the_whole_view_and_duplicates_merge():
    # Two 128-pixel windows side by side on a 128 x 224 image, sharing x in [96, 128).
    windows = np.array([[0, 0, 128, 128], [96, 0, 224, 128]])
    left = _dets(
        (100, 10, 128, 40, 0.95, 1),  # object A cut at the left window's inner edge x = 128 ...
        (100, 60, 120, 90, 0.80, 2),  # object B inside the overlap: seen whole by both windows
        (10, 10, 30, 30, 0.70, 1),  # object C, left window only
    )
    right = _dets(
        (4, 10, 44, 40, 0.60, 1),  # ... and seen whole by the right window: (100, 10, 140, 40)
        (4, 60, 24, 90, 0.85, 2),  # B again, at (100, 60, 120, 90)
        (0, 100, 20, 120, 0.9, 3),  # D: cut at the right window's inner edge x = 96, nothing whole covers it
    )
    merged = merge_tiles([left, right], windows, (128, 224), nms_thresh=0.5)
    np.testing.assert_allclose(
        merged["boxes"], [[96, 100, 116, 120], [100, 60, 120, 90], [10, 10, 30, 30], [100, 10, 140, 40]]
    )
    np.testing.assert_allclose(merged["scores"], [0.9, 0.85, 0.7, 0.6], rtol=1e-6)
    assert merged["labels"].tolist() == [3, 2, 1, 1]
    # Plain NMS (cover > 1: nothing dropped) keeps the half box of A, which scores higher,
    # and suppresses the whole one (IoU 840 / 1200 = 0.7).
    plain = merge_tiles([left, right], windows, (128, 224), nms_thresh=0.5, cover=2.0)
    assert [100, 10, 128, 40] in plain["boxes"].tolist() and [100, 10, 140, 40] not in plain["boxes"].tolist()
    # The image's own borders are not inner edges: a box against x = 224 is not cut, so a
    # larger box of its class (IoU 0.37, under the NMS threshold) does not replace it.
    edge = merge_tiles([_dets(), _dets((100, 0, 128, 30, 0.5, 1), (90, 0, 128, 60, 0.4, 1))], windows, (128, 224))
    np.testing.assert_allclose(edge["boxes"], [[196, 0, 224, 30], [186, 0, 224, 60]])
    empty = merge_tiles([_dets(), _dets()], windows, (128, 224))
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == np.int32


# --- with a trained detector -------------------------------------------------------

TILE, OVERLAP = 128, 0.25  # windows start every 96 pixels
HEIGHT, WIDTH = 224, 320  # 2 x 3 windows: x in [0, 128), [96, 224), [192, 320); y in [0, 128), [96, 224)


def _paint(frames, seed=0):
    """A grey, lightly noisy HEIGHT x WIDTH image with one shape in each (label, x0, y0, x1, y1)
    frame, as the shapes dataset draws them; returns (image, tight boxes [M, 4])."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(50, 4, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
    boxes = []
    for k, (label, *frame) in enumerate(frames):
        mask, r, c = rasterize(label, rng, *frame)
        image[r : r + mask.shape[0], c : c + mask.shape[1]][mask] = _PALETTE[k % 6]
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        boxes.append([c + cols[0], r + rows[0], c + cols[-1] + 1, r + rows[-1] + 1])
    return image, np.asarray(boxes, np.float64)


def _iou(a, b):
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), -1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


@pytest.fixture(scope="module")
def detector(trained):
    """(tiled detection of an image, the model's own prediction of one window) with the trained run."""
    model, variables, _, _ = jobs.load_trained(trained)
    predict = jax.jit(uint8_predict_fn(model, score_thresh=0.5))

    def window_prediction(window: np.ndarray) -> dict:
        canvas, size, scale = fit_to_canvas(np.ascontiguousarray(window), (TILE, TILE))
        dets = jax.device_get(predict(variables, canvas[None], size[None]))
        return image_detections(dets, 0, scale, window.shape[:2])

    def tiled(image):
        return detect_tiled(image, lambda ws: [window_prediction(w) for w in ws], TILE, OVERLAP, nms_thresh=0.5)

    return tiled, window_prediction


def _per_window(image, window_prediction):
    """Every window's own prediction, mapped back to the image, by decreasing score: no merge."""
    found = []
    for x0, y0, x1, y1 in tile_windows(HEIGHT, WIDTH, TILE, OVERLAP):
        dets = window_prediction(image[y0:y1, x0:x1].copy())
        found += [(b + [x0, y0, x0, y0], s, lab) for b, s, lab in zip(dets["boxes"], dets["scores"], dets["labels"])]
    found.sort(key=lambda d: -d[1])
    return np.array([d[0] for d in found]).reshape(-1, 4), np.array([d[1] for d in found]), [d[2] for d in found]


def _same_class_hits(objects, boxes, labels):
    """Per object: detections of its best-matching detection's class that overlap it (IoU >= 0.1)."""
    iou = _iou(objects, np.asarray(boxes, np.float64))
    labels = np.asarray(labels)
    return np.array([((iou[k] >= 0.1) & (labels == labels[iou[k].argmax()])).sum() for k in range(len(objects))])


# Rectangles and ellipses: the shapes the test detector finds best. (label, centre x, centre y)
INSIDE = [(1, 48, 48), (2, 160, 48), (1, 272, 48), (2, 48, 176), (1, 160, 176), (2, 272, 176)]


def test_objects_inside_one_window_are_its_own_predictions_mapped_back(detector):
    tiled, window_prediction = detector
    # One shape in the middle of each window's own part, 30 pixels or more from every overlap.
    image, objects = _paint([(label, x - 17, y - 17, x + 17, y + 17) for label, x, y in INSIDE])
    merged = tiled(image)
    boxes, scores, labels = _per_window(image, window_prediction)
    assert (_iou(objects, boxes).max(1) >= 0.5).all()  # each object is found by its own window
    np.testing.assert_allclose(merged["boxes"], boxes, atol=1e-3)
    np.testing.assert_allclose(merged["scores"], scores, atol=1e-6)
    assert merged["labels"].tolist() == labels


def test_objects_on_window_borders_are_found_once(detector):
    tiled, window_prediction = detector
    # Across the inner edges x = 96, 128, 192, 224 and y = 96, 128, and inside overlaps.
    frames = [
        (1, 80, 20, 112, 52),  # across x = 96
        (2, 112, 40, 144, 72),  # across x = 128
        (1, 178, 24, 208, 54),  # across x = 192
        (2, 210, 140, 244, 174),  # across x = 224
        (1, 20, 82, 52, 114),  # across y = 96
        (2, 140, 114, 172, 146),  # across y = 128
        (1, 260, 100, 292, 124),  # inside the overlap y in [96, 128)
    ]
    image, objects = _paint(frames, seed=1)
    boxes, _, labels = _per_window(image, window_prediction)
    assert (_same_class_hits(objects, boxes, labels) >= 2).sum() >= 4  # unmerged, the windows see them twice
    merged = tiled(image)
    assert (_iou(objects, merged["boxes"].astype(np.float64)).max(1) >= 0.5).all()  # every object is found ...
    assert (_same_class_hits(objects, merged["boxes"], merged["labels"]) == 1).all()  # ... once


def test_tiled_predict_and_eval_through_the_command_line(detector, trained, voc, tmp_path, capsys):
    tiled, _ = detector
    image, _ = _paint([(1, 80, 20, 112, 52), (2, 150, 150, 190, 190)], seed=2)
    Image.fromarray(image).save(tmp_path / "big.png")
    out = tmp_path / "tiled"
    argv = ["predict", str(tmp_path / "big.png"), "--checkpoint", str(trained), "--out", str(out), "--no-progress"]
    code, _, err = run_cli(*argv, "--tile", TILE, "--overlap", OVERLAP, "--batch-size", 4)  # as a user runs it
    assert code == 0, err
    (entry,) = json.loads((out / "detections.json").read_text())
    expected = tiled(image)  # the same windows, one at a time, merged
    assert len(expected["scores"]) >= 2
    np.testing.assert_allclose([d["box_xyxy"] for d in entry["detections"]], expected["boxes"], atol=0.01)
    assert [d["label"] for d in entry["detections"]] == expected["labels"].tolist()

    # A tile larger than every image is the whole image: the same AP as eval without --tile.
    capsys.readouterr()
    argv = ["eval", "--data", f"voc:{voc[0]}", "--checkpoint", str(trained), "--no-progress"]
    assert cli.main(argv) == 0
    whole = json.loads(capsys.readouterr().out)
    assert cli.main([*argv, "--tile", "1024"]) == 0
    tiled = json.loads(capsys.readouterr().out)
    assert (tiled["tile"], tiled["overlap"]) == (1024, 0.25)
    for key in ("AP", "AP50", "AP75"):
        assert tiled[key] == pytest.approx(whole[key], abs=1e-6), key


def test_bad_tiling_is_refused_before_anything_is_written(tmp_path):
    for call in (
        lambda: jobs.predict_files([tmp_path / "x.png"], tmp_path / "run", tmp_path / "out", tile=64, overlap=1.5),
        lambda: jobs.evaluate_checkpoint(tmp_path / "run", "shapes", tile=0),
    ):
        with pytest.raises(jobs.JobError, match=r"--tile (64 --overlap 1.5: overlap must be in \[0, 1\)|0 --overlap)"):
            call()
    assert not (tmp_path / "out").exists()
