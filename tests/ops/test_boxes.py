"""Tests for lucid_jax.ops.boxes: float64 loop references, torchvision parity, properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lucid_jax.ops import (
    BBOX_XFORM_CLIP,
    box_area,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    min_size_mask,
)
from tests.ops.conftest import clustered_boxes, random_boxes, ref_box_iou, ref_decode, ref_encode

TOL = dict(rtol=1e-5, atol=1e-5)
SIZES = [(1, 1), (7, 3), (100, 100), (1000, 20)]
WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]


def _pair(seed, n, m, degenerate=0.2):
    rng = np.random.default_rng(seed)
    return random_boxes(rng, n, degenerate=degenerate), random_boxes(rng, m, degenerate=degenerate)


# ----------------------------------------------------------------- float64 loop references


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n,m", SIZES[:3])
def test_box_iou_matches_loop(seed, n, m):
    b1, b2 = _pair(seed, n, m)
    b2[: min(n, m) // 2] = b1[: min(n, m) // 2]  # identical pairs must give exactly 1
    np.testing.assert_allclose(box_iou(b1, b2), ref_box_iou(b1, b2), **TOL)


def test_box_iou_degenerate_is_zero_not_nan():
    point = np.array([[5.0, 5.0, 5.0, 5.0]], np.float32)
    line = np.array([[0.0, 5.0, 10.0, 5.0]], np.float32)
    iou = np.asarray(box_iou(np.concatenate([point, line]), np.concatenate([point, line])))
    assert np.all(np.isfinite(iou)) and np.all(iou == 0.0)


def test_box_area_and_min_size_mask_match_loop():
    boxes = random_boxes(np.random.default_rng(3), 50, min_wh=0.0, max_wh=40.0, degenerate=0.2)
    area = [float(b[2] - b[0]) * float(b[3] - b[1]) for b in boxes]
    np.testing.assert_allclose(box_area(boxes), area, **TOL)
    for min_size in (0.0, 1.0, 20.0):
        mask = [b[2] - b[0] >= min_size and b[3] - b[1] >= min_size for b in boxes]
        np.testing.assert_array_equal(min_size_mask(boxes, min_size), mask)
    np.testing.assert_allclose(box_area(boxes.reshape(5, 10, 4)), np.reshape(area, (5, 10)), **TOL)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_encode_decode_match_loop(seed, weights):
    ref, prop = _pair(seed, 64, 64, degenerate=0.0)
    deltas = np.asarray(encode_boxes(ref, prop, weights))
    expect = [ref_encode(r.astype(np.float64), p.astype(np.float64), weights) for r, p in zip(ref, prop)]
    np.testing.assert_allclose(deltas, expect, rtol=1e-4, atol=1e-4)
    # Large log-scales reach the clamp, which the reference must reproduce.
    wild = deltas * np.float32(8.0)
    decoded = decode_boxes(wild, prop, weights)
    expect = [
        ref_decode(d.astype(np.float64), p.astype(np.float64), weights, BBOX_XFORM_CLIP) for d, p in zip(wild, prop)
    ]
    assert np.any(wild[:, 2:] / np.asarray(weights[2:]) > BBOX_XFORM_CLIP)
    np.testing.assert_allclose(decoded, expect, rtol=1e-5, atol=1e-2)


def test_decode_runs_in_float32_for_bfloat16_input():
    prop = random_boxes(np.random.default_rng(0), 16)
    deltas = jnp.asarray(np.random.default_rng(1).normal(0, 0.1, (16, 4)), jnp.bfloat16)
    out = decode_boxes(deltas, jnp.asarray(prop, jnp.bfloat16))
    assert out.dtype == jnp.float32
    expect = decode_boxes(deltas.astype(jnp.float32), jnp.asarray(prop, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(out, expect)


def test_clip_boxes_matches_loop_and_accepts_every_size_form():
    boxes = random_boxes(np.random.default_rng(4), 40, size=700.0) - 100.0
    h, w = 480, 640
    expect = [[min(max(b[0], 0), w), min(max(b[1], 0), h), min(max(b[2], 0), w), min(max(b[3], 0), h)] for b in boxes]
    for size in ((h, w), [float(h), float(w)], (jnp.float32(h), jnp.int32(w)), np.array([h, w]), jnp.array([h, w])):
        np.testing.assert_array_equal(clip_boxes(boxes, size), expect)


def test_clip_boxes_vmaps_over_per_image_sizes():
    boxes = jnp.asarray(random_boxes(np.random.default_rng(5), 3 * 20, size=900.0).reshape(3, 20, 4))
    sizes = jnp.array([[300, 400], [600, 200], [800, 800]])
    out = jax.jit(jax.vmap(clip_boxes))(boxes, sizes)
    for i in range(3):
        np.testing.assert_array_equal(out[i], clip_boxes(boxes[i], (int(sizes[i, 0]), int(sizes[i, 1]))))
    assert float(out[1, :, 0::2].max()) <= 200 and float(out[1, :, 1::2].max()) <= 600


def test_gradients_are_finite():
    rng = np.random.default_rng(6)
    b1, b2 = np.split(clustered_boxes(rng, 11, clusters=1), [6])  # [6, 4], [5, 4], overlapping
    b1[0] = b2[0] = [3.0, 3.0, 3.0, 3.0]  # union 0: the where() must hide 0/0 from the gradient
    b1[1, 2] = b1[1, 0]  # zero width
    g1, g2 = jax.grad(lambda a, b: box_iou(a, b).sum(), argnums=(0, 1))(jnp.asarray(b1), jnp.asarray(b2))
    assert np.all(np.isfinite(g1)) and np.all(np.isfinite(g2)) and np.any(g1 != 0)
    prop = random_boxes(np.random.default_rng(7), 8)
    deltas = np.random.default_rng(8).normal(0, 3.0, (8, 4)).astype(np.float32)
    gd, gb = jax.grad(lambda d, b: decode_boxes(d, b).sum(), argnums=(0, 1))(jnp.asarray(deltas), jnp.asarray(prop))
    assert np.all(np.isfinite(gd)) and np.all(np.isfinite(gb)) and np.any(gd != 0)


# ----------------------------------------------------------------- torchvision parity


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,m", SIZES)
def test_box_iou_matches_torchvision(torchvision, seed, n, m):
    import torch

    b1, b2 = _pair(seed, n, m, degenerate=0.3)
    b2[: min(n, m) // 2] = b1[: min(n, m) // 2]
    ref = torchvision.ops.box_iou(torch.from_numpy(b1), torch.from_numpy(b2)).numpy()
    ours = np.asarray(box_iou(b1, b2))
    assert not np.any(np.isnan(ours))
    np.testing.assert_allclose(ours, np.nan_to_num(ref, nan=0.0), **TOL)  # torchvision: 0/0 = NaN


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_box_coder_matches_torchvision(torchvision, seed, weights):
    import torch
    from torchvision.models.detection._utils import BoxCoder

    coder = BoxCoder(weights)
    ref, prop = _pair(seed, 1000, 1000, degenerate=0.0)
    tv_deltas = coder.encode_single(torch.from_numpy(ref), torch.from_numpy(prop)).numpy()
    np.testing.assert_allclose(encode_boxes(ref, prop, weights), tv_deltas, **TOL)
    wild = (tv_deltas * 4.0).astype(np.float32)  # some dw/dh past the clamp
    tv_boxes = coder.decode_single(torch.from_numpy(wild), torch.from_numpy(prop)).numpy()
    np.testing.assert_allclose(decode_boxes(wild, prop, weights), tv_boxes, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_clip_and_min_size_match_torchvision(torchvision, seed):
    import torch

    boxes = random_boxes(np.random.default_rng(seed), 1000, size=900.0, min_wh=0.0, max_wh=60.0, degenerate=0.1) - 50
    tv_clip = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes), (500, 700)).numpy()
    np.testing.assert_array_equal(clip_boxes(boxes, (500, 700)), tv_clip)
    for min_size in (0.0, 1e-3, 10.0):
        kept = torchvision.ops.remove_small_boxes(torch.from_numpy(boxes), min_size).numpy()
        np.testing.assert_array_equal(np.flatnonzero(np.asarray(min_size_mask(boxes, min_size))), kept)


# ----------------------------------------------------------------- properties

_coord = st.floats(0.0, 500.0, width=32)
_side = st.floats(1.0, 300.0, width=32)
_iou_jit = jax.jit(box_iou)


@settings(max_examples=40, deadline=None)
@given(xy=hnp.arrays(np.float32, (8, 2), elements=_coord), wh=hnp.arrays(np.float32, (8, 2), elements=_side))
def test_iou_symmetric_bounded_unit_diagonal(xy, wh):
    boxes = np.concatenate([xy, xy + wh], axis=1)
    iou = np.asarray(_iou_jit(boxes, boxes))
    np.testing.assert_allclose(iou, iou.T, rtol=1e-6, atol=1e-7)
    assert np.all(iou >= 0.0) and np.all(iou <= 1.0 + 1e-6)
    np.testing.assert_allclose(np.diag(iou), 1.0, rtol=1e-6)


_roundtrip_jit = jax.jit(
    lambda r, p: decode_boxes(encode_boxes(r, p, (10.0, 10.0, 5.0, 5.0)), p, (10.0, 10.0, 5.0, 5.0))
)


@settings(max_examples=40, deadline=None)
@given(
    ref_xy=hnp.arrays(np.float32, (8, 2), elements=_coord),
    ref_wh=hnp.arrays(np.float32, (8, 2), elements=_side),
    prop_xy=hnp.arrays(np.float32, (8, 2), elements=_coord),
    prop_wh=hnp.arrays(np.float32, (8, 2), elements=_side),
)
def test_encode_decode_round_trip(ref_xy, ref_wh, prop_xy, prop_wh):
    ref = np.concatenate([ref_xy, ref_xy + ref_wh], axis=1)
    prop = np.concatenate([prop_xy, prop_xy + prop_wh], axis=1)
    # Side ratios reach 300, past exp(clamp) = 62.5 where decoding is meant to differ;
    # only pairs below the clamp must come back.
    ratio = np.log(np.maximum(ref_wh / prop_wh, 1e-9))
    ok = np.all(ratio < BBOX_XFORM_CLIP, axis=1)
    out = np.asarray(_roundtrip_jit(ref, prop))
    np.testing.assert_allclose(out[ok], ref[ok], rtol=1e-4, atol=1e-2)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: box_iou(np.zeros((5, 3), np.float32), np.zeros((2, 4), np.float32)),
            ValueError,
            r"box_iou: boxes1 must have shape \[N, 4\], got \(5, 3\)",
        ),
        (
            lambda: box_iou(np.zeros((5, 4), np.float32), np.zeros((2, 2, 4), np.float32)),
            ValueError,
            r"boxes2 must have shape \[N, 4\]",
        ),
        (
            lambda: box_iou(np.zeros((5, 4), np.int32), np.zeros((2, 4), np.float32)),
            TypeError,
            "boxes1 must be a floating-point",
        ),
        (
            lambda: encode_boxes(np.zeros((5, 4), np.float32), np.zeros((4, 4), np.float32)),
            ValueError,
            "reference_boxes and proposals must have the same shape",
        ),
        (
            lambda: encode_boxes(np.zeros((5, 2), np.float32), np.zeros((5, 2), np.float32)),
            ValueError,
            r"reference_boxes must have shape \[\.\.\., 4\]",
        ),
        (
            lambda: encode_boxes(np.zeros((5, 4), np.float32), np.zeros((5, 4), np.float32), (1.0, 1.0)),
            ValueError,
            "weights",
        ),
        (
            lambda: decode_boxes(np.zeros((5, 3), np.float32), np.zeros((5, 4), np.float32)),
            ValueError,
            r"deltas must have shape \[\.\.\., 4\]",
        ),
        (
            lambda: decode_boxes(np.zeros((5, 4), np.float32), np.zeros((3, 4), np.float32)),
            ValueError,
            "deltas .* and boxes .* must broadcast",
        ),
        (
            lambda: decode_boxes(np.zeros((5, 4), np.float32), np.zeros((5, 4), np.int64)),
            TypeError,
            "boxes must be a floating-point",
        ),
        (lambda: clip_boxes(np.zeros((5, 5), np.float32), (10, 10)), ValueError, r"clip_boxes: boxes must have shape"),
        (lambda: clip_boxes(np.zeros((5, 4), np.float32), (10, 10, 3)), ValueError, "image_size must be"),
        (
            lambda: clip_boxes(np.zeros((5, 4), np.float32), np.zeros((3,))),
            ValueError,
            r"image_size .* got shape \(3,\)",
        ),
        (lambda: min_size_mask(np.zeros((5,), np.float32), 1.0), ValueError, "min_size_mask: boxes must have shape"),
    ],
)
def test_bad_input_fails_at_trace_time(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_input_fails_under_jit_before_compute():
    with pytest.raises(ValueError, match=r"box_iou: boxes2 must have shape \[N, 4\], got \(2, 5\)"):
        jax.jit(box_iou).lower(jax.ShapeDtypeStruct((3, 4), jnp.float32), jax.ShapeDtypeStruct((2, 5), jnp.float32))


def test_bbox_xform_clip_constant():
    assert BBOX_XFORM_CLIP == pytest.approx(math.log(1000.0 / 16))
