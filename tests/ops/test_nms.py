"""Tests for lucid_jax.ops.nms: greedy float64 loops, torchvision parity, properties, tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lucid_jax.compile_count import count_compiles
from lucid_jax.ops import batched_nms, nms
from tests.ops.conftest import clustered_boxes, random_boxes, ref_box_iou, ref_nms

# Jitted with the static arguments marked, so that each shape compiles once for the
# whole module; the plain functions are exercised by the tracing and error tests.
_STATIC = ("iou_threshold", "max_output", "tile")
jnms = jax.jit(nms, static_argnames=_STATIC)
jbatched_nms = jax.jit(batched_nms, static_argnames=_STATIC)


def _kept(keep, keep_valid):
    keep, keep_valid = np.asarray(keep), np.asarray(keep_valid)
    assert keep.dtype == np.int32 and keep_valid.dtype == bool
    n = int(keep_valid.sum())
    # Valid entries come first and the padding is index 0.
    assert np.all(keep_valid[:n]) and not np.any(keep_valid[n:]) and np.all(keep[n:] == 0)
    return keep[:n].tolist()


def _case(kind, seed, n):
    """boxes [n, 4], scores [n] for one of the input families the tests sweep."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return random_boxes(rng, n), rng.random(n).astype(np.float32)
    if kind == "overlap":
        return clustered_boxes(rng, n), rng.random(n).astype(np.float32)
    if kind == "ties":  # few distinct scores, including -0.0 next to 0.0
        scores = (rng.integers(0, 4, n) / 3).astype(np.float32)
        scores[rng.random(n) < 0.2] = -0.0
        return clustered_boxes(rng, n, clusters=8), scores
    if kind == "degenerate":
        return random_boxes(rng, n, size=100.0, degenerate=0.4), rng.random(n).astype(np.float32)
    raise ValueError(kind)


KINDS = ["random", "overlap", "ties", "degenerate"]


# ----------------------------------------------------------------- float64 loop references


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 7, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_nms_matches_loop(kind, n, seed):
    boxes, scores = _case(kind, seed, n)
    for threshold in (0.3, 0.7):
        assert _kept(*jnms(boxes, scores, threshold, n)) == ref_nms(boxes, scores, threshold)


def test_nms_matches_loop_on_1000_overlapping_boxes():
    rng = np.random.default_rng(3)
    boxes, scores = clustered_boxes(rng, 1000, clusters=20, jitter=20.0), rng.random(1000).astype(np.float32)
    expect = ref_nms(boxes, scores, 0.5)
    assert 20 < len(expect) < 900  # long suppression chains, several tiles
    assert _kept(*jnms(boxes, scores, 0.5, 1000, tile=128)) == expect


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_batched_nms_matches_loop(kind):
    boxes, scores = _case(kind, 4, 300)
    idxs = np.random.default_rng(5).integers(0, 6, 300)
    expect = ref_nms(boxes, scores, 0.5, idxs=idxs)
    assert len(expect) > len(ref_nms(boxes, scores, 0.5))  # categories do matter here
    assert _kept(*jbatched_nms(boxes, scores, idxs, 0.5, 300)) == expect


def test_max_output_truncates_and_pads():
    boxes, scores = _case("random", 6, 100)
    full = ref_nms(boxes, scores, 0.5)
    assert _kept(*jnms(boxes, scores, 0.5, 10)) == full[:10]
    keep, keep_valid = jnms(boxes, scores, 0.5, 250)
    assert keep.shape == (250,) and _kept(keep, keep_valid) == full
    assert jnms(boxes, scores, 0.5, 0)[0].shape == (0,)
    keep, keep_valid = nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5, 4)
    assert keep.shape == (4,) and not np.any(keep_valid)


def test_invalid_and_nan_entries_are_never_kept_and_suppress_nothing():
    boxes, scores = _case("overlap", 7, 64)
    valid = np.random.default_rng(8).random(64) < 0.7
    scores = scores.copy()
    scores[::9] = np.nan
    scores[1] = np.inf  # not finite either
    kept = _kept(*jnms(boxes, scores, 0.5, 64, valid=valid))
    usable = valid & np.isfinite(scores)
    assert kept and all(usable[k] for k in kept)
    # Same result as if the unusable boxes had never been there.
    sub = np.flatnonzero(usable)
    assert kept == [int(sub[k]) for k in _kept(*jnms(boxes[sub], scores[sub], 0.5, 64))]
    idxs = np.arange(64) % 3
    kept_b = _kept(*jbatched_nms(boxes, scores, idxs, 0.5, 64, valid=valid))
    assert kept_b == ref_nms(boxes, scores, 0.5, valid=valid, idxs=idxs)
    all_nan = np.full(64, np.nan, np.float32)
    assert not np.any(np.asarray(jnms(boxes, all_nan, 0.5, 64)[1]))


def test_threshold_edges():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    assert _kept(*jnms(boxes, scores, 1.0, 4)) == [0, 1, 2, 3]  # nothing has IoU > 1
    assert _kept(*jnms(boxes, scores, 0.0, 4)) == [0, 3]  # any overlap suppresses
    # Boxes 0 and 2 have float32 IoU float32(1/3) = 0.33333334 > 1/3 (compared as double,
    # as torchvision does), but not > float32(1/3) itself.
    assert _kept(*jnms(boxes, scores, 1 / 3, 4)) == [0, 3]
    assert _kept(*jnms(boxes, scores, float(np.float32(1 / 3)), 4)) == [0, 2, 3]
    assert _kept(*jnms(boxes, scores, 0.5, 4)) == [0, 2, 3]


# ----------------------------------------------------------------- torchvision parity


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 7, 100, 1000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_torchvision(torchvision, kind, n, seed):
    import torch

    boxes, scores = _case(kind, seed, n)
    ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).tolist()
    assert _kept(*jnms(boxes, scores, 0.5, n)) == ref  # same set, same order


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_nms_matches_torchvision_at_5000(torchvision, kind):
    import torch

    boxes, scores = _case(kind, 9, 5000)
    ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).tolist()
    assert _kept(*jnms(boxes, scores, 0.5, 5000)) == ref


@pytest.mark.parametrize("threshold", [0.0, 0.2, 1 / 3, 0.5, 2 / 3, 1.0])
def test_nms_matches_torchvision_when_iou_equals_threshold(torchvision, threshold):
    import torch

    # Integer boxes on a small grid give many IoUs of exactly 1/3, 1/2, 2/3, ...
    rng = np.random.default_rng(15)
    xy = rng.integers(0, 6, (400, 2))
    boxes = np.concatenate([xy, xy + rng.integers(0, 4, (400, 2))], axis=1).astype(np.float32)
    scores = rng.permutation(400).astype(np.float32)
    ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).tolist()
    assert _kept(*jnms(boxes, scores, threshold, 400)) == ref
    idxs = np.arange(400) % 3
    ref = torchvision.ops.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(idxs), threshold
    )
    assert _kept(*jbatched_nms(boxes, scores, idxs, threshold, 400)) == ref.tolist()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [7, 100, 1000, 3000])
def test_batched_nms_matches_torchvision(torchvision, kind, n):
    import torch

    boxes, scores = _case(kind, n, n)
    idxs = np.random.default_rng(n).integers(0, 5, n)
    ref = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(idxs), 0.5)
    ours = _kept(*jbatched_nms(boxes, scores, idxs, 0.5, n))
    if n <= 1000:
        assert ours == ref.tolist()
    else:
        # Past 1000 boxes torchvision loops over categories and merges them with an
        # unstable sort, so only the order among tied scores is unspecified.
        assert sorted(ours) == sorted(ref.tolist())
        np.testing.assert_array_equal(scores[ours], scores[ref.numpy()])


# ----------------------------------------------------------------- properties

N_PROP = 24


def _quarter_pixels(top):
    # A quarter-pixel grid keeps areas exact in float32 (no underflow of tiny sides)
    # and IoUs far enough from the dyadic thresholds that float32 and float64 agree,
    # while still producing exact ties, zero sides and identical boxes.
    return st.integers(0, 4 * top).map(lambda v: v / 4)


_nms_jit = jax.jit(lambda b, s, t, v: nms(b, s, t, N_PROP, valid=v))


@settings(max_examples=40, deadline=None)
@given(
    xy=hnp.arrays(np.float32, (N_PROP, 2), elements=_quarter_pixels(60)),
    wh=hnp.arrays(np.float32, (N_PROP, 2), elements=_quarter_pixels(40)),
    scores=hnp.arrays(np.float32, (N_PROP,), elements=st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9, np.nan])),
    valid=hnp.arrays(bool, (N_PROP,)),
    threshold=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),  # exact in float32 and float64
)
def test_nms_properties(xy, wh, scores, valid, threshold):
    boxes = np.concatenate([xy, xy + wh], axis=1)
    kept = _kept(*_nms_jit(boxes, scores, np.float32(threshold), valid))
    usable = valid & np.isfinite(scores)
    assert all(usable[k] for k in kept)
    assert np.all(np.diff(scores[kept]) <= 0)  # decreasing score
    iou = ref_box_iou(boxes, boxes)
    for a in range(len(kept)):
        for b in range(a + 1, len(kept)):
            assert iou[kept[a], kept[b]] <= threshold + 1e-6
    for i in np.flatnonzero(usable):
        if i not in kept:  # suppressed: some kept box ranked before it overlaps it
            assert any(iou[k, i] > threshold - 1e-6 and (scores[k], -k) > (scores[i], -i) for k in kept), (
                f"box {i} dropped without a reason"
            )
    assert kept == ref_nms(boxes, scores, threshold, valid=valid)


# ----------------------------------------------------------------- tracing: compile, export, vmap


def test_jitted_nms_compiles_once_per_shape():
    traces = []

    @jax.jit
    def run(boxes, scores):
        traces.append(1)  # runs only while tracing
        return jnms(boxes, scores, 0.5, 50)

    with count_compiles(run) as compiles:
        for seed in range(3):
            boxes, scores = _case("random", seed, 200)
            assert _kept(*run(boxes, scores)) == ref_nms(boxes, scores, 0.5)[:50]
        assert len(traces) == 1 and compiles.count == 1
        run(*_case("random", 0, 201))  # a new shape does compile again: the counter is live
    assert len(traces) == 2 and compiles.count == 2


@pytest.mark.parametrize("batched", [False, True])
def test_export_for_cpu_cuda_tpu(batched):
    n = 300
    spec = [jax.ShapeDtypeStruct((n, 4), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32)]
    if batched:
        fn = lambda b, s, i, v: batched_nms(b, s, i, 0.6, 100, valid=v)  # noqa: E731
        spec += [jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.bool_)]
    else:
        fn = lambda b, s: nms(b, s, 0.6, 100)  # noqa: E731
    exported = jax.export.export(jax.jit(fn), platforms=("cpu", "cuda", "tpu"))(*spec)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    assert [a.shape for a in exported.out_avals] == [(100,), (100,)]
    boxes, scores = _case("overlap", 0, n)
    args = (boxes, scores) + ((np.arange(n, dtype=np.int32) % 4, np.ones(n, bool)) if batched else ())
    np.testing.assert_array_equal(exported.call(*args)[0], jax.jit(fn)(*args)[0])  # runs on CPU


def test_vmap_matches_per_image_calls():
    cases = [_case(kind, 11, 150) for kind in ("random", "overlap", "ties")]
    boxes = np.stack([c[0] for c in cases])  # [3, 150, 4]
    scores = np.stack([c[1] for c in cases])  # [3, 150]
    idxs = np.random.default_rng(12).integers(0, 4, (3, 150))
    valid = np.random.default_rng(13).random((3, 150)) < 0.8
    keep, keep_valid = jax.jit(jax.vmap(lambda b, s, v: nms(b, s, 0.5, 120, valid=v)))(boxes, scores, valid)
    keep_b, valid_b = jax.jit(jax.vmap(lambda b, s, i: batched_nms(b, s, i, 0.5, 120)))(boxes, scores, idxs)
    for i in range(3):
        single = jnms(boxes[i], scores[i], 0.5, 120, valid=valid[i])
        np.testing.assert_array_equal(keep[i], single[0])
        np.testing.assert_array_equal(keep_valid[i], single[1])
        assert _kept(keep[i], keep_valid[i]) == ref_nms(boxes[i], scores[i], 0.5, valid=valid[i])
        single = jbatched_nms(boxes[i], scores[i], idxs[i], 0.5, 120)
        np.testing.assert_array_equal(keep_b[i], single[0])
        np.testing.assert_array_equal(valid_b[i], single[1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, max_output, tile, threshold", [(300, 40, 64, 0.3), (700, 700, 64, 0.7)])
def test_scatter_free_formulation_keeps_the_same_boxes(kind, n, max_output, tile, threshold):
    # Batched under vmap (as the models call it), with invalid boxes, several tiles
    # and max_output reached early or never.
    cases = [_case(kind, seed, n) for seed in (21, 22)]
    boxes, scores = np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases])  # [2, n, 4], [2, n]
    idxs = np.random.default_rng(23).integers(0, 3, (2, n))
    valid = np.random.default_rng(24).random((2, n)) < 0.9
    run = lambda free: jax.jit(
        jax.vmap(lambda b, s, i, v: batched_nms(b, s, i, threshold, max_output, valid=v, tile=tile, scatter_free=free))
    )(boxes, scores, idxs, valid)
    (keep, keep_valid), (keep_free, valid_free) = run(False), run(True)
    assert keep_valid.any()
    np.testing.assert_array_equal(keep_free, keep)
    np.testing.assert_array_equal(valid_free, keep_valid)
    for i in range(2 if n <= 300 else 0):  # the float64 loop is slow on large inputs
        ref = ref_nms(boxes[i], scores[i], threshold, valid=valid[i], idxs=idxs[i])[:max_output]
        assert _kept(keep_free[i], valid_free[i]) == ref


# ----------------------------------------------------------------- bad input

_B, _S = np.zeros((5, 4), np.float32), np.zeros(5, np.float32)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: nms(np.zeros((5, 3), np.float32), _S, 0.5, 3),
            ValueError,
            r"nms: boxes must have shape \[N, 4\], got \(5, 3\)",
        ),
        (
            lambda: nms(np.zeros((2, 5, 4), np.float32), _S, 0.5, 3),
            ValueError,
            r"nms: boxes must have shape \[N, 4\], got \(2, 5, 4\)",
        ),
        (lambda: nms(np.zeros((5, 4), np.int32), _S, 0.5, 3), TypeError, "nms: boxes must be a floating-point"),
        (lambda: nms(_B, np.zeros(4, np.float32), 0.5, 3), ValueError, r"nms: scores must have shape \[N\] = \(5,\)"),
        (lambda: nms(_B, np.zeros(5, np.int32), 0.5, 3), TypeError, "nms: scores must be a floating-point"),
        (lambda: nms(_B, _S, 0.5, 3, valid=np.ones(6, bool)), ValueError, "nms: valid must have shape"),
        (lambda: nms(_B, _S, 0.5, -1), ValueError, "nms: max_output must be >= 0, got -1"),
        (lambda: nms(_B, _S, 0.5, 2.5), TypeError, "nms: max_output must be a Python int"),
        (lambda: nms(_B, _S, 1.5, 3), ValueError, r"nms: iou_threshold must be in \[0, 1\], got 1.5"),
        (lambda: nms(_B, _S, -0.1, 3), ValueError, "nms: iou_threshold must be in"),
        (
            lambda: batched_nms(np.zeros((5, 3), np.float32), _S, np.zeros(5, np.int32), 0.5, 3),
            ValueError,
            r"batched_nms: boxes must have shape \[N, 4\]",
        ),
        (lambda: batched_nms(_B, _S, np.zeros(4, np.int32), 0.5, 3), ValueError, "batched_nms: idxs must have shape"),
        (
            lambda: batched_nms(_B, _S, np.zeros(5, np.float32), 0.5, 3),
            TypeError,
            "batched_nms: idxs must be an integer",
        ),
        (lambda: batched_nms(_B, _S, np.zeros(5, np.int32), 2.0, 3), ValueError, "batched_nms: iou_threshold"),
        (lambda: batched_nms(_B, _S, np.zeros(5, np.int32), 0.5, -3), ValueError, "batched_nms: max_output"),
    ],
)
def test_bad_input_fails_at_trace_time(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_input_fails_when_lowering_before_any_compute():
    spec = jax.ShapeDtypeStruct((5, 3), jnp.float32), jax.ShapeDtypeStruct((5,), jnp.float32)
    with pytest.raises(ValueError, match=r"nms: boxes must have shape \[N, 4\], got \(5, 3\)"):
        jax.jit(lambda b, s: nms(b, s, 0.5, 3)).lower(*spec)
