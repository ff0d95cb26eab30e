"""Training targets of Faster R-CNN (Ren et al., NeurIPS 2015, sections 3.1.2 and 3.3),
for one image, with static shapes.

RPN: every anchor is matched to the ground truth (IoU >= 0.7 foreground, < 0.3
background, each box's best anchors foreground too) and 256 anchors are sampled,
at most half of them positive. RoI head: the ground-truth boxes are appended to
the proposals, which are matched at IoU 0.5 and sampled 512 at a time, at most a
quarter positive (Fast R-CNN, Girshick 2015, section 2.3).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lucid_jax import ops
from lucid_jax.ops.matching import MatchLabel, match_boxes
from lucid_jax.ops.sampling import sample_balanced, sample_balanced_indices


def rpn_targets(
    anchors: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    key: jax.Array,
    *,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    num_samples: int,
    positive_fraction: float,
) -> dict:
    """Objectness and box targets for every anchor of one image.

    Args:
      anchors: [N, 4] xyxy.
      gt_boxes: [M, 4] xyxy (padded).
      gt_valid: [M] bool.
      key: PRNG key of the balanced sampler.

    Returns:
      {"positive": [N] bool, "negative": [N] bool} the sampled anchors, and
      "deltas": [N, 4] regression targets (weights 1; zero where not positive).
    """
    iou = ops.box_iou(gt_boxes, anchors)  # [M, N]
    matched, labels = match_boxes(
        iou, gt_valid, fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh, allow_low_quality_matches=True
    )
    positive, negative = sample_balanced(labels, key, num_samples=num_samples, positive_fraction=positive_fraction)
    is_fg = (labels == MatchLabel.POSITIVE)[:, None]  # [N, 1]
    # Non-foreground anchors encode against themselves, so no log(0) reaches the loss
    # or its gradient through a padded ground-truth box.
    target = jnp.where(is_fg, gt_boxes[matched], anchors)  # [N, 4]
    return {"positive": positive, "negative": negative, "deltas": ops.encode_boxes(target, anchors)}


def roi_targets(
    proposals: jax.Array,
    proposal_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    gt_valid: jax.Array,
    key: jax.Array,
    *,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    num_samples: int,
    positive_fraction: float,
    weights: Sequence[float],
) -> dict:
    """Sample RoIs among the proposals and ground truth, with their targets.

    Args:
      proposals: [P, 4] xyxy (stop-gradient'ed).
      proposal_valid: [P] bool.
      gt_boxes: [M, 4] xyxy; gt_labels: [M] int32 in 1..C-1; gt_valid: [M] bool.
      key: PRNG key of the balanced sampler.
      weights: the box coder's weights (the inverses of ``bbox_reg_stds``).

    Returns:
      {"rois": [S, 4], "labels": [S] int32 (0 = background), "deltas": [S, 4]
      in units of bbox_reg_stds, "positive": [S] bool, "valid": [S] bool},
      S = num_samples, positives first.
    """
    candidates = jnp.concatenate([proposals, gt_boxes.astype(proposals.dtype)])  # [P+M, 4]
    candidate_valid = jnp.concatenate([proposal_valid, gt_valid])  # [P+M]
    iou = ops.box_iou(gt_boxes, candidates)  # [M, P+M]
    matched, labels = match_boxes(
        iou,
        gt_valid,
        candidate_valid,
        fg_iou_thresh=fg_iou_thresh,
        bg_iou_thresh=bg_iou_thresh,
        allow_low_quality_matches=False,
    )
    idx, valid = sample_balanced_indices(labels, key, num_samples=num_samples, positive_fraction=positive_fraction)
    rois = candidates[idx]  # [S, 4]
    positive = valid & (labels[idx] == MatchLabel.POSITIVE)  # [S]
    gt = matched[idx]  # [S]
    # Only positives have a regression target; the rest encode a unit box against
    # itself (padded RoIs are empty boxes, whose deltas would be 0/0).
    unit = jnp.array([0.0, 0.0, 1.0, 1.0], rois.dtype)
    source = jnp.where(positive[:, None], rois, unit)  # [S, 4]
    target = jnp.where(positive[:, None], gt_boxes[gt], unit)  # [S, 4]
    return {
        "rois": rois,
        "labels": jnp.where(positive, gt_labels[gt], 0).astype(jnp.int32),
        "deltas": ops.encode_boxes(target, source, weights),
        "positive": positive,
        "valid": valid,
    }
