"""Helpers of the parity tests against torchvision: run torchvision's stages on a
padded batch, and compare our proposals, class probabilities and detections with
them, one to one up to near-ties."""

import numpy as np


def run_torchvision(tv, x, sizes):
    """torchvision's stages on a padded batch whose images have the given (h, w).

    Returns:
      per image, (proposals, logits, boxes, scores, labels) as NumPy arrays.
    """
    import torch
    from torchvision.models.detection.image_list import ImageList

    with torch.no_grad():
        images = ImageList(torch.from_numpy(x), [tuple(int(v) for v in s) for s in sizes])
        features = tv.backbone(images.tensors)
        proposals, _ = tv.rpn(images, features)
        pooled = tv.roi_heads.box_roi_pool(features, proposals, images.image_sizes)
        logits, regression = tv.roi_heads.box_predictor(tv.roi_heads.box_head(pooled))
        boxes, scores, labels = tv.roi_heads.postprocess_detections(logits, regression, proposals, images.image_sizes)
    logits = logits.split([len(p) for p in proposals])
    return [tuple(t[i].numpy() for t in (proposals, logits, boxes, scores, labels)) for i in range(len(x))]


def match_boxes(ours, theirs, scores, atol, max_swapped=0.01):
    """Pair each of our boxes with torchvision's nearest one, one to one.

    Float rounding may swap two entries whose scores are within 1e-5 of each
    other, for at most ``max_swapped`` of the entries (and 2); anything else is a
    mismatch.

    Returns:
      perm such that ours[i] corresponds to theirs[perm[i]].
    """
    n = len(ours)
    perm = np.arange(n)
    moved = np.nonzero(np.abs(ours - theirs).max(-1) > atol + 1e-5 * np.abs(theirs).max(-1))[0]
    assert len(moved) <= max(2, int(n * max_swapped)), f"{len(moved)} of {n} entries differ"
    for i in moved:
        perm[i] = moved[np.abs(ours[i] - theirs[moved]).max(-1).argmin()]
    assert len(set(perm[moved].tolist())) == len(moved), "two of our boxes match the same torchvision box"
    np.testing.assert_allclose(ours, theirs[perm], rtol=1e-5, atol=atol)
    np.testing.assert_allclose(scores[moved], scores[perm[moved]], atol=1e-5)
    return perm


def compare_with_torchvision(theirs, raw, dets, box_atol=2e-3, score_atol=1e-4, max_swapped=0.01):
    """Assert our outputs equal torchvision's, image by image.

    Args:
      theirs: ``run_torchvision``'s output.
      raw: our ``forward_with_proposals`` output; dets: our ``predict`` output.
      box_atol: proposals' and detection boxes' tolerance, pixels.
      score_atol: class probabilities' and detection scores' tolerance.
      max_swapped: the largest share of entries that may swap places with a
        near-tie (see ``match_boxes``).

    Returns:
      per image, the largest |ours - torchvision| of (proposals, detection boxes).
    """
    import torch

    errors = []
    for i, (tv_props, tv_logits, tv_boxes, tv_scores, tv_labels) in enumerate(theirs):
        # RPN proposals: the same boxes in the same order (up to near-ties)
        valid = np.asarray(raw["proposal_valid"][i])
        n = int(valid.sum())
        assert n == len(tv_props) > 100 and valid[:n].all()
        props = np.asarray(raw["proposals"][i, :n])
        perm = match_boxes(props, tv_props, np.asarray(raw["proposal_scores"][i, :n]), box_atol, max_swapped)
        prop_err = np.abs(props - tv_props[perm]).max()

        # RoI-head class probabilities for every proposal
        logits = np.asarray(raw["cls_logits"][i, :n])
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        tv_probs = torch.softmax(torch.from_numpy(tv_logits), -1).numpy()
        np.testing.assert_allclose(probs, tv_probs[perm], atol=score_atol)

        # final detections
        k = int(np.asarray(dets["valid"][i]).sum())
        assert k == len(tv_scores) and k > 10
        scores = np.asarray(dets["scores"][i, :k])
        boxes = np.asarray(dets["boxes"][i, :k])
        perm = match_boxes(boxes, tv_boxes, scores, box_atol, max_swapped)
        np.testing.assert_array_equal(np.asarray(dets["labels"][i, :k]), tv_labels[perm])
        np.testing.assert_allclose(scores, tv_scores[perm], atol=score_atol)
        errors.append((prop_err, np.abs(boxes - tv_boxes[perm]).max()))
    return errors


def every_candidate_sampled(topn: int) -> tuple[dict, dict]:
    """torchvision's and our keywords that make training's sampling deterministic: every
    NMS survivor is a proposal (up to ``topn``), and every anchor and RoI candidate is
    sampled (batch sizes above the candidates, positive fraction 1).

    Returns:
      (torchvision ``FasterRCNN`` keywords, our builder's keywords).
    """
    tv = dict(
        rpn_pre_nms_top_n_train=topn,
        rpn_post_nms_top_n_train=topn,
        rpn_batch_size_per_image=100_000,
        rpn_positive_fraction=1.0,
        box_batch_size_per_image=topn + 3,
        box_positive_fraction=1.0,
    )
    ours = dict(
        rpn_pre_nms_top_n=(topn, 1000),
        rpn_post_nms_top_n=(topn, 1000),
        rpn_batch_size_per_image=100_000,
        rpn_positive_fraction=1.0,
        box_batch_size_per_image=topn + 3,
        box_positive_fraction=1.0,
    )
    return tv, ours


def torchvision_losses(tv, x, sizes, targets, topn: int) -> dict:
    """torchvision's four training losses on a padded batch, named as ours.

    Args:
      tv: a FasterRCNN built with ``every_candidate_sampled(topn)``, in the mode wanted.
      x: [B, 3, H, W] float32; sizes: per image (h, w).
      targets: {"boxes" [B, M, 4], "labels" [B, M], "valid" [B, M]} (NumPy).
    """
    import torch
    from torchvision.models.detection.image_list import ImageList

    tv_targets = [
        {
            "boxes": torch.from_numpy(targets["boxes"][i][targets["valid"][i]]),
            "labels": torch.from_numpy(targets["labels"][i][targets["valid"][i]]).long(),
        }
        for i in range(len(x))
    ]
    with torch.no_grad():
        images = ImageList(torch.from_numpy(x), [tuple(int(v) for v in s) for s in sizes])
        features = tv.backbone(images.tensors)
        proposals, rpn_losses = tv.rpn(images, features, tv_targets)
        _, roi_losses = tv.roi_heads(features, proposals, images.image_sizes, tv_targets)
    assert all(len(p) < topn for p in proposals)  # no proposal was cut by the count
    return {
        "rpn_cls_loss": float(rpn_losses["loss_objectness"]),
        "rpn_reg_loss": float(rpn_losses["loss_rpn_box_reg"]),
        "roi_cls_loss": float(roi_losses["loss_classifier"]),
        "roi_reg_loss": float(roi_losses["loss_box_reg"]),
    }
