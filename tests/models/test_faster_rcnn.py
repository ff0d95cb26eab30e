"""Faster R-CNN on a tiny ResNet: predict against a float64 reference, invariants,
compile-once, mixed precision, and a backbone with more levels than anchor sizes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_jax.compile_count import count_compiles
from tests.models.conftest import random_images, tiny_detector


@pytest.fixture(scope="module")
def forward(tiny):
    model, _ = tiny
    return jax.jit(lambda v, x, s: model.apply(v, x, s, method="forward_with_proposals"))


@pytest.fixture(scope="module")
def predict(tiny):
    model, _ = tiny
    return jax.jit(lambda v, x, s: model.apply(v, x, s, method="predict", score_thresh=0.0))


def _sizes(batch):
    return np.array([[128, 128], [96, 112]][:batch], np.float32)


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / u if u > 0 else 0.0


def _reference_postprocess(logits, deltas, proposals, valid, size, thresh, nms_thresh, k):
    """Loop-based float64 post-processing of one image (softmax, decode, clip, NMS)."""
    logits, deltas, proposals = (np.asarray(a, np.float64) for a in (logits, deltas, proposals))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    h, w = size
    cands = []
    for r in range(len(proposals)):
        if not valid[r]:
            continue
        x1, y1, x2, y2 = proposals[r]
        pw, ph = x2 - x1, y2 - y1
        cx, cy = x1 + pw / 2, y1 + ph / 2
        for c in range(1, logits.shape[1]):
            dx, dy = deltas[r, c, 0] * 0.1, deltas[r, c, 1] * 0.1
            dw = min(deltas[r, c, 2] * 0.2, math.log(1000 / 16))
            dh = min(deltas[r, c, 3] * 0.2, math.log(1000 / 16))
            ncx, ncy, nw, nh = cx + dx * pw, cy + dy * ph, pw * math.exp(dw), ph * math.exp(dh)
            box = [
                min(max(ncx - nw / 2, 0), w),
                min(max(ncy - nh / 2, 0), h),
                min(max(ncx + nw / 2, 0), w),
                min(max(ncy + nh / 2, 0), h),
            ]
            if probs[r, c] > thresh and box[2] - box[0] >= 1e-2 and box[3] - box[1] >= 1e-2:
                cands.append((probs[r, c], c, box))
    cands.sort(key=lambda t: -t[0])
    kept = []
    for score, c, box in cands:
        if all(kc != c or _iou(kb, box) <= nms_thresh for _, kc, kb in kept):
            kept.append((score, c, box))
    return kept[:k]


def test_predict_matches_float64_reference(tiny, forward, predict):
    model, variables = tiny
    x, sizes = random_images(1, batch=2), _sizes(2)
    raw = forward(variables, x, sizes)
    dets = predict(variables, x, sizes)
    for i in range(2):
        ref = _reference_postprocess(
            raw["cls_logits"][i],
            raw["class_deltas"][i],
            raw["proposals"][i],
            np.asarray(raw["proposal_valid"][i]),
            sizes[i],
            0.0,
            0.5,
            100,
        )
        n = int(dets["valid"][i].sum())
        assert n == len(ref) and n > 0
        np.testing.assert_allclose(np.asarray(dets["scores"][i, :n]), [s for s, _, _ in ref], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(dets["labels"][i, :n]), [c for _, c, _ in ref])
        np.testing.assert_allclose(np.asarray(dets["boxes"][i, :n]), [b for _, _, b in ref], rtol=1e-4, atol=1e-3)
        assert not np.asarray(dets["valid"][i, n:]).any()
        assert (np.asarray(dets["scores"][i, n:]) == 0).all() and (np.asarray(dets["labels"][i, n:]) == 0).all()


def test_forward_invariants(tiny, forward):
    model, variables = tiny
    x, sizes = random_images(2, batch=2), _sizes(2)
    raw = forward(variables, x, sizes)
    assert raw["cls_logits"].shape == (2, 300, 5) and raw["class_deltas"].shape == (2, 300, 5, 4)
    for i in range(2):
        valid = np.asarray(raw["proposal_valid"][i])
        props = np.asarray(raw["proposals"][i])[valid]
        h, w = sizes[i]
        assert valid.sum() > 100
        assert (props[:, [0, 2]] <= w).all() and (props[:, [1, 3]] <= h).all() and (props >= 0).all()
        scores = np.asarray(raw["proposal_scores"][i])[valid]
        assert (np.diff(scores) <= 0).all()
    # the per-image result does not depend on the other images of the batch
    single = forward(variables, x[1:], sizes[1:])
    np.testing.assert_allclose(
        np.asarray(single["cls_logits"][0]), np.asarray(raw["cls_logits"][1]), rtol=1e-4, atol=1e-5
    )


def test_compiles_once_per_shape(tiny):
    model, variables = tiny
    traces = []

    @jax.jit
    def fn(v, x):
        traces.append(1)
        return model.apply(v, x, method="predict")

    with count_compiles(fn) as compiles:
        for seed in range(3):
            jax.block_until_ready(fn(variables, random_images(10 + seed)))
    assert len(traces) == 1
    assert compiles.count == 1


def _large_heads(variables, seed=0):
    """The detector's variables with the RPN and box-head layers redrawn so that logits are O(1).

    At init the heads are drawn with std 0.01 and every logit is near zero, so a bf16
    comparison with an absolute tolerance would pass on an all-zero output. The box
    regressors stay small (deltas well under 1) so that bf16 rounding moves boxes by
    a fraction of a pixel rather than picking different ones.
    """
    rng = np.random.default_rng(seed)

    def redraw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "backbone" in name:
            return leaf
        gain = 0.1 if "bbox_pred" in name else 2.0
        if name.endswith("['kernel']"):
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0, gain / np.sqrt(fan_in), leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.25 * gain, leaf.shape), jnp.float32)

    return {**variables, "params": jax.tree_util.tree_map_with_path(redraw, variables["params"])}


@pytest.fixture(scope="module")
def bf16_and_f32():
    """(bf16 model, float32 model, variables with large heads, image)."""
    x = random_images(3)
    bf16 = tiny_detector(dtype=jnp.bfloat16)
    variables = _large_heads(jax.jit(bf16.init)(jax.random.key(0), x))
    return bf16, tiny_detector(), variables, x


def test_bfloat16_computation_keeps_float32_params(bf16_and_f32):
    model, ref_model, variables, x = bf16_and_f32
    assert all(
        leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(jax.jit(model.init)(jax.random.key(0), x))
    )
    out = jax.jit(lambda v, x: model.apply(v, x, method="forward_with_proposals"))(variables, x)
    assert out["cls_logits"].dtype == jnp.float32 and out["proposals"].dtype == jnp.float32
    ref = jax.jit(lambda v, x: ref_model.apply(v, x, method="forward_with_proposals"))(variables, x)
    for key, magnitude in (("objectness", 1.0), ("deltas", 0.1)):
        got, want = np.asarray(out[key]), np.asarray(ref[key])
        scale = np.abs(want).max()
        assert scale > magnitude, f"{key} is too small to tell bf16 from zero: max |{key}| = {scale}"
        # bf16 keeps 8 bits of mantissa; measured 1.1% (objectness) and 0.9% (deltas) of the largest value
        assert np.abs(got - want).max() <= 0.03 * scale, f"{key}: {np.abs(got - want).max()} vs max {scale}"
        assert not np.array_equal(got, want)  # it did compute in bfloat16


def _pairwise_iou(a, b):
    """IoU of [N, 4] and [M, 4] xyxy boxes, [N, M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda z: np.prod(z[:, 2:] - z[:, :2], -1)
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_bfloat16_predict_finds_the_float32_detections(bf16_and_f32):
    model, ref_model, variables, x = bf16_and_f32
    got = jax.tree_util.tree_map(
        lambda a: np.asarray(a[0]), jax.jit(lambda v, x: model.apply(v, x, method="predict"))(variables, x)
    )
    want = jax.tree_util.tree_map(
        lambda a: np.asarray(a[0]), jax.jit(lambda v, x: ref_model.apply(v, x, method="predict"))(variables, x)
    )
    confident = want["valid"] & (want["scores"] > 0.8)
    assert confident.sum() >= 10  # measured 45
    ious = _pairwise_iou(want["boxes"][confident], got["boxes"][got["valid"]])
    same_label = want["labels"][confident][:, None] == got["labels"][got["valid"]][None]
    matched = (np.where(same_label, ious, 0.0).max(1) > 0.9).mean()
    assert matched >= 0.9, f"only {matched:.0%} of the float32 detections have a bf16 match"  # measured 100%


def test_one_anchor_level_per_backbone_level():
    model = tiny_detector(extra_p6=True)  # 5 levels, but Lucid's 4 anchor levels
    x = np.zeros((1, 3, 128, 128), np.float32)
    with pytest.raises(
        ValueError, match=r"anchor_sizes has 4 levels but the backbone returns 5 \(strides \(4, 8, 16, 32, 64\)\)"
    ):
        jax.eval_shape(model.init, jax.random.key(0), x)
