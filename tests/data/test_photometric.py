"""Photometric distortion: every step against a float64 per-pixel reference (Python's
``colorsys``), the draws, and the loader: seeded per (seed, epoch, image), the same
under any batching, and the flips of a run without ``color`` unchanged."""

import colorsys

import numpy as np
import pytest

from lucid_jax.data import Loader, ShapesDataset
from lucid_jax.data.photometric import (
    ColorJitter,
    apply_color_jitter,
    draw_color_jitter,
    hsv_to_rgb,
    rgb_to_hsv,
    with_color_jitter,
)
from lucid_jax.data.transforms import preprocess
from lucid_jax.jobs.config import JobError, augment_parts


def _reference(image: np.ndarray, j: ColorJitter) -> np.ndarray:
    """Pixel by pixel in float64, with colorsys's HSV."""
    out = np.empty(image.shape, np.float64)
    for idx in np.ndindex(image.shape[:2]):
        p = image[idx].astype(np.float64)
        if j.brightness is not None:
            p = np.clip(p + j.brightness, 0, 255)
        if j.contrast is not None and j.contrast_first:
            p = np.clip(p * j.contrast, 0, 255)
        if j.saturation is not None or j.hue is not None:
            h, s, v = colorsys.rgb_to_hsv(*(p / 255))
            if j.saturation is not None:
                s = min(max(s * j.saturation, 0.0), 1.0)
            if j.hue is not None:
                h = (h + j.hue / 360) % 1
            p = np.array(colorsys.hsv_to_rgb(h, s, v)) * 255
        if j.contrast is not None and not j.contrast_first:
            p = np.clip(p * j.contrast, 0, 255)
        out[idx] = p
    return out


JITTERS = [
    ColorJitter(20.5, 1.3, True, 1.4, 17.0),
    ColorJitter(-31.0, 0.6, False, 0.5, -18.0),
    ColorJitter(None, None, True, 1.5, None),
    ColorJitter(None, None, False, None, -9.5),
    ColorJitter(12.0, None, False, None, None),
    ColorJitter(None, 1.45, False, None, None),
]


@pytest.mark.parametrize("jitter", JITTERS)
def test_each_step_matches_a_float64_reference(jitter):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    image[0, :4] = [[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0]]  # greys and a pure hue
    got = apply_color_jitter(image, jitter)
    want = _reference(image, jitter)
    assert got.dtype == np.uint8 and got.shape == image.shape
    # Rounded to uint8: the nearest integer, except at a tie (x.5, frequent for integer
    # pixels times 1.5), which float32 and float64 may round either way.
    tie = np.abs(want - np.floor(want) - 0.5) < 1e-3
    np.testing.assert_array_equal(got[~tie], np.rint(want)[~tie])
    assert np.abs(got - want).max() <= 0.5 + 1e-3


def test_hsv_round_trip_and_colorsys():
    rgb = np.random.default_rng(0).random((500, 3))
    hsv = rgb_to_hsv(rgb)
    np.testing.assert_allclose(hsv, [colorsys.rgb_to_hsv(*p) for p in rgb], atol=1e-12)
    np.testing.assert_allclose(hsv_to_rgb(hsv), rgb, atol=1e-12)


def test_draws_apply_each_step_half_the_time_within_mmdetections_ranges():
    rng = np.random.default_rng(0)
    draws = [draw_color_jitter(rng) for _ in range(4000)]
    for name, low, high in [
        ("brightness", -32, 32),
        ("contrast", 0.5, 1.5),
        ("saturation", 0.5, 1.5),
        ("hue", -18, 18),
    ]:
        values = [getattr(d, name) for d in draws if getattr(d, name) is not None]
        assert abs(len(values) / len(draws) - 0.5) < 0.03, name
        assert low <= min(values) and max(values) <= high and np.std(values) > (high - low) / 4, name
    assert abs(np.mean([d.contrast_first for d in draws]) - 0.5) < 0.03


def test_the_loader_draws_per_image_under_any_batching_and_keeps_the_flips():
    data = ShapesDataset(num_examples=8, seed=4, image_size=(64, 64))
    plain = lambda example, rng: preprocess(example, rng, canvas=64, longer_side=64, flip_prob=0.5)  # noqa: E731

    def color(example, rng):
        return with_color_jitter(plain, example, rng)

    def images(transform, batch_size):
        loader = Loader(data, batch_size, transform=transform, shuffle=True, seed=7, num_workers=0)
        batches = list(loader.iterate(0, 8 // batch_size))
        order = np.concatenate([loader.batch_indices(s)[1] for s in range(8 // batch_size)])
        stacked = {k: np.concatenate([b[k] for b in batches]) for k in ("images", "boxes")}
        return {k: v[np.argsort(order)] for k, v in stacked.items()}

    by_two, by_four, flips_only = images(color, 2), images(color, 4), images(plain, 2)
    np.testing.assert_array_equal(by_two["images"], by_four["images"])
    np.testing.assert_array_equal(by_two["boxes"], flips_only["boxes"])  # the same flips, boxes unmoved
    assert not np.array_equal(by_two["images"], flips_only["images"])


@pytest.mark.parametrize(
    "text, parts",
    [("none", set()), ("flip", {"flip"}), ("flip,color", {"flip", "color"}), ("jitter, color", {"jitter", "color"})],
)
def test_augment_lists(text, parts):
    assert augment_parts(text) == parts


@pytest.mark.parametrize(
    "text, message",
    [
        ("flip,blur", "--augment takes a comma list of none, flip, jitter, color; got 'flip,blur'"),
        ("none,color", "--augment none stands alone; got 'none,color'"),
        ("flip,jitter", "--augment jitter flips already; use jitter or jitter,color, not 'flip,jitter'"),
        ("color,color", "--augment names a part twice: 'color,color'"),
    ],
)
def test_bad_augment_lists_are_one_line_errors(text, message):
    with pytest.raises(JobError) as error:
        augment_parts(text)
    assert str(error.value) == message
