"""Large-scale jitter: boxes move exactly with the pixels (float64 reference and
painted rectangles), partial boxes are clipped or dropped, and the loader stays
seeded and resumable."""

import numpy as np
import pytest

from lucid_jax.data import IMAGENET_MEAN, IMAGENET_STD, Loader, ShapesDataset, collate
from lucid_jax.data.jitter import MIN_VISIBLE, Jitter, draw_jitter, jitter_boxes, jitter_preprocess


def _reference(boxes, h, w, j: Jitter, min_visible):
    """One box at a time in float64: scale, shift, clip to the window, keep, mirror."""
    out, keep = [], []
    (nh, nw), (y0, x0), (wh, ww) = j.size, j.origin, j.window
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64):
        sx, sy = nw / w, nh / h
        a = [x1 * sx - x0, y1 * sy - y0, x2 * sx - x0, y2 * sy - y0]
        c = [min(max(a[0], 0), ww), min(max(a[1], 0), wh), min(max(a[2], 0), ww), min(max(a[3], 0), wh)]
        area = (a[2] - a[0]) * (a[3] - a[1])
        kept = (c[2] - c[0]) * (c[3] - c[1])
        keep.append(kept > 0 and kept >= min_visible * area)
        if j.flip:
            c = [ww - c[2], c[1], ww - c[0], c[3]]
        out.append(c)
    return np.array(out).reshape(-1, 4), np.array(keep, bool)


@pytest.mark.parametrize("seed", range(12))
def test_boxes_match_a_float64_reference(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(40, 400)), int(rng.integers(40, 400))
    xy = rng.uniform(-0.1, 1.0, (50, 2)) * [w, h]
    wh = rng.uniform(0.01, 0.6, (50, 2)) * [w, h]
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    jitter = draw_jitter(rng, h, w, (128, 192))
    got, keep = jitter_boxes(boxes, h, w, jitter)
    want, want_keep = _reference(boxes, h, w, jitter, MIN_VISIBLE)
    np.testing.assert_allclose(got, want, atol=2e-4 * max(jitter.size))
    np.testing.assert_array_equal(keep, want_keep)


def test_draws_cover_the_scale_range_and_crop_inside_the_image():
    rng = np.random.default_rng(0)
    factors, crops, flips = [], 0, 0
    for _ in range(400):
        j = draw_jitter(rng, 300, 200, (128, 128))
        factors.append(j.size[0] / 300 / (128 / 300))  # relative to "fits the canvas"
        (nh, nw), (y0, x0), (wh, ww) = j.size, j.origin, j.window
        assert 0 <= y0 <= max(nh - 128, 0) and 0 <= x0 <= max(nw - 128, 0)
        assert (wh, ww) == (min(nh - y0, 128), min(nw - x0, 128))
        crops += nh > 128
        flips += j.flip
    assert 0.5 - 0.01 <= min(factors) < 0.55 and 1.95 < max(factors) <= 2.0 + 0.01
    assert 150 < crops < 300 and 150 < flips < 250  # P(s > 1) = 2/3 for U[0.5, 2]; flips at p = 0.5


def _painted(h, w, boxes):
    image = np.zeros((h, w, 3), np.uint8)
    for x1, y1, x2, y2 in boxes.astype(int):
        image[y1:y2, x1:x2] = 255
    return image


@pytest.mark.parametrize("seed", range(8))
def test_boxes_move_with_the_pixels(seed):
    """White rectangles on black: after jitter, the white pixels are exactly the moved
    boxes, up to the resize's blur within 1.5 px of their edges."""
    h, w, canvas = 180, 240, (160, 160)
    boxes = np.array([[20, 30, 80, 90], [150, 40, 230, 160], [100, 120, 140, 170]], np.float32)
    example = {"image": _painted(h, w, boxes), "boxes": boxes, "labels": np.array([1, 2, 3])}
    out = jitter_preprocess(example, np.random.default_rng(seed), canvas=canvas)
    jitter = draw_jitter(np.random.default_rng(seed), h, w, canvas)  # the same draw
    moved, _ = jitter_boxes(boxes, h, w, jitter, min_visible=0.0)  # every box, kept or not, as painted
    red = out["image"][..., 0]  # [Hc, Wc], normalised
    black, white = -IMAGENET_MEAN[0] / IMAGENET_STD[0], (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    wh, ww = out["image_size"].astype(int)
    assert (wh, ww) == jitter.window and not red[wh:].any() and not red[:, ww:].any()  # padding: 0
    centres_y, centres_x = np.mgrid[0 : canvas[0], 0 : canvas[1]] + 0.5
    inside = np.zeros(canvas, bool)
    near_edge = np.zeros(canvas, bool)
    for x1, y1, x2, y2 in moved:
        if x2 <= x1 or y2 <= y1:
            continue
        inside |= (centres_x > x1) & (centres_x < x2) & (centres_y > y1) & (centres_y < y2)
        grow = (centres_x > x1 - 1.5) & (centres_x < x2 + 1.5) & (centres_y > y1 - 1.5) & (centres_y < y2 + 1.5)
        shrink = (centres_x > x1 + 1.5) & (centres_x < x2 - 1.5) & (centres_y > y1 + 1.5) & (centres_y < y2 - 1.5)
        near_edge |= grow & ~shrink
    content = np.zeros(canvas, bool)
    content[:wh, :ww] = True
    is_white = red > (black + white) / 2
    wrong = (is_white != inside) & content & ~near_edge
    assert not wrong.any(), f"{wrong.sum()} pixels disagree with the moved boxes"
    assert is_white[content & inside & ~near_edge].all() and inside.any()
    np.testing.assert_array_equal(out["boxes"], moved[jitter_boxes(boxes, h, w, jitter)[1]])


def test_partly_cropped_boxes_are_clipped_or_dropped_and_empty_images_stay_valid():
    h, w = 100, 100
    jitter = Jitter(size=(200, 200), origin=(0, 0), window=(100, 100), flip=False)  # x2, keep the top-left quarter
    boxes = np.array([[10, 10, 40, 40], [40, 10, 70, 40], [45, 10, 60, 40], [60, 60, 90, 90]], np.float32)
    got, keep = jitter_boxes(boxes, h, w, jitter)
    # scaled: [20, 80], [80, 140] (1/3 visible), [90, 120] (1/3 visible), [120, 180] (outside)
    np.testing.assert_allclose(got[0], [20, 20, 80, 80])
    np.testing.assert_allclose(got[1], [80, 20, 100, 80])
    assert keep.tolist() == [True, True, True, False]
    _, keep_half = jitter_boxes(boxes, h, w, jitter, min_visible=0.5)
    assert keep_half.tolist() == [True, False, False, False]
    # every box outside the window: an all-negative example that still collates
    rng = np.random.default_rng(3)
    example = {"image": np.zeros((100, 100, 3), np.uint8), "boxes": boxes[3:], "labels": np.array([1])}
    for _ in range(20):
        out = jitter_preprocess(example, rng, canvas=64)
        if not len(out["boxes"]):
            break
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    batch = collate([out, out], max_boxes=4)
    assert not batch["valid"].any() and batch["images"].shape == (2, 64, 64, 3)


def test_the_jittered_loader_is_seeded_and_resumes_bit_identically():
    dataset = ShapesDataset(num_examples=12, seed=0, image_size=(96, 160))
    loader = lambda: Loader(
        dataset,
        4,
        transform=lambda ex, rng: jitter_preprocess(ex, rng, canvas=128),
        max_boxes=6,
        shuffle=True,
        seed=7,
        num_workers=2,
    )
    straight = list(loader().iterate(0, 7))
    resumed = list(loader().iterate(4, 3))
    for a, b in zip(straight[4:], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    first = straight[0]["images"]
    again = list(loader().iterate(3, 1))[0]["images"]  # the same examples in epoch 1 are jittered anew
    assert not np.array_equal(first, again)


def test_augment_setting_picks_the_training_transform():
    from lucid_jax.jobs import TrainConfig, make_loader

    dataset = ShapesDataset(num_examples=8, seed=1, image_size=(96, 160))
    batches = {}
    for augment in ("none", "flip", "jitter"):
        config = TrainConfig(augment=augment, batch_size=8, num_workers=0)
        batches[augment] = next(make_loader(dataset, config, train=True, max_boxes=6).iterate(0, 1))
    # none and flip fit every 160x96 image to 128x77; jitter draws a new size per image
    assert {tuple(s) for s in batches["none"]["image_sizes"]} == {(77, 128)}
    assert {tuple(s) for s in batches["flip"]["image_sizes"]} == {(77, 128)}
    assert len({tuple(s) for s in batches["jitter"]["image_sizes"]}) > 4
    assert not np.array_equal(batches["none"]["images"], batches["flip"]["images"])
    evaluation = make_loader(dataset, TrainConfig(augment="jitter", batch_size=8, num_workers=0), train=False)
    assert {tuple(s) for s in next(evaluation.iterate(0, 1))["image_sizes"]} == {(77, 128)}  # never in eval
