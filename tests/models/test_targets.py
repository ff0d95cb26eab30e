"""Training targets of Faster R-CNN: the RPN's and the RoI heads' matching, sampling
and regression targets against float64 loop references.
"""

import math

import jax
import numpy as np
import pytest

from lucid_jax.models.targets import roi_targets, rpn_targets

STDS = (0.1, 0.1, 0.2, 0.2)

# --- float64 loop references -------------------------------------------------------


def _iou(a, b):
    """IoU of two xyxy boxes in float64; 0 where the union is empty."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _encode(gt, box, weights):
    """R-CNN deltas turning ``box`` into ``gt``, float64."""
    gt, box = [float(v) for v in gt], [float(v) for v in box]
    wx, wy, ww, wh = weights
    bw, bh = box[2] - box[0], box[3] - box[1]
    gw, gh = gt[2] - gt[0], gt[3] - gt[1]
    return [
        wx * ((gt[0] + 0.5 * gw) - (box[0] + 0.5 * bw)) / bw,
        wy * ((gt[1] + 0.5 * gh) - (box[1] + 0.5 * bh)) / bh,
        ww * math.log(gw / bw),
        wh * math.log(gh / bh),
    ]


def _reference_match(gt, gt_valid, cands, cand_valid, fg, bg, low_quality):
    """torchvision's Matcher as a loop: labels 1 / 0 / -1 and the matched gt (-1 if none).

    Rules: best valid gt by IoU (first on ties); >= fg positive, < bg negative,
    in between ignored; with ``low_quality``, every valid candidate attaining a
    gt's best IoU (> 0) is positive too, still matched to its own best gt. No valid
    gt: every valid candidate is negative. Invalid candidates are ignored.
    """
    m, n = len(gt), len(cands)
    iou = np.array([[_iou(gt[i], cands[j]) for j in range(n)] for i in range(m)]).reshape(m, n)
    labels = np.full(n, -1)
    matched = np.full(n, -1)
    for j in range(n):
        if not cand_valid[j]:
            continue
        best, best_iou = -1, -math.inf
        for i in range(m):
            if gt_valid[i] and iou[i, j] > best_iou:
                best, best_iou = i, iou[i, j]
        if best < 0:
            labels[j] = 0
            continue
        matched[j] = best
        labels[j] = 1 if best_iou >= fg else (0 if best_iou < bg else -1)
    if low_quality:
        for i in range(m):
            if not gt_valid[i]:
                continue
            top = max((iou[i, j] for j in range(n) if cand_valid[j]), default=0.0)
            if top <= 0:
                continue
            for j in range(n):
                if cand_valid[j] and iou[i, j] == top:
                    labels[j] = 1
    return labels, matched, iou


def _assert_no_float32_ambiguity(iou, thresholds, exact):
    """The float32 implementation must see the same comparisons as the float64 loop:
    no IoU within 1e-6 of a threshold unless it is one of the exactly representable
    values the test builds on purpose."""
    for t in thresholds:
        close = np.abs(iou - t) < 1e-6
        assert np.all(~close | np.isin(iou, exact)), f"an IoU is ambiguously close to {t}"


def _sorted_rows(a):
    """Rows of a [K, 4] array in lexicographic order, to compare multisets of boxes."""
    return a[np.lexsort(a.T[::-1])]


def _boxes(rng, n, lo, hi, min_wh, max_wh):
    xy = rng.uniform(lo, hi, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


# --- rpn_targets ------------------------------------------------------------------


def _rpn_case():
    """Random anchors and gts plus hand-made edge cases far from them:

    gt D1 [300,300,310,310] with anchors at IoU exactly 0.7 (positive), exactly 0.3
    (ignored: not < 0.3) and 0.29 (negative); gt D2 with two identical best anchors
    at IoU 0.5 (both positive by the best-anchor rule, ties included); gt D3, which
    overlaps no anchor (no low-quality match: a deliberate difference from
    torchvision); and a padded gt that sits exactly on an anchor (never matched).
    """
    rng = np.random.default_rng(0)
    gt = _boxes(rng, 4, 10, 120, 20, 60)
    anchors = np.concatenate(
        [
            _boxes(rng, 400, 0, 160, 8, 80),
            gt[rng.integers(0, 4, 40)] + rng.normal(0, 4, (40, 4)).astype(np.float32),
            np.array(
                [
                    [300, 300, 307, 310],  # IoU 0.7 with D1
                    [300, 300, 303, 310],  # IoU 0.3 with D1
                    [300, 300, 302.9, 310],  # IoU 0.29 with D1
                    [400, 400, 405, 410],  # IoU 0.5 with D2
                    [400, 400, 405, 410],  # its duplicate
                    [520, 520, 560, 560],  # padded gt's twin
                ],
                np.float32,
            ),
        ]
    )
    gt = np.concatenate(
        [
            gt,
            np.array(
                [[300, 300, 310, 310], [400, 400, 410, 410], [600, 600, 620, 620], [520, 520, 560, 560]], np.float32
            ),
        ]
    )
    gt_valid = np.array([True] * 7 + [False])
    return anchors, gt, gt_valid


@pytest.fixture(scope="module")
def rpn_reference():
    anchors, gt, gt_valid = _rpn_case()
    labels, matched, iou = _reference_match(gt, gt_valid, anchors, np.ones(len(anchors), bool), 0.7, 0.3, True)
    _assert_no_float32_ambiguity(iou, (0.7, 0.3), np.array([0.7, 0.3]))
    deltas = np.zeros((len(anchors), 4))
    for j in np.nonzero(labels == 1)[0]:
        deltas[j] = _encode(gt[matched[j]], anchors[j], (1, 1, 1, 1))
    n = len(anchors)
    # the hand-made cases came out as designed
    assert labels[n - 6 : n].tolist() == [1, -1, 0, 1, 1, 0]
    assert (matched[n - 3 : n - 1] == 5).all()
    assert (iou[6] == 0).all()
    return anchors, gt, gt_valid, labels, deltas


@pytest.fixture(scope="module")
def rpn_targets_fn():
    return jax.jit(
        lambda anchors, gt, valid, key, num, frac: rpn_targets(
            anchors, gt, valid, key, fg_iou_thresh=0.7, bg_iou_thresh=0.3, num_samples=num, positive_fraction=frac
        ),
        static_argnums=(4, 5),
    )


@pytest.mark.parametrize("num_samples, fraction", [(64, 0.5), (16, 0.25), (100_000, 0.5)])
def test_rpn_targets_match_float64_reference(rpn_reference, rpn_targets_fn, num_samples, fraction):
    anchors, gt, gt_valid, labels, ref_deltas = rpn_reference
    eligible_pos, eligible_neg = labels == 1, labels == 0
    assert eligible_pos.sum() >= 8 and eligible_neg.sum() > 300 and (labels == -1).sum() > 0
    out = rpn_targets_fn(anchors, gt, gt_valid, jax.random.key(3), num_samples, fraction)
    pos, neg, deltas = (np.asarray(out[k]) for k in ("positive", "negative", "deltas"))

    num_pos = min(int(num_samples * fraction), int(eligible_pos.sum()))
    num_neg = min(num_samples - num_pos, int(eligible_neg.sum()))
    assert pos.sum() == num_pos and neg.sum() == num_neg
    assert not (pos & ~eligible_pos).any(), "a sampled positive is not a foreground anchor"
    assert not (neg & ~eligible_neg).any(), "a sampled negative is not a background anchor"
    if num_samples == 100_000:  # everything eligible is taken
        np.testing.assert_array_equal(pos, eligible_pos)
        np.testing.assert_array_equal(neg, eligible_neg)
    # regression targets (weights 1) for every foreground anchor, zero elsewhere
    np.testing.assert_allclose(deltas[eligible_pos], ref_deltas[eligible_pos], rtol=1e-5, atol=1e-5)
    assert (deltas[~eligible_pos] == 0).all()


def test_rpn_targets_sample_changes_with_key(rpn_targets_fn, rpn_reference):
    anchors, gt, gt_valid, _, _ = rpn_reference
    a = rpn_targets_fn(anchors, gt, gt_valid, jax.random.key(3), 16, 0.25)
    b = rpn_targets_fn(anchors, gt, gt_valid, jax.random.key(4), 16, 0.25)
    c = rpn_targets_fn(anchors, gt, gt_valid, jax.random.key(3), 16, 0.25)
    assert not np.array_equal(np.asarray(a["negative"]), np.asarray(b["negative"]))
    np.testing.assert_array_equal(np.asarray(a["negative"]), np.asarray(c["negative"]))
    np.testing.assert_array_equal(np.asarray(a["positive"]), np.asarray(c["positive"]))


def test_rpn_targets_without_gt_are_all_background(rpn_reference, rpn_targets_fn):
    anchors, gt, _, _, _ = rpn_reference
    out = rpn_targets_fn(anchors, gt, np.zeros(len(gt), bool), jax.random.key(0), 64, 0.5)
    assert not np.asarray(out["positive"]).any() and np.asarray(out["negative"]).sum() == 64
    assert (np.asarray(out["deltas"]) == 0).all()


# --- roi_targets ------------------------------------------------------------------


def _roi_case():
    """Random proposals (the last 40 padding, each a copy of a gt, so that sampling
    them would show), gts with a duplicate of gt 0 under another label (ties go to
    the lower index) and a padded gt with a garbage label."""
    rng = np.random.default_rng(1)
    gt = _boxes(rng, 4, 10, 100, 25, 60)
    gt = np.concatenate([gt, gt[:1], np.array([[5, 5, 60, 60]], np.float32)])
    gt_labels = np.array([1, 2, 3, 4, 2, 99], np.int32)
    gt_valid = np.array([True] * 5 + [False])
    near = gt[rng.integers(0, 4, 160)] + rng.normal(0, 6, (160, 4)).astype(np.float32)
    proposals = np.concatenate([near, _boxes(rng, 100, 0, 250, 5, 50), gt[rng.integers(0, 6, 40)]]).astype(np.float32)
    proposal_valid = np.arange(len(proposals)) < 260
    return proposals, proposal_valid, gt, gt_labels, gt_valid


@pytest.fixture(scope="module", params=[(0.5, 0.5), (0.5, 0.1)], ids=["torchvision", "ignore_band"])
def roi_reference(request):
    fg, bg = request.param
    proposals, proposal_valid, gt, gt_labels, gt_valid = _roi_case()
    cands = np.concatenate([proposals, gt])
    cand_valid = np.concatenate([proposal_valid, gt_valid])
    labels, matched, iou = _reference_match(gt, gt_valid, cands, cand_valid, fg, bg, False)
    _assert_no_float32_ambiguity(iou[:, cand_valid], (fg, bg), np.array([1.0]))
    cls = np.where(labels == 1, gt_labels[matched], 0)
    return (fg, bg), (proposals, proposal_valid, gt, gt_labels, gt_valid), cands, cand_valid, labels, matched, cls


@pytest.fixture(scope="module")
def roi_targets_fn():
    return jax.jit(
        lambda p, pv, g, gl, gv, key, fg, bg, num, frac: roi_targets(
            p,
            pv,
            g,
            gl,
            gv,
            key,
            fg_iou_thresh=fg,
            bg_iou_thresh=bg,
            num_samples=num,
            positive_fraction=frac,
            weights=tuple(1 / s for s in STDS),
        ),
        static_argnums=(6, 7, 8, 9),
    )


@pytest.mark.parametrize("num_samples, fraction", [(64, 0.25), (48, 0.75), (512, 1.0)])
def test_roi_targets_match_float64_reference(roi_reference, roi_targets_fn, num_samples, fraction):
    (fg, bg), inputs, cands, cand_valid, labels, matched, cls = roi_reference
    eligible_pos, eligible_neg = labels == 1, labels == 0
    n_pos, n_neg = int(eligible_pos.sum()), int(eligible_neg.sum())
    assert n_pos > 40 and n_neg > 60
    assert ((labels == -1) & cand_valid).any() == (bg < fg)  # the ignore band, where there is one
    # the appended gts are foreground, the duplicate one matched to gt 0 and its label
    p = len(inputs[0])
    assert labels[p : p + 5].tolist() == [1] * 5 and labels[p + 5] == -1
    assert matched[p + 4] == 0 and cls[p + 4] == 1
    assert (labels[260:p] == -1).all()

    out = roi_targets_fn(*inputs, jax.random.key(5), fg, bg, num_samples, fraction)
    rois, got_cls, deltas, pos, valid = (np.asarray(out[k]) for k in ("rois", "labels", "deltas", "positive", "valid"))
    assert rois.shape == (num_samples, 4)

    num_pos = min(int(num_samples * fraction), n_pos)
    num_neg = min(num_samples - num_pos, n_neg)
    k = num_pos + num_neg
    # positives first, then negatives, then padding
    assert valid.tolist() == [True] * k + [False] * (num_samples - k)
    assert pos.tolist() == [True] * num_pos + [False] * (num_samples - num_pos)
    assert (got_cls[num_pos:] == 0).all() and (got_cls[:num_pos] >= 1).all()

    # identify each sampled RoI with the candidates of identical coordinates
    used = {}
    for s in range(k):
        same = np.nonzero(cand_valid & (cands == rois[s]).all(1))[0]
        assert len(same) > 0, f"sampled RoI {s} is not a valid candidate"
        j = same[0]
        assert (labels[same] == labels[j]).all()
        used[tuple(same)] = used.get(tuple(same), 0) + 1
        assert used[tuple(same)] <= len(same), "a candidate was sampled twice"
        if s < num_pos:
            assert labels[j] == 1, f"sampled positive {s} is not a foreground candidate"
            assert got_cls[s] == cls[j]
            np.testing.assert_allclose(
                deltas[s], _encode(inputs[2][matched[j]], cands[j], [1 / w for w in STDS]), rtol=1e-5, atol=1e-5
            )
        else:
            assert labels[j] == 0, f"sampled negative {s} is not a background candidate"
            assert (deltas[s] == 0).all()
    assert (deltas[k:] == 0).all()
    if k == n_pos + n_neg:  # everything eligible was taken: the multisets agree
        np.testing.assert_array_equal(_sorted_rows(rois[:num_pos]), _sorted_rows(cands[eligible_pos]))
        np.testing.assert_array_equal(_sorted_rows(rois[num_pos:k]), _sorted_rows(cands[eligible_neg]))


def test_roi_targets_append_gt_without_proposals(roi_targets_fn):
    """With no valid proposal the positives are exactly the valid gts, regressing to 0."""
    proposals, _, gt, gt_labels, gt_valid = _roi_case()
    out = roi_targets_fn(
        proposals, np.zeros(len(proposals), bool), gt, gt_labels, gt_valid, jax.random.key(0), 0.5, 0.5, 32, 0.25
    )
    pos = np.asarray(out["positive"])
    assert pos.sum() == 5 and np.asarray(out["valid"]).sum() == 5
    got = np.asarray(out["rois"])[pos]
    np.testing.assert_array_equal(_sorted_rows(got), _sorted_rows(gt[:5]))
    assert sorted(np.asarray(out["labels"])[pos].tolist()) == [1, 1, 2, 3, 4]  # the duplicate takes gt 0's label
    np.testing.assert_allclose(np.asarray(out["deltas"]), 0, atol=1e-6)
