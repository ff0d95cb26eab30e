"""The Fast R-CNN box head (Girshick, ICCV 2015) on RoIAlign features (He et al.,
"Mask R-CNN", 2017), and its inference post-processing.

The head is two fully connected layers (``fc1``, ``fc2``) then a classifier
(``cls_score``, C outputs) and a per-class box regressor (``bbox_pred``, 4C
outputs). Regression targets are normalised by ``bbox_reg_stds``, Lucid's buffer
(torchvision's box-coder weights are their inverses).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lucid_jax import ops


class RoIBoxHead(nn.Module):
    """``fc1`` -> ReLU -> dropout -> ``fc2`` -> ReLU -> dropout -> scores, deltas.

    Attributes:
      num_classes: C, background included (class 0).
      representation_size: width of fc1 and fc2 (1024).
      dropout_rate: dropout after fc1 and fc2 in training (Lucid: 0.5).
      dtype: computation dtype.
    """

    num_classes: int
    representation_size: int = 1024
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_features: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Classify and regress pooled RoIs.

        Args:
          roi_features: [B, R, S, S, C] pooled features (channels last).
          train: enable dropout (needs the "dropout" rng).

        Returns:
          cls_logits [B, R, num_classes] and class_deltas [B, R, num_classes, 4],
          both float32; deltas are in units of ``bbox_reg_stds``.
        """
        b, r, s, _, c = roi_features.shape
        # Flatten in (C, S, S) order, as Lucid and torchvision do, so fc1's weight
        # converts by a plain transpose.
        x = jnp.transpose(roi_features, (0, 1, 4, 2, 3)).reshape(b, r, c * s * s).astype(self.dtype)
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        x = drop(nn.relu(nn.Dense(self.representation_size, dtype=self.dtype, name="fc1")(x)))
        x = drop(nn.relu(nn.Dense(self.representation_size, dtype=self.dtype, name="fc2")(x)))
        cls_logits = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype, name="cls_score"
        )(x)
        deltas = nn.Dense(
            4 * self.num_classes, kernel_init=nn.initializers.normal(0.001), dtype=self.dtype, name="bbox_pred"
        )(x)
        return cls_logits.astype(jnp.float32), deltas.astype(jnp.float32).reshape(b, r, self.num_classes, 4)


def postprocess_detections(
    cls_logits: jax.Array,
    class_deltas: jax.Array,
    proposals: jax.Array,
    proposal_valid: jax.Array,
    image_size: jax.Array,
    *,
    bbox_reg_stds: Sequence[float],
    score_thresh: float,
    nms_thresh: float,
    max_detections: int,
    min_size: float,
) -> dict:
    """One image's final detections, padded to ``max_detections``.

    Softmax, per-class decode and clip, drop background, keep scores above
    ``score_thresh``, per-class NMS, keep the best ``max_detections``.

    Args:
      cls_logits: [R, C].
      class_deltas: [R, C, 4] in units of ``bbox_reg_stds``.
      proposals: [R, 4] xyxy.
      proposal_valid: [R] bool.
      image_size: [2] (height, width) to clip to.

    Returns:
      {"boxes": [K, 4], "scores": [K], "labels": [K] int32, "valid": [K] bool},
      K = max_detections, sorted by decreasing score, zeros where not valid.
    """
    r, c = cls_logits.shape
    weights = tuple(1.0 / s for s in bbox_reg_stds)
    probs = jax.nn.softmax(cls_logits, axis=-1)  # [R, C]
    boxes = ops.decode_boxes(class_deltas, jnp.broadcast_to(proposals[:, None, :], (r, c, 4)), weights)  # [R, C, 4]
    boxes = ops.clip_boxes(boxes, image_size)
    boxes = boxes[:, 1:].reshape(-1, 4)  # [R*(C-1), 4]
    scores = probs[:, 1:].reshape(-1)  # [R*(C-1)]
    labels = jnp.broadcast_to(jnp.arange(1, c, dtype=jnp.int32), (r, c - 1)).reshape(-1)
    valid = jnp.broadcast_to(proposal_valid[:, None], (r, c - 1)).reshape(-1)
    valid = valid & (scores > score_thresh) & ops.min_size_mask(boxes, min_size)
    keep, keep_valid = ops.batched_nms(boxes, scores, labels, nms_thresh, max_detections, valid=valid)
    return {
        "boxes": jnp.where(keep_valid[:, None], boxes[keep], 0.0),
        "scores": jnp.where(keep_valid, scores[keep], 0.0),
        "labels": jnp.where(keep_valid, labels[keep], 0),
        "valid": keep_valid,
    }
