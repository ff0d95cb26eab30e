"""Tests for lucid_jax.ops.matching: a float64 loop reference, torchvision's Matcher, tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_jax.compile_count import count_compiles
from lucid_jax.ops.matching import MatchLabel, match_boxes
from tests.ops.conftest import TV_REASON, random_boxes, ref_box_iou

P, N_, IG = MatchLabel.POSITIVE, MatchLabel.NEGATIVE, MatchLabel.IGNORE
RPN = dict(fg_iou_thresh=0.7, bg_iou_thresh=0.3, allow_low_quality_matches=True)
ROI = dict(fg_iou_thresh=0.5, bg_iou_thresh=0.5, allow_low_quality_matches=False)
jmatch = jax.jit(match_boxes, static_argnames=tuple(RPN))


def ref_match(iou, gt_valid, cand_valid, *, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches):
    """The matching rules one candidate and one gt at a time, in float64.

    The thresholds are rounded to float32 first, as the IoU is float32 (torchvision
    compares a float32 tensor with a Python float in float32 too).
    """
    iou = np.asarray(iou, np.float64)
    fg, bg = float(np.float32(fg_iou_thresh)), float(np.float32(bg_iou_thresh))
    g_count, n_count = iou.shape
    gts = [g for g in range(g_count) if gt_valid[g]]
    matched, labels, best = [0] * n_count, [int(IG)] * n_count, [0] * n_count
    for n in range(n_count):
        if not cand_valid[n]:
            continue
        if not gts:
            labels[n] = int(N_)
            continue
        best[n] = gts[0]
        for g in gts[1:]:
            if iou[g, n] > iou[best[n], n]:  # strict: ties keep the lower index
                best[n] = g
        v = iou[best[n], n]
        labels[n] = int(P) if v >= fg else int(N_) if v < bg else int(IG)
    if allow_low_quality_matches:
        for g in gts:
            top = max([iou[g, n] for n in range(n_count) if cand_valid[n]], default=0.0)
            for n in range(n_count):
                if cand_valid[n] and top > 0 and iou[g, n] == top:
                    labels[n] = int(P)
    for n in range(n_count):
        matched[n] = best[n] if labels[n] == P else 0
    return np.array(matched), np.array(labels)


def _case(seed, g, n, none_valid=False):
    """iou [G, N] float32 (float64 loop, rounded once), gt_valid [G], cand_valid [N]."""
    rng = np.random.default_rng(seed)
    gt = random_boxes(rng, g, size=300.0, min_wh=20.0, max_wh=120.0)
    anchors = random_boxes(rng, n, size=300.0, min_wh=20.0, max_wh=120.0)
    if g and n > 1:  # jittered copies of the gts give the full IoU range; exact copies give ties
        k = min(n // 2, 4 * g)
        anchors[:k] = gt[np.arange(k) % g] + rng.normal(0.0, 8.0, (k, 4)).astype(np.float32)
        anchors[k : k + k // 4] = anchors[: k // 4]
    gt_valid = np.zeros(g, bool) if none_valid else rng.random(g) < 0.8
    cand_valid = rng.random(n) < 0.9
    return ref_box_iou(gt, anchors).astype(np.float32).reshape(g, n), gt_valid, cand_valid


def _check(iou, gt_valid, cand_valid, settings):
    matched, labels = jmatch(iou, gt_valid, cand_valid, **settings)
    assert matched.dtype == jnp.int32 and labels.dtype == jnp.int32
    want_matched, want_labels = ref_match(iou, gt_valid, cand_valid, **settings)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(matched, want_matched)
    return np.asarray(matched), np.asarray(labels)


@pytest.mark.parametrize("g", ["empty", "none_valid", 1, 5])
@pytest.mark.parametrize("n", [1, 50, 500])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_loop(g, n, seed):
    iou, gt_valid, cand_valid = _case(seed, 0 if g == "empty" else 5 if g == "none_valid" else g, n, g == "none_valid")
    seen = set()
    for settings in (RPN, ROI):
        seen |= set(_check(iou, gt_valid, cand_valid, settings)[1].tolist())
    if g == 5 and n == 500:  # the inputs do exercise every label
        assert seen == {int(P), int(N_), int(IG)}


def test_ignore_band_and_threshold_edges():
    iou = np.array([[0.1, 0.29, 0.3, 0.5, 0.69, 0.7, 0.95]], np.float32)  # 0.7 is float32(0.7): POSITIVE
    gv, cv = np.ones(1, bool), np.ones(7, bool)
    np.testing.assert_array_equal(_check(iou, gv, cv, RPN)[1], [N_, N_, IG, IG, IG, P, P])
    np.testing.assert_array_equal(_check(iou, gv, cv, ROI)[1], [N_, N_, N_, P, P, P, P])  # no band when equal


def test_best_anchor_rule_with_ties_keeps_own_argmax():
    iou = np.array([[0.4, 0.4, 0.2, 0.0], [0.5, 0.0, 0.9, 0.1]], np.float32)
    gv, cv = np.ones(2, bool), np.ones(4, bool)
    matched, labels = _check(iou, gv, cv, RPN)
    # gt 0 peaks at 0.4 on anchors 0 and 1; anchor 0 stays matched to its own best gt, 1.
    np.testing.assert_array_equal(labels, [P, P, P, N_])
    np.testing.assert_array_equal(matched, [1, 0, 1, 0])
    matched, labels = _check(iou, gv, cv, dict(RPN, allow_low_quality_matches=False))
    np.testing.assert_array_equal(labels, [IG, IG, P, N_])
    np.testing.assert_array_equal(matched, [0, 0, 1, 0])


def test_invalid_gts_are_never_matched():
    iou = np.array([[0.4, 0.4, 0.2, 0.0], [0.5, 0.0, 0.9, 0.1]], np.float32)
    matched, labels = _check(iou, np.array([False, True]), np.ones(4, bool), RPN)
    np.testing.assert_array_equal(labels, [IG, N_, P, N_])  # gt 0 claims no best anchor
    np.testing.assert_array_equal(matched, [0, 0, 1, 0])
    tie = np.array([[0.8], [0.8]], np.float32)  # ties go to the lowest valid gt index
    assert _check(tie, np.array([True, True]), np.ones(1, bool), ROI)[0].tolist() == [0]
    assert _check(tie, np.array([False, True]), np.ones(1, bool), ROI)[0].tolist() == [1]


def test_invalid_candidates_are_ignored_and_not_best():
    iou = np.array([[0.9, 0.4, 0.4, 0.1]], np.float32)
    matched, labels = _check(iou, np.ones(1, bool), np.array([False, True, True, True]), RPN)
    np.testing.assert_array_equal(labels, [IG, P, P, N_])  # best valid IoU is 0.4, shared by two
    matched, labels = _check(iou, np.ones(1, bool), np.ones(4, bool), RPN)
    np.testing.assert_array_equal(labels, [P, IG, IG, N_])
    np.testing.assert_array_equal(jmatch(iou, np.ones(1, bool), None, **RPN)[1], labels)  # None: all valid


def test_gt_overlapping_nothing_adds_no_positives_and_no_gt_is_negative():
    iou = np.array([[0.0, 0.0, 0.0], [0.0, 0.8, 0.2]], np.float32)
    cv = np.array([True, True, False])
    np.testing.assert_array_equal(_check(iou, np.array([True, True]), cv, RPN)[1], [N_, P, IG])
    for gv in (np.array([True, False]), np.array([False, False])):
        matched, labels = _check(iou, gv, cv, RPN)
        np.testing.assert_array_equal(labels, [N_, N_, IG])
        np.testing.assert_array_equal(matched, [0, 0, 0])
    matched, labels = jmatch(np.zeros((0, 3), np.float32), np.zeros(0, bool), cv, **RPN)
    np.testing.assert_array_equal(labels, [N_, N_, IG])
    np.testing.assert_array_equal(matched, [0, 0, 0])


def _tv_matcher(settings):
    tv_utils = pytest.importorskip("torchvision", reason=TV_REASON).models.detection._utils
    return tv_utils.Matcher(settings["fg_iou_thresh"], settings["bg_iou_thresh"], settings["allow_low_quality_matches"])


@pytest.mark.parametrize("settings", [RPN, ROI], ids=["rpn", "roi"])
@pytest.mark.parametrize("seed", [3, 4, 5])
def test_matches_torchvision_matcher(settings, seed):
    matcher = _tv_matcher(settings)
    import torch

    iou, gt_valid, cand_valid = _case(seed, 5, 300)
    cand_valid[:20] = True  # the jittered gt copies: every gt overlaps some valid candidate
    gts, cands = np.flatnonzero(gt_valid), np.flatnonzero(cand_valid)
    assert np.all(iou[gts][:, cands].max(axis=1) > 0)
    tv = matcher(torch.from_numpy(iou[gts][:, cands])).numpy()
    want_labels = np.full(300, int(IG))
    want_labels[cands] = np.where(tv >= 0, int(P), np.where(tv == -1, int(N_), int(IG)))
    want_matched = np.zeros(300, int)
    want_matched[cands] = np.where(tv >= 0, gts[np.maximum(tv, 0)], 0)
    matched, labels = jmatch(iou, gt_valid, cand_valid, **settings)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(matched, want_matched)


def test_torchvision_difference_for_a_gt_overlapping_nothing():
    matcher = _tv_matcher(RPN)
    import torch

    iou = np.array([[0.0, 0.0, 0.0], [0.0, 0.8, 0.2]], np.float32)
    assert np.all(matcher(torch.from_numpy(iou)).numpy() >= 0)  # torchvision: all positive
    np.testing.assert_array_equal(jmatch(iou, np.ones(2, bool), None, **RPN)[1], [N_, P, N_])


def test_jit_compiles_once_and_vmaps():
    traces = []

    @jax.jit
    def run(iou, gv, cv):
        traces.append(1)  # runs only while tracing
        return jax.vmap(lambda *a: match_boxes(*a, **RPN))(iou, gv, cv)

    with count_compiles(run) as compiles:
        for seed in range(3):
            cases = [_case(10 * seed + i, 5, 120) for i in range(2)]
            out = run(*(np.stack(c) for c in zip(*cases)))
            for i, case in enumerate(cases):
                for got, want in zip(out, ref_match(*case, **RPN)):
                    np.testing.assert_array_equal(got[i], want)
        assert len(traces) == 1 and compiles.count == 1
        run(*(np.stack(c) for c in zip(*[_case(0, 5, 121)] * 2)))  # a new shape: the counter is live
    assert len(traces) == 2 and compiles.count == 2


def test_export_for_cpu_cuda_tpu():
    fn = jax.jit(lambda iou, gv, cv: match_boxes(iou, gv, cv, **RPN))
    spec = [jax.ShapeDtypeStruct(s, d) for s, d in (((5, 200), jnp.float32), ((5,), bool), ((200,), bool))]
    exported = jax.export.export(fn, platforms=("cpu", "cuda", "tpu"))(*spec)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    case = _case(7, 5, 200)
    for got, want in zip(exported.call(*case), ref_match(*case, **RPN)):
        np.testing.assert_array_equal(got, want)


_IOU, _GV = np.zeros((2, 3), np.float32), np.ones(2, bool)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((np.zeros(3, np.float32), _GV), RPN, ValueError, r"iou must have shape \[G, N\], got \(3,\)"),
        ((np.zeros((2, 3), np.int32), _GV), RPN, TypeError, "iou must be a floating-point"),
        ((_IOU, np.ones(3, bool)), RPN, ValueError, r"gt_valid must have shape \[G\] = \(2,\)"),
        ((_IOU, np.ones(2, np.int32)), RPN, TypeError, "gt_valid must be a bool"),
        ((_IOU, _GV, np.ones(2, bool)), RPN, ValueError, r"candidate_valid must have shape \[N\] = \(3,\)"),
        ((_IOU, _GV), dict(RPN, bg_iou_thresh=0.8), ValueError, "bg_iou_thresh must be <= fg_iou_thresh"),
        ((_IOU, _GV), dict(RPN, allow_low_quality_matches=1), TypeError, "allow_low_quality_matches must be"),
        ((_IOU, _GV), dict(RPN, fg_iou_thresh="0.7"), TypeError, "fg_iou_thresh must be a scalar float"),
    ],
)
def test_bad_input_fails_at_trace_time(args, kwargs, error, match):
    with pytest.raises(error, match="match_boxes: " + match):
        jax.jit(lambda: match_boxes(*args, **kwargs)).trace()
