"""Drawings: pixel-exact boxes in the saved PNG, filtering, grids, denormalize."""

import numpy as np
import pytest
from PIL import Image

from lucid_jax.data.transforms import normalize
from lucid_jax.viz import (
    class_color,
    denormalize,
    draw_detections,
    fit_for_drawing,
    save_detections,
    save_detections_grid,
)

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


def _text_extents(ax):
    """Each label's rendered box [x0, x1] x [y0, y1] in figure pixels, y up (Agg renders)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = ax.get_figure(root=True)
    renderer = FigureCanvasAgg(figure).get_renderer()
    return [t.get_window_extent(renderer) for t in ax.texts]


def test_labels_at_the_image_edges_are_drawn_inside_it():
    # A detection against the right edge and the top, and ground truth in the bottom-right corner.
    ax = draw_detections(
        np.zeros((H, W, 3), np.uint8),
        [[185, 0, 200, 30]],
        [3],
        [0.93],
        class_names=CLASS_NAMES,
        gt_boxes=[[170, 90, 200, 120]],
        gt_labels=[2],
    )
    extents = _text_extents(ax)
    assert len(extents) == 2
    for box in extents:  # figure pixels, one per image pixel
        assert box.x0 >= 0 and box.x1 <= W and box.y0 >= 0 and box.y1 <= H, box


def test_ground_truth_labels_are_readable_on_their_own_colour(tmp_path):
    """Never blue on blue: white text on a dark box, at the predictions' size."""
    blue = rgb255(1)
    image = np.tile(blue.astype(np.uint8), (H, W, 1))
    ax = draw_detections(image, np.zeros((0, 4)), [], [], gt_boxes=[[20, 20, 180, 100]], gt_labels=[1])
    (label,) = ax.texts
    assert label.get_color() == "white" and label.get_fontsize() >= 8
    path = tmp_path / "gt.png"
    ax.get_figure(root=True).savefig(path, dpi=100)
    (box,) = _text_extents(ax)
    region = read_png(path)[H - int(box.y1) : H - int(box.y0), int(box.x0) : int(box.x1)]
    brightness = region.mean(axis=-1)
    assert (brightness > 160).sum() >= 10  # the text's white strokes (antialiased)
    assert (brightness < 0.5 * blue.mean()).mean() > 0.3  # on a box much darker than the blue around it


def test_grid_legend_is_a_band_below_unchanged_cells(tmp_path):
    n, h, w = 2, 64, 96
    images = np.full((n, h, w, 3), 90, np.uint8)
    preds = {"boxes": np.zeros((n, 1, 4)), "labels": np.ones((n, 1), int), "scores": np.ones((n, 1))}
    preds["valid"] = np.zeros((n, 1), bool)
    save_detections_grid(images, preds, tmp_path / "plain.png", ncols=2)
    save_detections_grid(images, preds, tmp_path / "legend.png", ncols=2, legend=True)
    plain, legend = read_png(tmp_path / "plain.png"), read_png(tmp_path / "legend.png")
    assert legend.shape == (h + 30, 2 * w, 3)
    np.testing.assert_array_equal(legend[:h], plain)
    band = legend[h:]
    assert (band.min(axis=-1) > 200).sum() > 50  # the white legend text and line samples


def test_big_images_are_drawn_shrunk_to_max_side_with_their_boxes(tmp_path):
    image = np.zeros((300, 400, 3), np.uint8)
    image[:, 200:] = 255
    small, boxes = fit_for_drawing(image, [[100, 50, 300, 250]], 200)
    assert small.shape == (150, 200, 3)
    np.testing.assert_allclose(boxes, [[50, 25, 150, 125]])
    assert (small[:, :100] == 0).all() and (small[:, 100:] == 255).all()  # block averages of whole halves
    same, unchanged = fit_for_drawing(image, [[1, 2, 3, 4]], 400)
    assert same is image and unchanged.tolist() == [[1, 2, 3, 4]]
    path = tmp_path / "shrunk.png"
    save_detections(image, prediction([[100, 50, 300, 250]], [3], [0.9]), path, CLASS_NAMES, max_side=200)
    png = read_png(path)
    assert png.shape == (150, 200, 3)
    assert is_color(png[60:110][:, [49, 50]], rgb255(3)).all()  # the left edge, at x = 100 / 2


def test_boxes_lower_than_their_label_are_drawn_without_one():
    """A crowd of small boxes (or a big image drawn shrunk) stays visible: no label hides them."""
    pred = prediction([[10, 10, 30, 22], [50, 10, 120, 60]], [1, 3], [0.8, 0.9])
    ax = draw_detections(
        np.zeros((H, W, 3), np.uint8), pred["boxes"], pred["labels"], pred["scores"], None, CLASS_NAMES
    )
    assert len(ax.patches) == 2 and [t.get_text() for t in ax.texts] == ["car 0.90"]
    small, large = sorted(ax.patches, key=lambda p: p.get_width())
    assert small.get_linewidth() < large.get_linewidth() == 2.0
