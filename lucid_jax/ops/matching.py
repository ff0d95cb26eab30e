"""IoU matching of candidates (anchors or RoIs) to ground truth, for one image.

The assignment is the one of Faster R-CNN (Ren et al., 2015, section 3.1.2) with the
rules of torchvision's ``models.detection._utils.Matcher``:

- each candidate takes its best ground truth by IoU (ties: the lowest gt index);
- it is POSITIVE if that IoU is >= ``fg_iou_thresh``, NEGATIVE if it is
  < ``bg_iou_thresh`` and IGNORE in between (the ignore band);
- with ``allow_low_quality_matches`` (the RPN setting), every candidate that attains
  some gt's highest IoU, ties included, is POSITIVE as well, still matched to its
  own best gt as torchvision does, so that no gt is left without an anchor.

One deliberate difference: a gt whose highest IoU is 0 (it overlaps no candidate)
gives no low-quality matches. torchvision's ``max == row`` test would mark every
candidate POSITIVE for such a gt, which turns a whole image of background into
foreground.

Padding is explicit: gts with ``gt_valid`` False are never matched, candidates with
``candidate_valid`` False are IGNORE and do not count as a gt's best candidate. The
thresholds are compared in the dtype of ``iou`` (float32 IoU against float32(0.7)),
which is what torchvision's tensor-scalar comparisons do.
"""

import enum
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from lucid_jax.ops.checks import check_dtype, check_length, check_shape


class MatchLabel(enum.IntEnum):
    """Training label of a candidate; the values are the ones the samplers read."""

    IGNORE = -1
    NEGATIVE = 0
    POSITIVE = 1


def _check_inputs(fn, iou, gt_valid, candidate_valid, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches):
    shape = np.shape(iou)
    check_shape(fn, "iou", iou, "[G, N]", len(shape) == 2)
    check_dtype(fn, "iou", iou, "floating")
    g, n = shape
    for name, arr, size, axis in (("gt_valid", gt_valid, g, "G"), ("candidate_valid", candidate_valid, n, "N")):
        if arr is None:
            continue
        check_length(fn, name, arr, size, axis, "iou")
        check_dtype(fn, name, arr, "bool")
    if not isinstance(allow_low_quality_matches, bool):
        raise TypeError(f"{fn}: allow_low_quality_matches must be a Python bool, got {allow_low_quality_matches!r}")
    for name, t in (("fg_iou_thresh", fg_iou_thresh), ("bg_iou_thresh", bg_iou_thresh)):
        if isinstance(t, bool) or not (isinstance(t, numbers.Real) or (isinstance(t, jax.Array) and t.ndim == 0)):
            raise TypeError(f"{fn}: {name} must be a scalar float, got {t!r}")
    if not any(isinstance(t, jax.core.Tracer) for t in (fg_iou_thresh, bg_iou_thresh)):
        if not bg_iou_thresh <= fg_iou_thresh:
            raise ValueError(
                f"{fn}: bg_iou_thresh must be <= fg_iou_thresh, got bg_iou_thresh={bg_iou_thresh} "
                f"and fg_iou_thresh={fg_iou_thresh}"
            )
    return g, n


def match_boxes(iou, gt_valid, candidate_valid=None, *, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches):
    """Matches each candidate to its best valid ground truth and labels it.

    Args:
      iou: [G, N] IoU of every gt with every candidate (``box_iou(gt, candidates)``).
      gt_valid: [G] bool, False for padding gts.
      candidate_valid: [N] bool or None (all valid), False for padding candidates.
      fg_iou_thresh: IoU >= this is POSITIVE (0.7 for the RPN, 0.5 for the RoI head).
      bg_iou_thresh: IoU < this is NEGATIVE (0.3 for the RPN, 0.5 for the RoI head).
      allow_low_quality_matches: also make each gt's best candidates POSITIVE
        (ties included, only where that best IoU is > 0).

    Returns:
      matched_gt: [N] int32 index of the matched gt for POSITIVE candidates, and 0
        elsewhere: it is only meaningful where ``labels == POSITIVE``.
      labels: [N] int32 ``MatchLabel`` values. With no valid gt every valid
        candidate is NEGATIVE; invalid candidates are always IGNORE.
    """
    g, n = _check_inputs(
        "match_boxes", iou, gt_valid, candidate_valid, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches
    )
    iou = jnp.asarray(iou)
    gt_valid = jnp.asarray(gt_valid)
    candidate_valid = jnp.ones((n,), bool) if candidate_valid is None else jnp.asarray(candidate_valid)
    if g == 0:  # argmax over an empty axis is undefined; there is nothing to match
        labels = jnp.where(candidate_valid, MatchLabel.NEGATIVE, MatchLabel.IGNORE).astype(jnp.int32)
        return jnp.zeros((n,), jnp.int32), labels

    # -inf so that padded gts lose every argmax and fall below any threshold.
    per_candidate = jnp.where(gt_valid[:, None], iou, -jnp.inf)  # [G, N]
    best_gt = jnp.argmax(per_candidate, axis=0).astype(jnp.int32)  # [N], first maximum on ties
    best_iou = jnp.max(per_candidate, axis=0)  # [N]
    labels = jnp.where(
        best_iou >= fg_iou_thresh,
        MatchLabel.POSITIVE,
        jnp.where(best_iou < bg_iou_thresh, MatchLabel.NEGATIVE, MatchLabel.IGNORE),
    )  # [N]

    if allow_low_quality_matches:
        both_valid = gt_valid[:, None] & candidate_valid[None, :]  # [G, N]
        gt_best = jnp.max(jnp.where(both_valid, iou, -jnp.inf), axis=1, initial=-jnp.inf)  # [G]
        # A gt that touches nothing (best IoU 0) would otherwise claim every candidate.
        attains = both_valid & (iou == gt_best[:, None]) & (gt_best[:, None] > 0)  # [G, N]
        labels = jnp.where(jnp.any(attains, axis=0), MatchLabel.POSITIVE, labels)  # [N]

    # Without a valid gt, best_iou is -inf: NEGATIVE whatever the thresholds are.
    labels = jnp.where(jnp.any(gt_valid), labels, MatchLabel.NEGATIVE)
    labels = jnp.where(candidate_valid, labels, MatchLabel.IGNORE).astype(jnp.int32)  # [N]
    matched_gt = jnp.where(labels == MatchLabel.POSITIVE, best_gt, 0)  # [N]
    return matched_gt, labels
