"""lucid_jax.inference: the host-side mapping to image pixels against a float64 loop, the
COCO rows, and the channels-last entry point against Lucid's layout on one detector."""

import jax
import numpy as np
import pytest

from lucid_jax.inference import (
    check_canvas,
    coco_rows,
    image_detections,
    make_predict_fn,
    to_image_pixels,
    uint8_predict_fn,
    unpad_detections,
)
from tests.models.conftest import random_images, tiny_detector


def _reference_pixels(boxes, scale, image_hw):
    """A float64 loop: divide by the scale, then clip each coordinate to the image."""
    sy, sx = scale
    h, w = image_hw
    out = []
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64):
        row = [x1 / sx, y1 / sy, x2 / sx, y2 / sy]
        limits = [w, h, w, h]
        out.append([min(max(v, 0.0), lim) for v, lim in zip(row, limits)])
    return np.asarray(out, np.float64).reshape(-1, 4)


def test_to_image_pixels_divides_by_the_scale_and_clips_to_the_image():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(-40, 300, (50, 4)).astype(np.float32)  # many past the image's edges
    boxes[:, 2:] = boxes[:, :2] + rng.uniform(0, 120, (50, 2))
    scale, image_hw = (0.75, 0.5), (333, 417)
    got = to_image_pixels(boxes, scale, image_hw)
    assert got.dtype == np.float32 and got.shape == (50, 4)
    np.testing.assert_allclose(got, _reference_pixels(boxes, scale, image_hw), rtol=1e-6, atol=1e-4)
    assert (got[:, [0, 2]] <= 417).all() and (got[:, [1, 3]] <= 333).all() and (got >= 0).all()
    assert ((got == 0) | (got == 417) | (got == 333)).any(), "the case needs boxes that clipping changes"
    assert to_image_pixels(np.zeros((0, 4)), scale, image_hw).shape == (0, 4)


def test_image_detections_keeps_valid_foreground_above_the_threshold():
    dets = {
        "boxes": np.array([[[10, 20, 50, 60], [0, 0, 500, 500], [5, 5, 9, 9], [1, 1, 2, 2]]], np.float32),
        "scores": np.array([[0.9, 0.6, 0.3, 0.0]], np.float32),
        "labels": np.array([[2, 1, 3, 0]], np.int32),
        "valid": np.array([[True, True, True, False]]),
    }
    found = image_detections(dets, 0, (2.0, 2.0), (100, 120), score_thresh=0.5)
    np.testing.assert_array_equal(found["labels"], [2, 1])
    np.testing.assert_array_equal(found["scores"], np.float32([0.9, 0.6]))
    np.testing.assert_array_equal(found["boxes"], [[5, 10, 25, 30], [0, 0, 120, 100]])  # the second one clipped
    assert found["labels"].dtype == np.int32 and found["boxes"].dtype == np.float32


def test_unpad_detections_maps_each_real_row_with_its_own_scale():
    dets = {
        "boxes": np.tile(np.array([[[8, 8, 40, 24]]], np.float32), (3, 1, 1)),
        "scores": np.full((3, 1), 0.7, np.float32),
        "labels": np.ones((3, 1), np.int32),
        "valid": np.ones((3, 1), bool),
    }
    batch = {
        "scales": np.array([[0.5, 0.5], [2.0, 1.0], [1.0, 1.0]], np.float32),
        "image_sizes": np.array([[32, 32], [64, 30], [64, 64]], np.float32),
        "image_valid": np.array([True, True, False]),
    }
    out = unpad_detections(dets, batch)
    assert len(out) == 2  # the padding row is dropped
    np.testing.assert_array_equal(out[0]["boxes"], [[16, 16, 64, 48]])
    np.testing.assert_array_equal(out[1]["boxes"], [[8, 4, 30, 12]])  # x2 clipped to the 30-px-wide image


def test_coco_rows_are_xywh_with_the_category_map():
    found = {"boxes": np.array([[1.5, 2.0, 4.0, 8.5]], np.float32), "scores": np.array([0.25]), "labels": [3]}
    assert coco_rows(7, found) == [{"image_id": 7, "category_id": 3, "bbox": [1.5, 2.0, 2.5, 6.5], "score": 0.25}]
    assert coco_rows(7, found, {3: 90})[0]["category_id"] == 90


def test_check_canvas_names_the_multiple():
    model = tiny_detector()
    assert check_canvas(model, (64, 96), None) == (64, 96)
    with pytest.raises(ValueError, match="canvas must be positive multiples of 32, got \\(64, 100\\)"):
        check_canvas(model, (64, 100), 1)
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        check_canvas(model, (64, 96), 0)


def test_channels_last_is_the_same_computation_as_lucids_layout():
    """The Loader's [B, H, W, 3] through ``channels_last=True`` gives what [B, 3, H, W] gives:
    predictions and training losses, bit for bit (no transpose on the way changes a value)."""
    model = tiny_detector()
    nchw = random_images(3, batch=2)
    nhwc = nchw.transpose(0, 2, 3, 1).copy()
    variables = jax.jit(model.init)(jax.random.key(0), nchw)
    sizes = np.array([[128, 128], [96, 112]], np.float32)
    want = make_predict_fn(model, score_thresh=0.0)(variables, nchw, sizes)
    got = make_predict_fn(model, score_thresh=0.0, channels_last=True)(variables, nhwc, sizes)
    assert int(want["valid"].sum()) > 10
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)

    targets = {
        "boxes": np.array([[[10, 10, 60, 70], [0, 0, 0, 0]], [[20, 30, 90, 80], [5, 5, 40, 50]]], np.float32),
        "labels": np.array([[1, 0], [2, 3]], np.int32),
        "valid": np.array([[True, False], [True, True]]),
    }

    def loss(x, channels_last):
        losses, _ = jax.jit(
            lambda v, x: model.apply(
                v,
                x,
                targets,
                sizes,
                method="loss",
                channels_last=channels_last,
                rngs={"dropout": jax.random.key(1), "sampling": jax.random.key(2)},
                mutable=["batch_stats"],
            )
        )(variables, x)
        return {k: float(v) for k, v in losses.items()}

    assert loss(nhwc, True) == loss(nchw, False)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\] with channels_last=True, got \(2, 3, 128, 128\)"):
        model.apply(variables, nchw, method="predict", channels_last=True)


def test_uint8_predict_fn_zeroes_the_padding():
    """What the artifact adds to predict: normalisation, and padding that is 0 after it."""
    from lucid_jax.data import IMAGENET_MEAN, IMAGENET_STD

    captured = {}

    class Recorder:
        def apply(self, variables, x, sizes, method, **kwargs):
            captured.update(x=np.asarray(x), sizes=np.asarray(sizes), kwargs=kwargs)
            return {}

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    sizes = np.array([[64, 96], [40, 70]], np.int32)
    uint8_predict_fn(Recorder())({}, images, sizes)
    x = captured["x"]  # [2, 64, 96, 3]: channels-last from the file to the model, no transpose
    assert captured["kwargs"] == {"channels_last": True}
    want = (images / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x[1, :40, :70], want[1, :40, :70], rtol=1e-5, atol=1e-5)
    assert not x[1, 40:].any() and not x[1, :, 70:].any()
    np.testing.assert_array_equal(captured["sizes"], sizes)
