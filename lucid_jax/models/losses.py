"""The four Faster R-CNN losses (Ren et al., 2015, eq. 1), named as Lucid names them.

Each per-image function returns (sum, count) pairs; ``batch_mean`` divides the
summed sums by the summed counts, so a loss is an average over every sampled
anchor or RoI of the batch, as torchvision computes it. The box losses are smooth
L1 (Huber) with torchvision's beta of 1/9, summed over positives and divided by
the number sampled.
"""

import jax
import jax.numpy as jnp
import optax

LOSS_NAMES = ("rpn_cls_loss", "rpn_reg_loss", "roi_cls_loss", "roi_reg_loss")


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
    """Elementwise smooth L1: 0.5 x^2 / beta for |x| < beta, else |x| - 0.5 beta."""
    ax = jnp.abs(x)
    if beta <= 0:
        return ax
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def rpn_loss_terms(objectness: jax.Array, deltas: jax.Array, targets: dict, beta: float) -> dict:
    """One image's RPN loss sums.

    Args:
      objectness: [N] logits.
      deltas: [N, 4] predicted deltas.
      targets: ``rpn_targets`` output: "positive", "negative" [N] bool, "deltas" [N, 4].

    Returns:
      {"cls": BCE summed over sampled anchors, "reg": smooth L1 summed over
      positives, "count": number sampled}, float32 scalars.
    """
    pos, neg = targets["positive"], targets["negative"]
    sampled = pos | neg
    bce = optax.sigmoid_binary_cross_entropy(objectness, pos.astype(objectness.dtype))  # [N]
    reg = smooth_l1(deltas - targets["deltas"], beta).sum(-1)  # [N]
    return {
        "cls": jnp.sum(jnp.where(sampled, bce, 0.0)),
        "reg": jnp.sum(jnp.where(pos, reg, 0.0)),
        "count": jnp.sum(sampled).astype(jnp.float32),
    }


def roi_loss_terms(cls_logits: jax.Array, class_deltas: jax.Array, targets: dict, beta: float) -> dict:
    """One image's box-head loss sums.

    Args:
      cls_logits: [S, C].
      class_deltas: [S, C, 4] predicted per-class deltas.
      targets: ``roi_targets`` output: "labels" [S], "deltas" [S, 4],
        "positive" [S], "valid" [S].

    Returns:
      {"cls": cross-entropy summed over sampled RoIs, "reg": smooth L1 of the
      target class's deltas summed over positives, "count": number sampled}.
    """
    labels, valid, pos = targets["labels"], targets["valid"], targets["positive"]
    ce = optax.softmax_cross_entropy_with_integer_labels(cls_logits, labels)  # [S]
    pred = jnp.take_along_axis(class_deltas, labels[:, None, None], axis=1)[:, 0]  # [S, 4]
    reg = smooth_l1(pred - targets["deltas"], beta).sum(-1)  # [S]
    return {
        "cls": jnp.sum(jnp.where(valid, ce, 0.0)),
        "reg": jnp.sum(jnp.where(pos, reg, 0.0)),
        "count": jnp.sum(valid).astype(jnp.float32),
    }


def batch_mean(terms: dict, stage: str) -> dict:
    """One stage's batch losses from its per-image terms ([B] arrays).

    Each loss is the batch's summed loss divided by the batch's sampled count (at
    least 1), named as Lucid names it: ``{stage}_cls_loss`` and ``{stage}_reg_loss``.
    """
    count = jnp.maximum(jnp.sum(terms["count"]), 1.0)
    return {f"{stage}_cls_loss": jnp.sum(terms["cls"]) / count, f"{stage}_reg_loss": jnp.sum(terms["reg"]) / count}


def total_loss(losses: dict) -> jax.Array:
    """The sum of the four losses of ``LOSS_NAMES`` (Ren et al., eq. 1, with lambda = 1)."""
    return sum(losses[name] for name in LOSS_NAMES)
