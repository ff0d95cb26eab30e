"""Balanced positive/negative sampling of training candidates, for one image.

The minibatch rule of Faster R-CNN (Ren et al., 2015, section 3.1.3), with the
counts of torchvision's ``BalancedPositiveNegativeSampler``:

    num_pos = min(int(num_samples * positive_fraction), #POSITIVE)
    num_neg = min(num_samples - num_pos, #NEGATIVE)

each drawn uniformly without replacement; IGNORE candidates are never drawn. As in
torchvision, any label >= 1 counts as positive, so class labels work as well as
``MatchLabel`` values.

torchvision draws with ``randperm`` over a data-dependent list of indices. Here every
candidate gets an independent random priority and ``top_k`` ranks the eligible ones,
so the shapes depend only on ``N`` and ``num_samples``: the first ``num_pos``
positives by priority are a uniform sample without replacement, and so are the
negatives, as the two sets are disjoint.
"""

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from lucid_jax.ops.checks import check_dtype, check_shape, check_static_count
from lucid_jax.ops.matching import MatchLabel


def _check_inputs(fn, labels, num_samples, positive_fraction):
    check_shape(fn, "labels", labels, "[N]", np.ndim(labels) == 1)
    check_dtype(fn, "labels", labels, "integer", " of MatchLabel values")
    num_samples = check_static_count(fn, "num_samples", num_samples)
    if not isinstance(positive_fraction, numbers.Real) or not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"{fn}: positive_fraction must be a Python float in [0, 1], got {positive_fraction!r}")
    return num_samples


def _draw(labels, key, num_samples, positive_fraction):
    """The top-``k`` positives and negatives by random priority, and how many of each to take.

    Returns:
      pos_idx, neg_idx: [k] int32 candidate indices by decreasing priority,
        ``k = min(num_samples, N)``; past the eligible ones they are arbitrary.
      pos_take, neg_take: [k] bool, True for the sampled entries (a prefix).
    """
    labels = jnp.asarray(labels)
    (n,) = labels.shape
    k = min(num_samples, n)
    is_pos = labels >= MatchLabel.POSITIVE  # [N]
    is_neg = labels == MatchLabel.NEGATIVE  # [N]
    # 31 random bits (not a float in [0, 1)) make equal priorities, and with them a
    # bias towards low indices, vanishingly rare even for 200k anchors.
    priority = (jax.random.bits(key, (n,), jnp.uint32) >> 1).astype(jnp.int32)  # [N]
    _, pos_idx = jax.lax.top_k(jnp.where(is_pos, priority, -1), k)  # [k]
    _, neg_idx = jax.lax.top_k(jnp.where(is_neg, priority, -1), k)  # [k]
    num_pos = jnp.minimum(jnp.sum(is_pos), int(num_samples * positive_fraction))
    num_neg = jnp.minimum(jnp.sum(is_neg), num_samples - num_pos)
    rank = jnp.arange(k)  # [k]
    return pos_idx.astype(jnp.int32), neg_idx.astype(jnp.int32), rank < num_pos, rank < num_neg


def sample_balanced(labels, key, *, num_samples, positive_fraction):
    """Samples at most ``num_samples`` candidates, at most a ``positive_fraction`` of them positive.

    Args:
      labels: [N] int ``MatchLabel`` values (IGNORE -1, NEGATIVE 0, POSITIVE >= 1).
      key: a JAX PRNG key; the same key gives the same sample.
      num_samples: sample size (256 for the RPN, 512 for the RoI head).
      positive_fraction: the largest share of positives (0.5 RPN, 0.25 RoI head);
        negatives fill the rest when there are too few positives.

    Returns:
      positive: [N] bool, the sampled positives.
      negative: [N] bool, the sampled negatives (disjoint from ``positive``).
    """
    num_samples = _check_inputs("sample_balanced", labels, num_samples, positive_fraction)
    (n,) = np.shape(labels)
    pos_idx, neg_idx, pos_take, neg_take = _draw(labels, key, num_samples, positive_fraction)
    # top_k indices are distinct, so the scatter has no colliding writes.
    positive = jnp.zeros((n,), bool).at[pos_idx].set(pos_take)  # [N]
    negative = jnp.zeros((n,), bool).at[neg_idx].set(neg_take)  # [N]
    return positive, negative


def sample_balanced_indices(labels, key, *, num_samples, positive_fraction):
    """The sample of ``sample_balanced`` (same key, same candidates) as fixed-size indices.

    Args:
      labels, key, num_samples, positive_fraction: as for ``sample_balanced``.

    Returns:
      indices: [num_samples] int32: the sampled positives in increasing index order,
        then the sampled negatives in increasing index order, then padding 0.
      valid: [num_samples] bool, False on the padding.
    """
    num_samples = _check_inputs("sample_balanced_indices", labels, num_samples, positive_fraction)
    (n,) = np.shape(labels)
    pos_idx, neg_idx, pos_take, neg_take = _draw(labels, key, num_samples, positive_fraction)
    cand = jnp.concatenate([pos_idx, neg_idx])  # [2k]
    take = jnp.concatenate([pos_take, neg_take])  # [2k]
    # One sort key orders positives before negatives, each by index, and padding last.
    group = jnp.concatenate([jnp.zeros_like(pos_idx), jnp.ones_like(neg_idx)])  # [2k]
    order = jnp.argsort(jnp.where(take, group * n + cand, 2 * n))[:num_samples]  # [min(2k, num_samples)]
    pad = num_samples - order.shape[0]  # only when N < num_samples
    valid = jnp.pad(take[order], (0, pad))  # [num_samples]
    indices = jnp.pad(jnp.where(valid[: order.shape[0]], cand[order], 0), (0, pad))  # [num_samples]
    return indices.astype(jnp.int32), valid
