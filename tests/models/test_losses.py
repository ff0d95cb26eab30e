"""Training targets and losses of Faster R-CNN: float64 loop references for the
targets, parity with torchvision's RPN and RoI-head losses on identical weights,
golden values, the empty-image case, the proposals' stop-gradient and bad targets.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_jax import state_dict
from lucid_jax.models import TORCHVISION_FASTER_RCNN, build_resnet_fpn_faster_rcnn
from lucid_jax.models import losses as L
from lucid_jax.models.targets import roi_targets, rpn_targets
from tests.models.conftest import TV_REASON, random_images

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
            np.array([[300, 300, 310, 310], [400, 400, 410, 410], [600, 600, 620, 620], [520, 520, 560, 560]], np.float32),
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
            p, pv, g, gl, gv, key, fg_iou_thresh=fg, bg_iou_thresh=bg, num_samples=num, positive_fraction=frac,
            bbox_reg_stds=STDS,
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
            np.testing.assert_allclose(deltas[s], _encode(inputs[2][matched[j]], cands[j], [1 / w for w in STDS]), rtol=1e-5, atol=1e-5)
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
    out = roi_targets_fn(proposals, np.zeros(len(proposals), bool), gt, gt_labels, gt_valid, jax.random.key(0), 0.5, 0.5, 32, 0.25)
    pos = np.asarray(out["positive"])
    assert pos.sum() == 5 and np.asarray(out["valid"]).sum() == 5
    got = np.asarray(out["rois"])[pos]
    np.testing.assert_array_equal(_sorted_rows(got), _sorted_rows(gt[:5]))
    assert sorted(np.asarray(out["labels"])[pos].tolist()) == [1, 1, 2, 3, 4]  # the duplicate takes gt 0's label
    np.testing.assert_allclose(np.asarray(out["deltas"]), 0, atol=1e-6)


# --- loss formulas ------------------------------------------------------------------


def test_smooth_l1_and_loss_terms_against_numpy():
    rng = np.random.default_rng(2)
    beta = 1 / 9
    x = rng.normal(0, 0.3, 1000).astype(np.float32)
    x[:3] = [beta, -beta, 0.0]
    ref = np.where(np.abs(x) < beta, 0.5 * x.astype(np.float64) ** 2 / beta, np.abs(x) - 0.5 * beta)
    np.testing.assert_allclose(np.asarray(L.smooth_l1(jnp.asarray(x), beta)), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(L.smooth_l1(jnp.asarray(x), 0.0)), np.abs(x))

    n = 50
    obj, d, td = rng.normal(0, 2, n), rng.normal(0, 0.5, (n, 4)), rng.normal(0, 0.5, (n, 4))
    pos, neg = rng.random(n) < 0.2, rng.random(n) < 0.5
    neg &= ~pos
    terms = L.rpn_loss_terms(jnp.float32(obj), jnp.float32(d), {"positive": pos, "negative": neg, "deltas": jnp.float32(td)}, beta)
    bce = np.log1p(np.exp(-np.abs(obj))) + np.maximum(obj, 0) - obj * pos
    sl1 = lambda v: np.where(np.abs(v) < beta, 0.5 * v * v / beta, np.abs(v) - 0.5 * beta)  # noqa: E731
    np.testing.assert_allclose(float(terms["cls"]), bce[pos | neg].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(terms["reg"]), sl1(d - td)[pos].sum(), rtol=1e-5)
    assert float(terms["count"]) == (pos | neg).sum()

    c = 4
    logits, cd, td = rng.normal(0, 2, (n, c)), rng.normal(0, 0.5, (n, c, 4)), rng.normal(0, 0.5, (n, 4))
    valid = rng.random(n) < 0.8
    pos = valid & (rng.random(n) < 0.3)
    labels = np.where(pos, rng.integers(1, c, n), 0)
    terms = L.roi_loss_terms(
        jnp.float32(logits), jnp.float32(cd), {"labels": labels, "deltas": jnp.float32(td), "positive": pos, "valid": valid}, beta
    )
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(float(terms["cls"]), -logp[np.arange(n), labels][valid].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(terms["reg"]), sl1(cd[np.arange(n), labels] - td)[pos].sum(), rtol=1e-5)
    assert float(terms["count"]) == valid.sum()


# --- parity with torchvision on identical weights -------------------------------------

TV_CLASSES, TV_REP, TV_TOPN = 4, 64, 4096
TV_SIZES = [(128, 128), (96, 112)]


def _tv_batch():
    x = np.random.default_rng(7).standard_normal((2, 3, 128, 128)).astype(np.float32)
    boxes = np.array(
        [[[10, 12, 60, 70], [50, 40, 120, 100], [30, 70, 64, 120]], [[20, 30, 90, 90], [5, 5, 40, 30], [0, 0, 0, 0]]],
        np.float32,
    )
    labels = np.array([[1, 3, 2], [2, 1, 7]], np.int32)  # the padded entry's label is garbage
    valid = np.array([[True, True, True], [True, True, False]])
    return x, {"boxes": boxes, "labels": labels, "valid": valid}


def test_losses_match_torchvision():
    """The four losses of torchvision's RPN and RoI heads in training mode.

    Sampling is made deterministic on both sides: the per-image batch sizes exceed
    the candidates and positive_fraction is 1, so every positive and negative is
    taken. The proposal counts keep every NMS survivor (no top-n cut at a near-tie),
    and the box head is narrow (64) to keep the thousands of RoIs cheap. The gts
    all overlap some anchor, avoiding our deliberate best-IoU-0 difference.
    """
    torch = pytest.importorskip("torch", reason=TV_REASON)
    pytest.importorskip("torchvision", reason=TV_REASON)
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.resnet import Bottleneck, ResNet
    from torchvision.ops.misc import FrozenBatchNorm2d

    from tests.models.test_torchvision_parity import _randomise_bn

    torch.manual_seed(0)
    body = ResNet(Bottleneck, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d)
    _randomise_bn(body, torch.Generator().manual_seed(1))
    backbone = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, [256, 512, 1024, 2048], 256)
    sampling = dict(
        rpn_pre_nms_top_n_train=TV_TOPN,
        rpn_post_nms_top_n_train=TV_TOPN,
        rpn_batch_size_per_image=100_000,
        rpn_positive_fraction=1.0,
        box_batch_size_per_image=TV_TOPN + 3,
        box_positive_fraction=1.0,
    )
    tv = FasterRCNN(
        backbone,
        box_head=TwoMLPHead(256 * 7 * 7, TV_REP),
        box_predictor=FastRCNNPredictor(TV_REP, TV_CLASSES),
        **sampling,
    )
    with torch.no_grad():  # spread the outputs so that every loss term matters
        tv.rpn.head.cls_logits.weight.mul_(30.0)
        tv.rpn.head.bbox_pred.weight.mul_(10.0)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
        tv.roi_heads.box_predictor.bbox_pred.weight.mul_(30.0)
    tv.train()  # FrozenBatchNorm2d stays frozen; the box head has no dropout

    x, targets = _tv_batch()
    tv_targets = [
        {"boxes": torch.from_numpy(targets["boxes"][i][targets["valid"][i]]),
         "labels": torch.from_numpy(targets["labels"][i][targets["valid"][i]]).long()}
        for i in range(2)
    ]
    with torch.no_grad():
        images = ImageList(torch.from_numpy(x), TV_SIZES)
        features = tv.backbone(images.tensors)
        proposals, rpn_losses = tv.rpn(images, features, tv_targets)
        _, roi_losses = tv.roi_heads(features, proposals, images.image_sizes, tv_targets)
    assert all(len(p) < TV_TOPN for p in proposals)  # no proposal was cut by the count
    expected = {
        "rpn_cls_loss": float(rpn_losses["loss_objectness"]),
        "rpn_reg_loss": float(rpn_losses["loss_rpn_box_reg"]),
        "roi_cls_loss": float(roi_losses["loss_classifier"]),
        "roi_reg_loss": float(roi_losses["loss_box_reg"]),
    }

    model = build_resnet_fpn_faster_rcnn(
        (1, 1, 1, 1),
        TV_CLASSES,
        1000,
        **{
            **TORCHVISION_FASTER_RCNN,
            "representation_size": TV_REP,
            "rpn_pre_nms_top_n": (TV_TOPN, 1000),
            "rpn_post_nms_top_n": (TV_TOPN, 1000),
            "rpn_batch_size_per_image": 100_000,
            "rpn_positive_fraction": 1.0,
            "box_batch_size_per_image": TV_TOPN + 3,
            "box_positive_fraction": 1.0,
        },
    )
    template = jax.eval_shape(model.init, jax.random.key(0), x)
    template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)
    variables = state_dict.from_state_dict(template, state_dict.from_torchvision_faster_rcnn(tv.state_dict()), strict=False, model=model)
    loss = jax.jit(
        lambda v, x, t, s: model.apply(
            v, x, t, s, method="loss", rngs={"dropout": jax.random.key(0), "sampling": jax.random.key(1)}, mutable=["batch_stats"]
        )
    )
    got, updates = loss(variables, x, targets, np.array(TV_SIZES, np.float32))
    for name, value in expected.items():
        assert value > 1e-3, name  # every term is exercised
        np.testing.assert_allclose(float(got[name]), value, rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(float(got["total_loss"]), sum(expected.values()), rtol=2e-5)
    # frozen BN: the "updated" statistics are the loaded ones
    jax.tree_util.tree_map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])


# --- the tiny detector: golden values, empty images, stop-gradient, bad targets --------


def _targets():
    """Two images, up to four boxes each (padding with garbage labels)."""
    boxes = np.array(
        [
            [[10, 12, 60, 70], [50, 40, 120, 100], [64, 0, 128, 40], [0, 0, 0, 0]],
            [[20, 30, 90, 110], [5, 80, 45, 120], [0, 0, 0, 0], [3, 3, 1, 1]],
        ],
        np.float32,
    )
    labels = np.array([[1, 3, 4, 0], [2, 1, 0, -9]], np.int32)
    valid = np.array([[True, True, True, False], [True, True, False, False]])
    return {"boxes": boxes, "labels": labels, "valid": valid}


@pytest.fixture(scope="module")
def loss_fn(tiny):
    model, _ = tiny
    return jax.jit(
        lambda v, x, t, k1, k2: model.apply(v, x, t, method="loss", rngs={"dropout": k1, "sampling": k2}, mutable=["batch_stats"])
    )


@pytest.fixture(scope="module")
def loss_grads(tiny):
    """Gradients of total_loss and of the RoI losses alone, from one compiled vjp."""
    model, _ = tiny

    def grads(v, x, t, k1, k2):
        def f(params):
            losses, _ = model.apply(
                {**v, "params": params}, x, t, method="loss", rngs={"dropout": k1, "sampling": k2}, mutable=["batch_stats"]
            )
            return jnp.stack([losses["total_loss"], losses["roi_cls_loss"] + losses["roi_reg_loss"]]), losses

        _, vjp, losses = jax.vjp(f, v["params"], has_aux=True)
        return vjp(jnp.array([1.0, 0.0]))[0], vjp(jnp.array([0.0, 1.0]))[0], losses

    return jax.jit(grads)


# Computed once with this code (jax 0.10.2, CPU) and pasted: 5 significant digits.
GOLDEN = {
    "rpn_cls_loss": 0.75344,
    "rpn_reg_loss": 0.052737,
    "roi_cls_loss": 3.5483,
    "roi_reg_loss": 0.61825,
}


def _spread(variables):
    """The tiny detector's init with its output layers scaled up, so that every loss
    depends on the logits and deltas (at init the RPN's BCE is ln 2 to 6 digits)."""
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])
    for path, factor in (("rpn/head/cls_logits", 100.0), ("rpn/head/bbox_pred", 30.0), ("cls_score", 30.0), ("bbox_pred", 300.0)):
        node = params
        for key in path.split("/"):
            node = node[key]
        node["kernel"] = node["kernel"] * factor
    return {**variables, "params": params}


def test_golden_losses(tiny, loss_fn):
    _, variables = tiny
    losses, _ = loss_fn(_spread(variables), random_images(11, batch=2), _targets(), jax.random.key(1), jax.random.key(2))
    got = {k: float(v) for k, v in losses.items()}
    for name, value in GOLDEN.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(got["total_loss"], sum(GOLDEN.values()), rtol=1e-4)


def _smooth_l1_64(x, beta):
    ax = np.abs(x)
    return np.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def test_golden_losses_from_a_float64_recomputation(tiny, monkeypatch):
    """The golden losses again, from the model's own logits, deltas and sampled targets,
    summed and normalised in a float64 NumPy loop instead of losses.py."""
    model, variables = tiny
    for name in ("rpn_loss_terms", "roi_loss_terms"):
        original = getattr(L, name)
        # keep each stage's inputs next to its terms; combine passes them back out below
        keep = lambda *a, _f=original: {**_f(*a), "inputs": a[:3]}
        monkeypatch.setattr(L, name, keep)
    combine = L.combine
    monkeypatch.setattr(L, "combine", lambda r, o: {**combine(r, o), "rpn": r["inputs"], "roi": o["inputs"]})
    out, _ = jax.jit(
        lambda v, x, t, k1, k2: model.apply(v, x, t, method="loss", rngs={"dropout": k1, "sampling": k2}, mutable=["batch_stats"])
    )(_spread(variables), random_images(11, batch=2), _targets(), jax.random.key(1), jax.random.key(2))
    beta = model.smooth_l1_beta
    objectness, deltas, t = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), out["rpn"])
    cls_logits, class_deltas, s = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), out["roi"])
    sums = {"rpn_cls": 0.0, "rpn_reg": 0.0, "rpn_n": 0, "roi_cls": 0.0, "roi_reg": 0.0, "roi_n": 0}
    for b in range(objectness.shape[0]):
        for a in range(objectness.shape[1]):
            if t["positive"][b, a] or t["negative"][b, a]:
                x, y = objectness[b, a], float(t["positive"][b, a])
                sums["rpn_cls"] += np.logaddexp(0.0, x) - y * x  # -y log(sigmoid x) - (1 - y) log(1 - sigmoid x)
                sums["rpn_n"] += 1
            if t["positive"][b, a]:
                sums["rpn_reg"] += _smooth_l1_64(deltas[b, a] - t["deltas"][b, a], beta).sum()
        for r in range(cls_logits.shape[1]):
            if not s["valid"][b, r]:
                continue
            label, logits = int(s["labels"][b, r]), cls_logits[b, r]
            sums["roi_cls"] += math.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[label]
            sums["roi_n"] += 1
            if s["positive"][b, r]:
                sums["roi_reg"] += _smooth_l1_64(class_deltas[b, r, label] - s["deltas"][b, r], beta).sum()
    assert sums["rpn_n"] > 0 and sums["roi_n"] > 0 and sums["rpn_reg"] > 0 and sums["roi_reg"] > 0
    for name, golden in GOLDEN.items():
        stage, kind = name.split("_")[:2]
        want = sums[f"{stage}_{kind}"] / sums[f"{stage}_n"]
        np.testing.assert_allclose(want, golden, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(float(out[name]), want, rtol=1e-5, err_msg=name)


def test_images_without_boxes(tiny, loss_grads):
    _, variables = tiny
    targets = _targets()
    targets["valid"][:] = False
    g_total, _, losses = loss_grads(variables, random_images(12, batch=2), targets, jax.random.key(1), jax.random.key(2))
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert float(losses["rpn_reg_loss"]) == 0.0 and float(losses["roi_reg_loss"]) == 0.0
    assert float(losses["rpn_cls_loss"]) > 0 and float(losses["roi_cls_loss"]) > 0
    leaves = jax.tree_util.tree_leaves_with_path(g_total)
    assert all(np.isfinite(np.asarray(g)).all() for _, g in leaves)
    norm = math.sqrt(sum(float(jnp.sum(g * g)) for _, g in leaves))
    assert norm > 1e-3
    # the classifiers of both stages learn "background"
    assert np.abs(np.asarray(g_total["rpn"]["head"]["cls_logits"]["kernel"])).max() > 0
    assert np.abs(np.asarray(g_total["cls_score"]["kernel"])).max() > 0


def test_proposals_are_under_stop_gradient(tiny, loss_grads):
    _, variables = tiny
    g_total, g_roi, losses = loss_grads(variables, random_images(11, batch=2), _targets(), jax.random.key(1), jax.random.key(2))
    assert float(losses["roi_reg_loss"]) > 0
    rpn_roi = jax.tree_util.tree_leaves(g_roi["rpn"]["head"])
    assert len(rpn_roi) == 6 and all((np.asarray(g) == 0).all() for g in rpn_roi)
    # ... while the RoI losses do reach the box head and the shared backbone,
    assert np.abs(np.asarray(g_roi["fc1"]["kernel"])).max() > 0
    assert np.abs(np.asarray(g_roi["backbone"]["net"]["stem"]["0"]["kernel"])).max() > 0
    # and the total loss does reach the RPN head
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(g_total["rpn"]["head"]))


def _bad(change):
    t = _targets()
    change(t)
    return t


@pytest.mark.parametrize(
    "targets, match",
    [
        (_bad(lambda t: t.pop("valid")), r'"valid" \[B, M\]'),
        (_bad(lambda t: t.pop("boxes")), r'"boxes" \[B, M, 4\]'),
        ((1, 2, 3), r"targets must be a dict"),
        (_bad(lambda t: t.update(boxes=t["boxes"][..., :3])), r'targets\["boxes"\] must have shape \[B, M, 4\]'),
        (_bad(lambda t: t.update(boxes=t["boxes"][:1])), r'targets\["boxes"\] must have shape \[B, M, 4\] with B = 2'),
        (_bad(lambda t: t.update(boxes=t["boxes"][0])), r'targets\["boxes"\] must have shape \[B, M, 4\]'),
        (_bad(lambda t: t.update(labels=t["labels"][:, :3])), r'targets\["labels"\] must have shape \[B, M\] = \(2, 4\)'),
        (_bad(lambda t: t.update(labels=t["labels"][:1])), r'targets\["labels"\] must have shape \[B, M\] = \(2, 4\)'),
        (_bad(lambda t: t.update(valid=t["valid"][..., None])), r'targets\["valid"\] must have shape \[B, M\] = \(2, 4\)'),
    ],
)
def test_bad_targets_fail_at_trace_time(tiny, targets, match):
    model, variables = tiny
    fn = lambda v, x, t: model.apply(v, x, t, method="loss", rngs={"dropout": jax.random.key(0), "sampling": jax.random.key(1)}, mutable=["batch_stats"])  # noqa: E731
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(fn, variables, random_images(0, batch=2), targets)
