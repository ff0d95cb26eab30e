"""The second stage: Fast R-CNN's box head (Girshick, ICCV 2015) on RoIAlign features
(He et al., "Mask R-CNN", 2017), its loss and its inference post-processing.

``RoIHeads`` pools each RoI from its FPN level, runs the box head, and either
samples RoIs and computes the loss (training) or turns the head's outputs into
detections. The head is two fully connected layers (``fc1``, ``fc2``) then a
classifier (``cls_score``, C outputs) and a per-class box regressor (``bbox_pred``,
4C outputs). Optionally 3x3 convs with a norm come first and one fully connected
layer follows them (torchvision's v2 ``FastRCNNConvFCHead``). Regression targets
are normalised by ``bbox_reg_stds``, Lucid's buffer (torchvision's box-coder weights are their inverses).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lucid_jax import ops
from lucid_jax.models import losses as L
from lucid_jax.models.conv import Conv
from lucid_jax.models.norms import check_norm_mode, norm_layer
from lucid_jax.models.targets import roi_targets

# He-normal on fan_out, torchvision's init of the conv box head.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class RoIBoxHead(nn.Module):
    """[``box_convs.i`` -> ``box_norms.i`` -> ReLU]* -> ``fc1`` -> ReLU -> dropout
    [-> ``fc2`` -> ReLU -> dropout] -> scores, deltas.

    Attributes:
      num_classes: C, background included (class 0).
      representation_size: width of the fully connected layers (1024).
      dropout_rate: dropout after each of them in training (Lucid: 0.5).
      conv_channels: widths of the 3x3 convs before them (none; torchvision's v2
        has four of 256).
      num_fc: fully connected layers (2: ``fc1``, ``fc2``; v2 has ``fc1`` only).
      norm_mode: the convs' norm (a mode of ``norms.NORM_MODES``; None: the convs
        have a bias and no norm).
      bn_axis_name: a mapped axis over which batch statistics are averaged.
      dtype: computation dtype.
    """

    num_classes: int
    representation_size: int = 1024
    dropout_rate: float = 0.5
    conv_channels: Sequence[int] = ()
    num_fc: int = 2
    norm_mode: str | None = None
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, roi_features: jax.Array, train: bool = False, valid: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Classify and regress pooled RoIs.

        Args:
          roi_features: [B, R, S, S, C] pooled features (channels last).
          train: enable dropout (needs the "dropout" rng) and the convs' batch statistics.
          valid: optional [B, R] bool; in training only these RoIs count in the
            convs' batch statistics (the sampler pads with invalid RoIs).

        Returns:
          cls_logits [B, R, num_classes] and class_deltas [B, R, num_classes, 4],
          both float32; deltas are in units of ``bbox_reg_stds``.
        """
        if self.num_fc not in (1, 2):
            raise ValueError(f"the box head has 1 or 2 fully connected layers, got num_fc={self.num_fc}")
        check_norm_mode(self.norm_mode, optional=True, where="the box head's norm_mode")
        b, r, s, _, c = roi_features.shape
        x = roi_features.reshape(b * r, s, s, c).astype(self.dtype)
        mask = None if valid is None else valid.reshape(b * r, 1, 1, 1)
        for i, width in enumerate(self.conv_channels):
            x = Conv(
                width,
                (3, 3),
                padding=((1, 1), (1, 1)),
                use_bias=self.norm_mode is None,
                kernel_init=_conv_init,
                dtype=self.dtype,
                name=f"box_convs.{i}",
            )(x)
            if self.norm_mode is not None:
                norm = norm_layer(
                    self.norm_mode, train=train, name=f"box_norms.{i}", axis_name=self.bn_axis_name, dtype=self.dtype
                )
                x = norm(x, mask)
            x = nn.relu(x)
        c = x.shape[-1]
        # Flatten in (C, S, S) order, as Lucid and torchvision do, so fc1's weight
        # converts by a plain transpose.
        x = jnp.transpose(x.reshape(b, r, s, s, c), (0, 1, 4, 2, 3)).reshape(b, r, c * s * s)
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        for i in range(self.num_fc):
            x = drop(nn.relu(nn.Dense(self.representation_size, dtype=self.dtype, name=f"fc{i + 1}")(x)))
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
    weights: Sequence[float],
    score_thresh: float,
    nms_thresh: float,
    max_detections: int,
    min_size: float,
    nms_scatter_free: bool = False,
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
      weights: the box coder's weights, ``RoIHeads.box_coder_weights``.
      nms_scatter_free: NMS's formulation for graph converters (same result).

    Returns:
      {"boxes": [K, 4], "scores": [K], "labels": [K] int32, "valid": [K] bool},
      K = max_detections, sorted by decreasing score, zeros where not valid.
    """
    r, c = cls_logits.shape
    probs = jax.nn.softmax(cls_logits, axis=-1)  # [R, C]
    boxes = ops.decode_boxes(class_deltas, jnp.broadcast_to(proposals[:, None, :], (r, c, 4)), weights)  # [R, C, 4]
    boxes = ops.clip_boxes(boxes, image_size)
    boxes = boxes[:, 1:].reshape(-1, 4)  # [R*(C-1), 4]
    scores = probs[:, 1:].reshape(-1)  # [R*(C-1)]
    labels = jnp.broadcast_to(jnp.arange(1, c, dtype=jnp.int32), (r, c - 1)).reshape(-1)
    valid = jnp.broadcast_to(proposal_valid[:, None], (r, c - 1)).reshape(-1)
    valid = valid & (scores > score_thresh) & ops.min_size_mask(boxes, min_size)
    keep, keep_valid = ops.batched_nms(
        boxes, scores, labels, nms_thresh, max_detections, valid=valid, scatter_free=nms_scatter_free
    )
    return {
        "boxes": jnp.where(keep_valid[:, None], boxes[keep], 0.0),
        "scores": jnp.where(keep_valid, scores[keep], 0.0),
        "labels": jnp.where(keep_valid, labels[keep], 0),
        "valid": keep_valid,
    }


class RoIHeads(nn.Module):
    """Pooling, the box head, RoI sampling and its loss, and detections.

    The box head's layers (``fc1``, ``fc2``, ``cls_score``, ``bbox_pred``) sit in
    this module's scope, which ``FasterRCNN`` shares, so they stay at the top of
    the tree where Lucid's state dict has them.

    Attributes:
      num_classes: C, background included (class 0).
      output_size, sampling_ratio, aligned: RoIAlign settings.
      representation_size, dropout_rate: box head width and dropout.
      conv_channels, num_fc, norm_mode: the box head's convs, fully connected
        layers and the convs' norm (see ``RoIBoxHead``).
      bn_axis_name: a mapped axis over which the box head's batch statistics are averaged.
      bbox_reg_stds: the delta normalisation (Lucid's buffer).
      score_thresh, nms_thresh, detections_per_img, min_size: ``postprocess``
        defaults.
      fg_iou_thresh, bg_iou_thresh, batch_size_per_image, positive_fraction: RoI
        labelling and sampling for the loss.
      smooth_l1_beta: the box loss's Huber transition point.
      dtype: computation dtype of the head.
    """

    num_classes: int = 21
    output_size: int = 7
    sampling_ratio: int = 2
    aligned: bool = True
    representation_size: int = 1024
    dropout_rate: float = 0.5
    bbox_reg_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    min_size: float = 1e-2
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    smooth_l1_beta: float = 1.0 / 9
    conv_channels: Sequence[int] = ()
    num_fc: int = 2
    norm_mode: str | None = None
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(
                f"num_classes must be an int >= 2 (background + at least one class), got {self.num_classes!r}"
            )
        super().__post_init__()

    @property
    def box_coder_weights(self) -> tuple[float, ...]:
        """torchvision's box-coder weights: the inverses of ``bbox_reg_stds``."""
        return tuple(1.0 / s for s in self.bbox_reg_stds)

    def setup(self):
        self.box_head = RoIBoxHead(
            self.num_classes,
            self.representation_size,
            self.dropout_rate,
            tuple(self.conv_channels),
            self.num_fc,
            self.norm_mode,
            self.bn_axis_name,
            dtype=self.dtype,
        )
        nn.share_scope(self, self.box_head)

    def __call__(
        self,
        features: Sequence[jax.Array],
        rois: jax.Array,
        strides: Sequence[int],
        train: bool = False,
        valid: jax.Array | None = None,
    ):
        """Pool each RoI from its level and run the box head.

        Args:
          features: per level, [B, H_l, W_l, C]; the first ``len(strides)`` are pooled.
          rois: [B, R, 4] xyxy canvas pixels.
          strides: the pooled levels' strides (the backbone's ``roi_strides``).
          train: dropout (rng "dropout") and the box head's batch statistics.
          valid: optional [B, R] bool, the RoIs that count in those statistics.

        Returns:
          cls_logits [B, R, C] and class_deltas [B, R, C, 4] in units of ``bbox_reg_stds``.
        """
        pool = lambda f, boxes: ops.multiscale_roi_align(  # noqa: E731
            f,
            boxes,
            output_size=self.output_size,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
            strides=tuple(strides),
        )
        roi_features = jax.vmap(pool)(list(features[: len(strides)]), rois)  # [B, R, S, S, C]
        return self.box_head(roi_features, train, valid)

    def loss(
        self,
        features: Sequence[jax.Array],
        strides: Sequence[int],
        proposals: jax.Array,
        proposal_valid: jax.Array,
        gt_boxes: jax.Array,
        gt_labels: jax.Array,
        gt_valid: jax.Array,
        keys: jax.Array,
    ) -> dict:
        """Sample RoIs among the proposals and ground truth, and the box head's losses.

        Args:
          features, strides: as for ``__call__``.
          proposals: [B, P, 4] (no gradient flows back through them);
            proposal_valid: [B, P] bool.
          gt_boxes: [B, M, 4]; gt_labels: [B, M] int32 in 1..C-1; gt_valid: [B, M].
          keys: [B] PRNG keys of the RoI sampler, one per image.

        Returns:
          {"roi_cls_loss", "roi_reg_loss"}: float32 scalars, averaged over the
          batch's sampled RoIs.
        """
        match_and_sample = lambda props, pvalid, boxes, labels, valid, key: roi_targets(  # noqa: E731
            props,
            pvalid,
            boxes,
            labels,
            valid,
            key,
            fg_iou_thresh=self.fg_iou_thresh,
            bg_iou_thresh=self.bg_iou_thresh,
            num_samples=self.batch_size_per_image,
            positive_fraction=self.positive_fraction,
            weights=self.box_coder_weights,
        )
        sampled = jax.vmap(match_and_sample)(proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, keys)
        cls_logits, class_deltas = self(
            features, jax.lax.stop_gradient(sampled["rois"]), strides, train=True, valid=sampled["valid"]
        )
        terms = jax.vmap(lambda c, d, t: L.roi_loss_terms(c, d, t, self.smooth_l1_beta))(
            cls_logits, class_deltas, sampled
        )
        return L.batch_mean(terms, "roi")

    def postprocess(
        self,
        cls_logits: jax.Array,
        class_deltas: jax.Array,
        proposals: jax.Array,
        proposal_valid: jax.Array,
        image_sizes: jax.Array,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        max_detections: int | None = None,
        *,
        nms_scatter_free: bool = False,
    ) -> dict:
        """Detections for a batch (``postprocess_detections`` per image); the
        thresholds default to this module's attributes. ``nms_scatter_free`` is
        static: see ``FasterRCNN.predict``.

        Returns:
          {"boxes": [B, K, 4], "scores": [B, K], "labels": [B, K], "valid": [B, K]}.
        """
        detect = lambda logits, deltas, props, valid, size: postprocess_detections(  # noqa: E731
            logits,
            deltas,
            props,
            valid,
            size,
            weights=self.box_coder_weights,
            score_thresh=self.score_thresh if score_thresh is None else score_thresh,
            nms_thresh=self.nms_thresh if nms_thresh is None else nms_thresh,
            max_detections=self.detections_per_img if max_detections is None else max_detections,
            min_size=self.min_size,
            nms_scatter_free=nms_scatter_free,
        )
        return jax.vmap(detect)(cls_logits, class_deltas, proposals, proposal_valid, image_sizes)
