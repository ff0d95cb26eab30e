"""Aspect-ratio canvases: the canvas of an image is a pure function of its size, every
image fits its canvas, batches hold one canvas, and the padding shrinks."""

import numpy as np
import pytest

from lucid_jax.data.canvases import Canvases, grouped_batches, padded_fraction, parse_image_size

# (height, width) of the 20 most common COCO train2017 image sizes' shapes, with
# landscape 4:3 and 3:2 photos most frequent, portraits next, a few square.
COCO_LIKE = (
    [(480, 640)] * 40
    + [(427, 640)] * 14
    + [(640, 480)] * 12
    + [(640, 427)] * 8
    + [(424, 640)] * 6
    + [(640, 640)] * 4
    + [(612, 612)] * 4
    + [(375, 500)] * 6
    + [(500, 375)] * 3
    + [(360, 640)] * 3
)


def test_parse_and_shapes():
    assert parse_image_size("512").shapes == ((512, 512),)
    assert parse_image_size(512).square_only
    spec = parse_image_size("800:1333")
    assert spec.shapes == ((800, 1344), (1344, 800), (1024, 1024)) and str(spec) == "800:1333"
    assert parse_image_size("600:1000", multiple=64).shapes == ((640, 1024), (1024, 640), (768, 768))
    for bad, match in [
        ("512x512", "S or SHORT:LONG"),
        ("0", "S or SHORT:LONG"),
        ("900:800", "SHORT <= LONG"),
        ("500", "multiple of 32"),
        ("1:2:3", "S or SHORT:LONG"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_image_size(bad)


@pytest.mark.parametrize("text", ["512", "800:1333", "320:512"])
def test_every_image_fits_its_canvas_and_the_choice_is_a_function_of_its_size(text):
    spec = parse_image_size(text)
    rng = np.random.default_rng(0)
    for h, w in rng.integers(16, 3000, (500, 2)):
        index = spec.canvas_index(h, w)
        assert index == spec.canvas_index(h, w)  # pure
        ch, cw = spec.shapes[index]
        nh, nw = spec.resized_shape(h, w)
        assert 1 <= nh <= ch and 1 <= nw <= cw
        assert abs(nh / nw - h / w) <= (h / w) * (1.5 / min(nh, nw))  # aspect kept up to rounding
        if spec.square_only:
            assert max(nh, nw) == spec.long
        else:
            orientation = "landscape" if w > h * spec.band else "portrait" if h > w * spec.band else "square"
            assert ("landscape", "portrait", "square")[index] == orientation
            # the shorter side reaches SHORT unless the longer one hits LONG (or the canvas)
            assert min(nh, nw) == spec.short or max(nh, nw) >= min(spec.long, max(ch, cw)) - 1


def test_grouping_cuts_the_padding_on_coco_like_sizes():
    grouped = parse_image_size("800:1333")
    # the same resize (shorter side 800, longer at most 1333) on one square canvas: an
    # infinite band sends every image to the square canvas, 1344 x 1344
    square = Canvases(800, 1333, band=float("inf"))
    assert square.shapes[2] == (1344, 1344) and {square.canvas_index(h, w) for h, w in COCO_LIKE} == {2}
    sizes = np.array(COCO_LIKE)
    square_pad, grouped_pad = padded_fraction(sizes, square), padded_fraction(sizes, grouped)
    print(f"padded pixels on COCO-like sizes: one square canvas {square_pad:.1%}, grouped canvases {grouped_pad:.1%}")
    assert grouped_pad < 0.25 < 0.45 < square_pad


def test_grouped_batches_hold_one_canvas_and_cover_the_epoch():
    rng = np.random.default_rng(1)
    canvas_ids = rng.integers(0, 3, 103)
    order = rng.permutation(103)
    padded = grouped_batches(canvas_ids, order, 8, drop_remainder=False, rng=np.random.default_rng(5))
    assert sorted(i for _, b in padded for i in b) == list(range(103))
    assert all({int(canvas_ids[i]) for i in b} == {c} for c, b in padded)
    assert sum(len(b) < 8 for _, b in padded) <= 3  # one short batch per canvas at most
    dropped = grouped_batches(canvas_ids, order, 8, drop_remainder=True, rng=np.random.default_rng(5))
    assert all(len(b) == 8 for _, b in dropped) and len(dropped) == sum(np.bincount(canvas_ids) // 8)
    again = grouped_batches(canvas_ids, order, 8, drop_remainder=True, rng=np.random.default_rng(5))
    assert again == dropped  # a pure function of its arguments
    in_order = grouped_batches(canvas_ids, order, 8, drop_remainder=False, rng=None)
    firsts = [list(order).index(b[0]) for _, b in in_order]
    assert firsts == sorted(firsts)


def test_canvases_refuse_bad_settings():
    with pytest.raises(ValueError, match="SHORT <= LONG"):
        Canvases(900, 800)
    with pytest.raises(ValueError, match="band >= 1"):
        Canvases(800, 1333, band=0.5)
