"""Faster R-CNN (Ren et al., NeurIPS 2015) with an FPN backbone (Lin et al., 2017),
as Lucid's ``FasterRCNN``: the same sub-modules and state-dict names, without its
bugs (see the README).

    images -> backbone (ResNet + FPN) -> RPN proposals -> RoIAlign -> box head

Everything has static shapes: a batch always yields ``post_nms_top_n`` proposals
and ``max_detections`` detections per image, with ``valid`` masks.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lucid_jax import ops
from lucid_jax.models.anchors import octave_sizes
from lucid_jax.models.fpn import ResNetFPN
from lucid_jax.models import losses as L
from lucid_jax.models.inputs import check_image_sizes, check_images, check_targets
from lucid_jax.models.roi_heads import RoIBoxHead, postprocess_detections
from lucid_jax.models.rpn import RPN
from lucid_jax.models.targets import roi_targets, rpn_targets


class FasterRCNN(nn.Module):
    """Two-stage detector. Every hyperparameter is a keyword argument.

    Attributes:
      backbone: a ``ResNetFPN``; ``backbone.net`` is the ResNet classifier. Its
        ``strides`` fix the RPN's levels, ``roi_strides`` RoIAlign's and
        ``size_divisibility`` the multiple that input sizes must be.
      num_classes: C, background included.
      anchor_sizes: per RPN level (one per backbone level), anchor sizes in
        pixels (default: 32/64/128/256 times the octave scales 2^0, 2^(1/3),
        2^(2/3)).
      aspect_ratios: anchor height / width ratios.
      round_anchors: round the cell anchors to integers.
      rpn_pre_nms_top_n: (train, test) boxes per level before the RPN's NMS.
      rpn_post_nms_top_n: (train, test) proposals kept (the seed's 300 in test).
      rpn_nms_thresh, rpn_min_size, rpn_score_thresh: proposal filtering.
      roi_output_size, roi_sampling_ratio, roi_aligned: RoIAlign settings.
      representation_size, dropout_rate: box head width and dropout.
      bbox_reg_stds: the box head's delta normalisation (Lucid's buffer).
      box_score_thresh, box_nms_thresh, box_detections_per_img, box_min_size:
        ``predict`` defaults.
      rpn_fg_iou_thresh, rpn_bg_iou_thresh, rpn_batch_size_per_image,
        rpn_positive_fraction: anchor labelling and sampling for the RPN loss.
      box_fg_iou_thresh, box_bg_iou_thresh, box_batch_size_per_image,
        box_positive_fraction: RoI labelling and sampling for the box-head loss.
      smooth_l1_beta: the box losses' Huber transition point.
      dtype: computation dtype (e.g. jnp.bfloat16); parameters and all box
        arithmetic stay float32.
    """

    backbone: ResNetFPN
    num_classes: int = 21
    anchor_sizes: Sequence[Sequence[float]] = octave_sizes((32, 64, 128, 256))
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    round_anchors: bool = False
    rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000)
    rpn_post_nms_top_n: tuple[int, int] = (1000, 300)
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float = 1e-3
    rpn_score_thresh: float = 0.0
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2
    roi_aligned: bool = True
    representation_size: int = 1024
    dropout_rate: float = 0.5
    bbox_reg_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2)
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    box_min_size: float = 1e-2
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    smooth_l1_beta: float = 1.0 / 9
    dtype: Any = jnp.float32

    def setup(self):
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background + at least one class), got {self.num_classes!r}")
        if len(self.anchor_sizes) != len(self.backbone.strides):
            raise ValueError(
                f"anchor_sizes has {len(self.anchor_sizes)} levels but the backbone returns "
                f"{len(self.backbone.strides)} (strides {self.backbone.strides}); give one tuple of sizes per level"
            )
        self.rpn = RPN(
            anchor_sizes=self.anchor_sizes,
            aspect_ratios=self.aspect_ratios,
            round_anchors=self.round_anchors,
            pre_nms_top_n=tuple(self.rpn_pre_nms_top_n),
            post_nms_top_n=tuple(self.rpn_post_nms_top_n),
            nms_thresh=self.rpn_nms_thresh,
            min_size=self.rpn_min_size,
            score_thresh=self.rpn_score_thresh,
            dtype=self.dtype,
        )
        # The box head's layers sit at the top of the tree (fc1, fc2, cls_score,
        # bbox_pred), where Lucid's state dict has them.
        self.box_head = RoIBoxHead(self.num_classes, self.representation_size, self.dropout_rate, dtype=self.dtype)
        nn.share_scope(self, self.box_head)

    def _features_and_proposals(self, images, image_sizes, train: bool):
        x = check_images(images, multiple=self.backbone.size_divisibility)  # [B, H, W, 3]
        b, h, w, _ = x.shape
        sizes = check_image_sizes(image_sizes, b, h, w)  # [B, 2]
        features = self.backbone(x.astype(self.dtype), train)  # P2..P5 (P6)
        return features, sizes, self.rpn(features, sizes, (h, w), train)

    def _box_head(self, features, rois: jax.Array, train: bool):
        """rois [B, R, 4] -> cls_logits [B, R, C], class_deltas [B, R, C, 4]."""
        strides = self.backbone.roi_strides  # P2..P5; never P6
        pool = lambda f, boxes: ops.multiscale_roi_align(  # noqa: E731
            f,
            boxes,
            output_size=self.roi_output_size,
            sampling_ratio=self.roi_sampling_ratio,
            aligned=self.roi_aligned,
            strides=strides,
        )
        roi_features = jax.vmap(pool)(features[: len(strides)], rois)  # [B, R, S, S, C]
        return self.box_head(roi_features, train)

    def forward_with_proposals(self, images: jax.Array, image_sizes: jax.Array | None = None, train: bool = False) -> dict:
        """The whole forward pass, with every intermediate the user may want.

        Args:
          images: [B, 3, H, W] float images, H and W multiples of
            ``backbone.size_divisibility`` (32).
          image_sizes: optional [B, 2] (height, width) of each image before padding.
          train: batch-statistics BN, dropout (rng "dropout") and training
            proposal counts.

        Returns:
          dict with
            "proposals" [B, R, 4] xyxy, "proposal_scores" [B, R], "proposal_valid" [B, R];
            "cls_logits" [B, R, C];
            "class_deltas" [B, R, C, 4] per-class deltas in units of bbox_reg_stds;
            "bbox_deltas" [B, R, 4] the deltas of each RoI's best foreground class;
            "image_sizes" [B, 2]; and the RPN's "objectness" [B, N],
            "deltas" [B, N, 4] and "anchors" [N, 4] for the losses.
        """
        features, sizes, out = self._features_and_proposals(images, image_sizes, train)
        cls_logits, class_deltas = self._box_head(features, out["proposals"], train)
        best = jnp.argmax(cls_logits[..., 1:], axis=-1) + 1  # [B, R]
        out.update(
            cls_logits=cls_logits,
            class_deltas=class_deltas,
            bbox_deltas=jnp.take_along_axis(class_deltas, best[..., None, None], axis=2)[:, :, 0],
            image_sizes=sizes,
        )
        return out

    def loss(self, images: jax.Array, targets: dict, image_sizes: jax.Array | None = None) -> dict:
        """Training losses (training mode: batch-statistics BN and dropout).

        Call with ``rngs={"dropout": k1, "sampling": k2}`` and
        ``mutable=["batch_stats"]``.

        Args:
          images: [B, 3, H, W] float images.
          targets: {"boxes": [B, M, 4] float32 xyxy pixels, "labels": [B, M] int32
            in 1..C-1, "valid": [B, M] bool}; M is a fixed padding size.
          image_sizes: optional [B, 2] (height, width).

        Returns:
          {"rpn_cls_loss", "rpn_reg_loss", "roi_cls_loss", "roi_reg_loss",
          "total_loss"}: float32 scalars.
        """
        b = check_targets(targets, images)
        gt_boxes = jnp.asarray(targets["boxes"], jnp.float32)  # [B, M, 4]
        gt_labels = jnp.asarray(targets["labels"], jnp.int32)  # [B, M]
        # An empty box has no regression target; it is treated as padding.
        gt_valid = (
            jnp.asarray(targets["valid"], bool)
            & (gt_boxes[..., 2] > gt_boxes[..., 0])
            & (gt_boxes[..., 3] > gt_boxes[..., 1])
        )  # [B, M]
        features, _, rpn = self._features_and_proposals(images, image_sizes, train=True)
        keys = jax.random.split(self.make_rng("sampling"), (b, 2))  # one pair per image

        anchor_targets = jax.vmap(
            lambda boxes, valid, key: rpn_targets(
                rpn["anchors"],
                boxes,
                valid,
                key,
                fg_iou_thresh=self.rpn_fg_iou_thresh,
                bg_iou_thresh=self.rpn_bg_iou_thresh,
                num_samples=self.rpn_batch_size_per_image,
                positive_fraction=self.rpn_positive_fraction,
            )
        )(gt_boxes, gt_valid, keys[:, 0])
        rpn_terms = jax.vmap(lambda o, d, t: L.rpn_loss_terms(o, d, t, self.smooth_l1_beta))(
            rpn["objectness"], rpn["deltas"], anchor_targets
        )

        sampled = jax.vmap(
            lambda props, pvalid, boxes, labels, valid, key: roi_targets(
                props,
                pvalid,
                boxes,
                labels,
                valid,
                key,
                fg_iou_thresh=self.box_fg_iou_thresh,
                bg_iou_thresh=self.box_bg_iou_thresh,
                num_samples=self.box_batch_size_per_image,
                positive_fraction=self.box_positive_fraction,
                bbox_reg_stds=self.bbox_reg_stds,
            )
        )(rpn["proposals"], rpn["proposal_valid"], gt_boxes, gt_labels, gt_valid, keys[:, 1])
        cls_logits, class_deltas = self._box_head(features, jax.lax.stop_gradient(sampled["rois"]), train=True)
        roi_terms = jax.vmap(lambda c, d, t: L.roi_loss_terms(c, d, t, self.smooth_l1_beta))(
            cls_logits, class_deltas, sampled
        )
        return L.combine(rpn_terms, roi_terms)

    def __call__(self, images: jax.Array, image_sizes: jax.Array | None = None, train: bool = False):
        """The seed's forward: ``cls_logits [B, R, C], bbox_deltas [B, R, 4]``.

        R is ``rpn_post_nms_top_n`` (300 in test). ``bbox_deltas`` holds, per RoI,
        the deltas of its highest-scoring foreground class, in units of
        ``bbox_reg_stds``. Use ``method="forward_with_proposals"`` for the
        proposals, their validity and the per-class deltas.
        """
        out = self.forward_with_proposals(images, image_sizes, train)
        return out["cls_logits"], out["bbox_deltas"]

    def predict(
        self,
        images: jax.Array,
        image_sizes: jax.Array | None = None,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        max_detections: int | None = None,
    ) -> dict:
        """Detections, padded to a fixed count.

        Args:
          images: [B, 3, H, W] float images.
          image_sizes: optional [B, 2] (height, width); boxes are clipped to it.
          score_thresh: minimum class probability (default ``box_score_thresh``).
          nms_thresh: per-class NMS IoU threshold (default ``box_nms_thresh``).
          max_detections: K (default ``box_detections_per_img``).

        Returns:
          {"boxes": [B, K, 4] xyxy pixels, "scores": [B, K], "labels": [B, K] int32
          (1..C-1), "valid": [B, K] bool}, sorted by decreasing score.
        """
        out = self.forward_with_proposals(images, image_sizes, train=False)
        post = lambda logits, deltas, props, valid, size: postprocess_detections(  # noqa: E731
            logits,
            deltas,
            props,
            valid,
            size,
            bbox_reg_stds=self.bbox_reg_stds,
            score_thresh=self.box_score_thresh if score_thresh is None else score_thresh,
            nms_thresh=self.box_nms_thresh if nms_thresh is None else nms_thresh,
            max_detections=self.box_detections_per_img if max_detections is None else max_detections,
            min_size=self.box_min_size,
        )
        return jax.vmap(post)(
            out["cls_logits"], out["class_deltas"], out["proposals"], out["proposal_valid"], out["image_sizes"]
        )
