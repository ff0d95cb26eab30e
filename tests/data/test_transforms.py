"""Transforms move boxes with the pixels: a white rectangle is transformed, and its box
must still bound the white pixels. Plus normalisation values, padding and canvas rules."""

import numpy as np
import pytest

from lucid_jax.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    clip_boxes,
    hflip,
    normalize,
    pad_to,
    preprocess,
    random_hflip,
    resize,
    resized_shape,
)


def _white_rectangle():
    """60x80 black image, white at rows 10..29 and cols 20..49: the box [20, 10, 50, 30]."""
    image = np.zeros((60, 80, 3), np.uint8)
    image[10:30, 20:50] = 255
    return image, np.array([[20, 10, 50, 30]], np.float32)


def _bright_box(mask):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def test_resize_upscale_keeps_the_box_exact():
    image, boxes = _white_rectangle()
    out, out_boxes = resize(image, boxes, (120, 160))
    assert out.shape == (120, 160, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out_boxes, [[40, 20, 100, 60]])
    np.testing.assert_array_equal(_bright_box(out.min(-1) > 127), out_boxes[0])


@pytest.mark.parametrize("size", [(37, 50), (45, 101), (75, 61)])
def test_resize_any_scale_keeps_the_box_within_a_pixel(size):
    image, boxes = _white_rectangle()
    out, out_boxes = resize(image, boxes, size)
    sy, sx = size[0] / 60, size[1] / 80
    np.testing.assert_allclose(out_boxes, [[20 * sx, 10 * sy, 50 * sx, 30 * sy]], rtol=1e-6)
    np.testing.assert_allclose(_bright_box(out.min(-1) > 127), out_boxes[0], atol=1.0)


def test_resize_float_images_like_uint8():
    image, boxes = _white_rectangle()
    a, _ = resize(image, boxes, (45, 101))
    b, _ = resize(image.astype(np.float32) / 255, boxes, (45, 101))
    assert b.dtype == np.float32
    np.testing.assert_allclose(b * 255, a, atol=1.5)


def test_resized_shape_modes():
    assert resized_shape(60, 80, longer_side=160) == (120, 160)
    assert resized_shape(480, 640, shorter_side=800, max_size=1333) == (800, 1067)
    assert resized_shape(500, 1500, shorter_side=800, max_size=1333) == (444, 1333)  # capped by the longer side
    assert resized_shape(500, 1500, shorter_side=800) == (800, 2400)
    with pytest.raises(ValueError, match="exactly one"):
        resized_shape(10, 10, longer_side=5, shorter_side=5)


def test_flip_mirrors_pixels_and_boxes():
    image, boxes = _white_rectangle()
    out, out_boxes = hflip(image, boxes)
    np.testing.assert_array_equal(out_boxes, [[30, 10, 60, 30]])  # x -> 80 - x
    np.testing.assert_array_equal(_bright_box(out.min(-1) > 127), out_boxes[0])
    back, back_boxes = hflip(out, out_boxes)
    np.testing.assert_array_equal(back, image)
    np.testing.assert_array_equal(back_boxes, boxes)


def test_random_flip_follows_the_rng():
    image, boxes = _white_rectangle()
    flips = [random_hflip(np.random.default_rng(s), image, boxes)[2] for s in range(40)]
    assert 5 < sum(flips) < 35
    again = [random_hflip(np.random.default_rng(s), image, boxes)[2] for s in range(40)]
    assert flips == again
    assert not random_hflip(np.random.default_rng(0), image, boxes, prob=0.0)[2]


def test_normalize_values():
    image = np.array([[[255, 0, 128]]], np.uint8)
    expected = (np.array([1.0, 0.0, 128 / 255]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(normalize(image)[0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(normalize(image.astype(np.float32) / 255), normalize(image), rtol=1e-6)
    assert normalize(image).dtype == np.float32


def test_pad_bottom_right_and_errors():
    image = np.ones((20, 30, 3), np.float32)
    out = pad_to(image, (32, 64))
    assert out.shape == (32, 64, 3) and out[:20, :30].all() and not out[20:].any() and not out[:, 30:].any()
    with pytest.raises(ValueError, match="does not fit"):
        pad_to(image, (16, 64))


def test_clip_boxes():
    np.testing.assert_array_equal(clip_boxes(np.array([[-5, 2, 90, 70]]), 60, 80), [[0, 2, 80, 60]])


def test_preprocess_moves_boxes_with_pixels_onto_a_fixed_canvas():
    image, boxes = _white_rectangle()
    example = {"image": image, "boxes": boxes, "labels": np.array([2]), "difficult": np.array([True]), "id": "x"}
    flipped = None
    for seed in range(10):  # both flip outcomes
        out = preprocess(example, np.random.default_rng(seed), longer_side=160, flip_prob=0.5, size_divisibility=32)
        assert out["image"].shape == (160, 160, 3) and out["image"].dtype == np.float32
        np.testing.assert_array_equal(out["image_size"], [120, 160])
        np.testing.assert_allclose(out["scale"], [2, 2])
        white = (out["image"] * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)).min(-1) > 0.5
        np.testing.assert_array_equal(_bright_box(white), out["boxes"][0])
        expected = [60, 20, 120, 60] if out["flipped"] else [40, 20, 100, 60]
        np.testing.assert_array_equal(out["boxes"], [expected])
        np.testing.assert_array_equal(out["image"][120:], 0.0)  # padding after normalisation
        assert out["labels"].tolist() == [2] and out["difficult"].tolist() == [True] and out["id"] == "x"
        flipped = {out["flipped"]} | (flipped or set())
    assert flipped == {True, False}


def test_preprocess_canvas_rules_and_box_clipping():
    image = np.zeros((50, 70, 3), np.uint8)
    boxes = np.array([[-4, 5, 20, 60], [80, 0, 90, 10], [10, 10, 20, 20]], np.float32)
    out = preprocess({"image": image, "boxes": boxes, "labels": np.array([1, 2, 3])}, canvas=(64, 96))
    assert out["image"].shape == (64, 96, 3)
    np.testing.assert_array_equal(out["boxes"], [[0, 5, 20, 50], [10, 10, 20, 20]])  # clipped; the outside box dropped
    assert out["labels"].tolist() == [1, 3] and out["difficult"].tolist() == [False, False]
    shorter = preprocess(
        {"image": image, "boxes": boxes, "labels": np.array([1, 2, 3])},
        shorter_side=100,
        max_size=120,
        size_divisibility=32,
    )
    assert shorter["image"].shape == (128, 128, 3)  # canvas from max_size, rounded up to 32
    np.testing.assert_array_equal(shorter["image_size"], [86, 120])
    with pytest.raises(ValueError, match="multiples of 32"):
        preprocess({"image": image, "boxes": boxes, "labels": np.array([1, 2, 3])}, canvas=100, size_divisibility=32)
    with pytest.raises(ValueError, match="size_divisibility to derive it"):
        preprocess({"image": image, "boxes": boxes, "labels": np.array([1, 2, 3])}, longer_side=160)
    with pytest.raises(ValueError, match="needs an rng"):
        preprocess({"image": image, "boxes": boxes, "labels": np.array([1, 2, 3])}, canvas=96, flip_prob=0.5)


def test_preprocess_on_canvas_follows_the_canvases_rule():
    from lucid_jax.data import fit_to_canvas, parse_image_size, preprocess_on_canvas

    image, boxes = _white_rectangle()  # 60x80, aspect 4:3: beyond the square band
    example = {"image": image, "boxes": boxes, "labels": np.array([1])}
    square = preprocess_on_canvas(example, canvases=parse_image_size("64"), size_divisibility=32)
    plain = preprocess(example, canvas=64, longer_side=64, size_divisibility=32)
    for key in ("image", "boxes", "image_size", "scale"):
        np.testing.assert_array_equal(square[key], plain[key], err_msg=key)
    canvases = parse_image_size("32:64")  # landscape 32x64: 60x80 -> 32x43 (shorter side 32)
    out = preprocess_on_canvas(example, canvases=canvases, size_divisibility=32)
    assert out["image"].shape == (32, 64, 3) and out["image_size"].tolist() == [32, 43]
    # on a batch's canvas that is not the image's own, the image still fits
    forced = preprocess_on_canvas(example, canvases=canvases, canvas=(64, 32), size_divisibility=32)
    assert forced["image"].shape == (64, 32, 3) and forced["image_size"].tolist() == [24, 32]
    fitted, size, scale = fit_to_canvas(image, (32, 64), canvases.resized_shape(60, 80))
    assert fitted.shape == (32, 64, 3) and size.tolist() == [32, 43] and not fitted[:, 43:].any()
    with pytest.raises(ValueError, match="not both"):
        preprocess(example, canvas=64, size=(30, 40), longer_side=64)
