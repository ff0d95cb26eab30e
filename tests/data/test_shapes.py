"""The synthetic shapes dataset: determinism, exact boxes measured on the pixels, classes."""

import time

import numpy as np
import pytest

from lucid_jax.data import Dataset, ShapesDataset
from lucid_jax.data.shapes import ELLIPSE, RECTANGLE, TRIANGLE, rasterize


def _assert_same(a, b):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["boxes"], b["boxes"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_follows_the_dataset_protocol():
    ds = ShapesDataset(num_examples=3)
    ex = ds[0]
    assert isinstance(ds, Dataset) and len(ds) == 3 and ds.class_names == ("rectangle", "ellipse", "triangle")
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (128, 128, 3)
    assert ex["boxes"].dtype == np.float32 and ex["labels"].dtype == np.int32 and ex["difficult"].dtype == bool
    assert ex["id"] == 0 and not ex["difficult"].any()


def test_same_index_gives_the_same_example_in_any_order():
    ds = ShapesDataset(num_examples=20, seed=3)
    later = [ds[i] for i in (7, 2, 7)]
    _assert_same(later[0], later[2])
    _assert_same(later[0], ShapesDataset(num_examples=20, seed=3)[7])
    assert not np.array_equal(later[0]["image"], later[1]["image"])


def test_different_seeds_differ():
    a, b = ShapesDataset(seed=0)[4], ShapesDataset(seed=1)[4]
    assert not np.array_equal(a["image"], b["image"])
    assert a["boxes"].shape != b["boxes"].shape or not np.array_equal(a["boxes"], b["boxes"])


def test_boxes_tightly_bound_the_drawn_pixels():
    # Plain background and boxes that never overlap: every non-background pixel inside a
    # box belongs to that box's object, so the box can be measured on the image alone.
    ds = ShapesDataset(num_examples=40, image_size=(96, 80), max_objects=5, noise=0.0, max_overlap=0.0, seed=7)
    for i in range(len(ds)):
        ex = ds[i]
        image, boxes = ex["image"].astype(int), ex["boxes"]
        values, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        foreground = (image != values[np.argmax(counts)]).any(-1)
        assert len(boxes) >= 1
        np.testing.assert_array_equal(boxes, np.round(boxes))  # pixel-aligned, since measured on pixels
        covered = np.zeros_like(foreground)
        for x1, y1, x2, y2 in boxes.astype(int):
            inside = foreground[y1:y2, x1:x2]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any(), (
                i,
                x1,
                y1,
                x2,
                y2,
            )
            covered[y1:y2, x1:x2] = True
        assert not (foreground & ~covered).any(), f"example {i}: drawn pixels outside every box"


def test_masks_match_boxes_and_painted_pixels_with_overlap_and_noise():
    ds = ShapesDataset(num_examples=30, max_objects=6, max_overlap=0.3, seed=11)
    for i in range(len(ds)):
        ex, masks = ds[i], ds.masks(i)
        assert masks.shape == (len(ex["boxes"]), 128, 128)
        visible = masks.copy()
        for k in range(len(masks) - 1, -1, -1):  # later objects are painted over earlier ones
            visible[k] &= ~masks[k + 1 :].any(0)
        for k, mask in enumerate(masks):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            np.testing.assert_array_equal(ex["boxes"][k], [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
            colours = np.unique(ex["image"][visible[k]], axis=0)
            assert len(colours) <= 1, "an object is painted in one solid colour"


def test_class_matches_the_drawn_shape():
    # Fill ratio of the box: 1 for a rectangle, about pi/4 for an ellipse, about 1/2 for a triangle.
    ds = ShapesDataset(num_examples=30, min_object_size=24, seed=5)
    expected = {RECTANGLE: (0.999, 1.0), ELLIPSE: (0.70, 0.86), TRIANGLE: (0.40, 0.62)}
    for i in range(len(ds)):
        ex, masks = ds[i], ds.masks(i)
        for box, label, mask in zip(ex["boxes"], ex["labels"], masks):
            fill = mask.sum() / ((box[2] - box[0]) * (box[3] - box[1]))
            lo, hi = expected[int(label)]
            assert lo <= fill <= hi, (i, int(label), fill)


def test_labels_cover_every_class_evenly_and_counts_respect_the_config():
    ds = ShapesDataset(num_examples=150, min_objects=2, max_objects=4, min_object_size=10, max_object_size=30)
    labels = [ds[i]["labels"] for i in range(len(ds))]
    counts = np.bincount(np.concatenate(labels), minlength=4)
    assert counts[0] == 0 and (counts[1:] > 0.25 * counts.sum()).all(), counts
    assert all(1 <= len(lab) <= 4 for lab in labels) and np.mean([len(lab) for lab in labels]) > 2.5
    boxes = np.concatenate([ds[i]["boxes"] for i in range(20)])
    assert (boxes[:, 2:] - boxes[:, :2]).max() <= 31 and (boxes >= 0).all() and (boxes <= 128).all()


def test_rasterize_rectangle_is_exact_on_pixel_centres():
    mask, row0, col0 = rasterize(RECTANGLE, np.random.default_rng(0), 2.4, 3.6, 7.5, 9.0)
    # Centres 2.5..6.5 in x (cols 2..6) and 4.5..8.5 in y (rows 4..8) are inside.
    rows, cols = np.nonzero(mask)
    assert (row0 + rows.min(), row0 + rows.max(), col0 + cols.min(), col0 + cols.max()) == (4, 8, 2, 6)
    assert mask.sum() == 5 * 5


def test_fast_enough_for_the_demo():
    ds = ShapesDataset(num_examples=100)
    start = time.perf_counter()
    for i in range(100):
        ds[i]
    assert time.perf_counter() - start < 3.0  # several hundred per second on an idle core


def test_bad_config_and_index_raise():
    with pytest.raises(ValueError, match="min_objects"):
        ShapesDataset(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="max_object_size"):
        ShapesDataset(image_size=32, max_object_size=48)
    with pytest.raises(IndexError):
        ShapesDataset(num_examples=2)[2]
