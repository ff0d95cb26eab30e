"""Drawings: pixel-exact boxes in the saved PNG, filtering, grids, denormalize."""

import numpy as np
import pytest
from PIL import Image

from lucid_jax.data.transforms import normalize
from lucid_jax.viz import class_color, denormalize, draw_detections, save_detections, save_detections_grid

CLASS_NAMES = ["background", "cat", "dog", "car"]
H, W = 120, 200


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)  # [H, W, 3]


def rgb255(label: int) -> np.ndarray:
    return np.round(np.asarray(class_color(label)) * 255).astype(int)


def is_color(pixels: np.ndarray, color: np.ndarray, tol: int = 3) -> np.ndarray:
    return np.abs(pixels - color).max(axis=-1) <= tol


def prediction(boxes, labels, scores, valid=None) -> dict:
    boxes = np.asarray(boxes, np.float32)
    valid = np.ones(len(boxes), bool) if valid is None else np.asarray(valid)
    return {"boxes": boxes, "labels": np.asarray(labels), "scores": np.asarray(scores, np.float32), "valid": valid}


def test_box_edges_are_drawn_in_the_class_color_at_the_box_pixels(tmp_path):
    x1, y1, x2, y2 = 40, 50, 180, 100
    path = tmp_path / "one.png"
    save_detections(np.zeros((H, W, 3), np.uint8), prediction([[x1, y1, x2, y2]], [3], [0.93]), path, CLASS_NAMES)
    png = read_png(path)
    assert png.shape == (H, W, 3)
    car = rgb255(3)
    # The 2 pt (2.8 px) edge is centred on the boundary between two pixel rows or
    # columns and covers both. The top edge is checked right of the label text.
    assert is_color(png[[y1 - 1, y1], 110:175], car).all()
    assert is_color(png[[y2 - 1, y2], x1 + 5 : x2 - 5], car).all()
    assert is_color(png[y1 + 5 : y2 - 5][:, [x1 - 1, x1]], car).all()
    assert is_color(png[y1 + 5 : y2 - 5][:, [x2 - 1, x2]], car).all()
    # Inside the (unfilled) box and far from it the image stays black.
    assert (png[y1 + 5 : y2 - 5, x1 + 5 : x2 - 5] == 0).all()
    assert (png[y2 + 5 :, :] == 0).all() and (png[:, : x1 - 5] == 0).all()
    # The "car 0.93" label sits above the box on a class-coloured background.
    assert is_color(png[y1 - 12 : y1 - 2, x1 : x1 + 40], car).any()


def test_invalid_and_low_scoring_detections_are_not_drawn(tmp_path):
    boxes = [[10, 30, 60, 80], [80, 30, 130, 80], [140, 30, 190, 80]]
    pred = prediction(boxes, [1, 2, 3], [0.9, 0.95, 0.2], valid=[True, False, True])
    ax = draw_detections(
        np.zeros((H, W, 3), np.uint8),
        pred["boxes"],
        pred["labels"],
        pred["scores"],
        pred["valid"],
        CLASS_NAMES,
        score_thresh=0.5,
    )
    assert len(ax.patches) == 1 and [t.get_text() for t in ax.texts] == ["cat 0.90"]
    path = tmp_path / "filtered.png"
    ax.figure.savefig(path, dpi=ax.figure.dpi)
    png = read_png(path)
    assert is_color(png[60, [9, 10]], rgb255(1)).all()  # the left edge of the kept box
    assert (png[:, 75:] == 0).all()  # the invalid and the low-scoring boxes left no trace


def test_float_images_in_unit_range_are_shown_unscaled(tmp_path):
    image = np.full((H, W, 3), 0.5, np.float32)
    path = tmp_path / "gray.png"
    save_detections(image, prediction(np.zeros((0, 4)), [], []), path)
    assert np.abs(read_png(path) - 128).max() <= 1


def test_grid_has_one_native_size_cell_per_image_and_dashed_ground_truth(tmp_path):
    n, h, w = 3, 64, 96
    images = np.zeros((n, h, w, 3), np.uint8)
    boxes = np.zeros((n, 2, 4), np.float32)
    boxes[2, 0] = [20, 20, 70, 50]  # image 2 sits in row 1, column 0 of a 2-column grid
    preds = {
        "boxes": boxes,
        "labels": np.full((n, 2), 2),
        "scores": np.full((n, 2), 0.8, np.float32),
        "valid": np.zeros((n, 2), bool),
    }
    preds["valid"][2, 0] = True
    targets = {
        "boxes": np.tile(np.asarray([[[10, 10, 80, 40]]], np.float32), (n, 1, 1)),
        "labels": np.ones((n, 1), int),
        "valid": np.asarray([[True], [False], [False]]),
    }
    path = tmp_path / "grid.png"
    save_detections_grid(images, preds, path, CLASS_NAMES, targets=targets, ncols=2)
    png = read_png(path)
    assert png.shape == (2 * h, 2 * w, 3)

    cell_2 = png[h:, :w]
    assert is_color(cell_2[30:45][:, [19, 20]], rgb255(2)).all()
    assert (png[:h, w:] == 0).all()  # image 1: no valid prediction and no valid ground truth

    # Image 0's ground truth is dashed: its bottom edge is partly, not wholly, coloured.
    edge = is_color(png[:h, :w][[39, 40], 12:78], rgb255(1), tol=40).any(axis=0)
    assert 0.2 < edge.mean() < 0.9


def test_grid_accepts_normalized_model_inputs(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 64, 3), dtype=np.uint8)
    inputs = np.stack([normalize(im) for im in images])  # [N, H, W, 3], as the Loader's batches
    empty = {
        "boxes": np.zeros((2, 1, 4)),
        "labels": np.ones((2, 1), int),
        "scores": np.zeros((2, 1)),
        "valid": np.zeros((2, 1), bool),
    }
    path = tmp_path / "inputs.png"
    save_detections_grid(inputs, empty, path, normalized=True, ncols=4)
    np.testing.assert_array_equal(read_png(path), np.concatenate(list(images), axis=1))


def test_denormalize_inverts_normalize():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    hwc = normalize(image)  # [H, W, 3], as the Loader's batches hold it
    out = denormalize(hwc)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(denormalize(np.stack([hwc, hwc])), np.stack([image, image]))


def test_bad_image_shape_is_explained():
    with pytest.raises(ValueError, match="denormalize"):
        draw_detections(np.zeros((3, H, W), np.float32), np.zeros((0, 4)), [], [])
