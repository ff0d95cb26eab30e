"""Faster R-CNN (Ren et al., NeurIPS 2015) with an FPN backbone (Lin et al., 2017),
as Lucid's ``FasterRCNN``: the same sub-modules and state-dict names, without its
bugs (see docs/weights.md).

    images -> backbone (ResNet + FPN; strides)
           -> rpn        (proposals; in training, its anchor loss)
           -> roi_heads  (RoIAlign, box head -> detections; in training, its RoI loss)

Everything has static shapes: a batch always yields ``post_nms_top_n`` proposals
and ``max_detections`` detections per image, with ``valid`` masks.

Images come in Lucid's ``[B, 3, H, W]``, or in the model's own ``[B, H, W, 3]`` with
``channels_last=True`` (the Loader's batches and the serving path), the one keyword
every entry point shares (see ``inputs.check_images``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lucid_jax.models import losses as L
from lucid_jax.models.fpn import ResNetFPN
from lucid_jax.models.inputs import check_image_sizes, check_images, ground_truth
from lucid_jax.models.roi_heads import RoIHeads
from lucid_jax.models.rpn import RPN


class FasterRCNN(nn.Module):
    """Two-stage detector: a backbone, a region proposal network and RoI heads.

    Each stage holds its own hyperparameters, training targets and loss. Build one
    with ``faster_rcnn_resnet_101_fpn(**kwargs)``, which takes them as flat keywords
    (``rpn_post_nms_top_n``, ``box_score_thresh``, ...).

    Attributes:
      backbone: a ``ResNetFPN``; its ``strides`` fix the RPN's levels,
        ``roi_strides`` RoIAlign's and ``size_divisibility`` the multiple that
        input sizes must be. Its ``dtype`` is the computation dtype of the
        features (parameters and all box arithmetic stay float32).
      rpn: the ``RPN``: anchors, proposals, and the anchor loss.
      roi_heads: the ``RoIHeads``: pooling, the box head, the RoI loss and
        detections. Its layers sit at the top of the tree (``fc1``, ``fc2``,
        ``cls_score``, ``bbox_pred``), where Lucid's state dict has them.
    """

    backbone: ResNetFPN
    rpn: RPN = RPN()
    roi_heads: RoIHeads = RoIHeads()

    @property
    def num_classes(self) -> int:
        """C, background included."""
        return self.roi_heads.num_classes

    def with_max_detections(self, k: int) -> "FasterRCNN":
        """The same detector, on the same variables, returning up to ``k`` detections per image.

        A detection is one test-time proposal's box for one class, so with one class
        the proposals cap the count: the test-time RPN counts (``pre_nms_top_n`` per
        level and ``post_nms_top_n``) are raised to ``k`` where they are smaller, and
        the training counts are left as they are.

        Args:
          k: detections per image (the model's ``box_detections_per_img``, 100 by default).

        Raises:
          ValueError: ``k`` < 1.
        """
        if int(k) < 1:
            raise ValueError(f"max detections must be >= 1, got {k}")
        k = int(k)
        (pre_train, pre_test), (post_train, post_test) = self.rpn.pre_nms_top_n, self.rpn.post_nms_top_n
        rpn = self.rpn.clone(
            pre_nms_top_n=(pre_train, max(pre_test, k)), post_nms_top_n=(post_train, max(post_test, k))
        )
        return self.clone(rpn=rpn, roi_heads=self.roi_heads.clone(detections_per_img=k))

    def setup(self):
        if len(self.rpn.anchor_sizes) != len(self.backbone.strides):
            raise ValueError(
                f"anchor_sizes has {len(self.rpn.anchor_sizes)} levels but the backbone returns "
                f"{len(self.backbone.strides)} (strides {self.backbone.strides}); give one tuple of sizes per level"
            )
        nn.share_scope(self, self.roi_heads)

    def _features_and_proposals(self, images, image_sizes, train: bool, channels_last: bool, nms_scatter_free=False):
        x = check_images(images, multiple=self.backbone.size_divisibility, channels_last=channels_last)  # [B, H, W, 3]
        b, h, w, _ = x.shape
        sizes = check_image_sizes(image_sizes, b, h, w)  # [B, 2]
        features = self.backbone(x.astype(self.backbone.dtype), train)  # P2..P5 (P6)
        return features, sizes, self.rpn(features, sizes, (h, w), train, nms_scatter_free=nms_scatter_free)

    def _forward(self, images, image_sizes, train: bool, channels_last: bool, nms_scatter_free: bool = False) -> dict:
        features, sizes, out = self._features_and_proposals(images, image_sizes, train, channels_last, nms_scatter_free)
        cls_logits, class_deltas = self.roi_heads(
            features, out["proposals"], self.backbone.roi_strides, train, out["proposal_valid"]
        )
        best = jnp.argmax(cls_logits[..., 1:], axis=-1) + 1  # [B, R]
        out.update(
            cls_logits=cls_logits,
            class_deltas=class_deltas,
            bbox_deltas=jnp.take_along_axis(class_deltas, best[..., None, None], axis=2)[:, :, 0],
            image_sizes=sizes,
        )
        return out

    def forward_with_proposals(
        self, images: jax.Array, image_sizes: jax.Array | None = None, train: bool = False, *, channels_last=False
    ) -> dict:
        """The whole forward pass, with every intermediate the user may want.

        Args:
          images: [B, 3, H, W] float images, H and W multiples of
            ``backbone.size_divisibility`` (32).
          image_sizes: optional [B, 2] (height, width) of each image before padding.
          train: batch-statistics BN, dropout (rng "dropout") and training
            proposal counts.
          channels_last: the images are [B, H, W, 3] (the Loader's layout).

        Returns:
          dict with
            "proposals" [B, R, 4] xyxy, "proposal_scores" [B, R], "proposal_valid" [B, R];
            "cls_logits" [B, R, C];
            "class_deltas" [B, R, C, 4] per-class deltas in units of bbox_reg_stds;
            "bbox_deltas" [B, R, 4] the deltas of each RoI's best foreground class;
            "image_sizes" [B, 2]; and the RPN's raw outputs "objectness" [B, N],
            "deltas" [B, N, 4] and "anchors" [N, 4].
        """
        return self._forward(images, image_sizes, train, channels_last)

    def loss(
        self, images: jax.Array, targets: dict, image_sizes: jax.Array | None = None, *, channels_last: bool = False
    ) -> dict:
        """Training losses (training mode: batch-statistics BN and dropout).

        Call with ``rngs={"dropout": k1, "sampling": k2}`` and
        ``mutable=["batch_stats"]``.

        Args:
          images: [B, 3, H, W] float images.
          targets: {"boxes": [B, M, 4] float32 xyxy pixels, "labels": [B, M] int32
            in 1..C-1, "valid": [B, M] bool}; M is a fixed padding size.
          image_sizes: optional [B, 2] (height, width).
          channels_last: the images are [B, H, W, 3] (the Loader's layout).

        Returns:
          {"rpn_cls_loss", "rpn_reg_loss", "roi_cls_loss", "roi_reg_loss",
          "total_loss"}: float32 scalars.
        """
        gt_boxes, gt_labels, gt_valid = ground_truth(targets, images)  # [B, M, 4], [B, M], [B, M]
        features, _, rpn = self._features_and_proposals(images, image_sizes, True, channels_last)
        keys = jax.random.split(self.make_rng("sampling"), (gt_boxes.shape[0], 2))  # an (anchor, RoI) pair per image
        losses = self.rpn.loss(rpn, gt_boxes, gt_valid, keys[:, 0])
        losses |= self.roi_heads.loss(
            features,
            self.backbone.roi_strides,
            rpn["proposals"],
            rpn["proposal_valid"],
            gt_boxes,
            gt_labels,
            gt_valid,
            keys[:, 1],
        )
        return losses | {"total_loss": L.total_loss(losses)}

    def __call__(
        self, images: jax.Array, image_sizes: jax.Array | None = None, train: bool = False, *, channels_last=False
    ):
        """The seed's forward: ``cls_logits [B, R, C], bbox_deltas [B, R, 4]``.

        R is ``rpn_post_nms_top_n`` (300 in test). ``bbox_deltas`` holds, per RoI,
        the deltas of its highest-scoring foreground class, in units of
        ``bbox_reg_stds``. Use ``method="forward_with_proposals"`` for the
        proposals, their validity and the per-class deltas.
        """
        out = self._forward(images, image_sizes, train, channels_last)
        return out["cls_logits"], out["bbox_deltas"]

    def predict(
        self,
        images: jax.Array,
        image_sizes: jax.Array | None = None,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        max_detections: int | None = None,
        *,
        channels_last: bool = False,
        nms_scatter_free: bool = False,
    ) -> dict:
        """Detections, padded to a fixed count.

        Args:
          images: [B, 3, H, W] float images.
          image_sizes: optional [B, 2] (height, width); boxes are clipped to it.
          score_thresh: minimum class probability (default ``box_score_thresh``).
          nms_thresh: per-class NMS IoU threshold (default ``box_nms_thresh``).
          max_detections: K (default ``box_detections_per_img``).
          channels_last: the images are [B, H, W, 3] (the Loader's and serving's layout).
          nms_scatter_free: run both NMS stages in their formulation for graph
            converters (ONNX export sets it): the same detections, more work. A
            Python bool, static under jit: it selects the traced program.

        Returns:
          {"boxes": [B, K, 4] xyxy pixels, "scores": [B, K], "labels": [B, K] int32
          (1..C-1), "valid": [B, K] bool}, sorted by decreasing score.
        """
        out = self._forward(images, image_sizes, False, channels_last, nms_scatter_free)
        return self.roi_heads.postprocess(
            out["cls_logits"],
            out["class_deltas"],
            out["proposals"],
            out["proposal_valid"],
            out["image_sizes"],
            score_thresh,
            nms_thresh,
            max_detections,
            nms_scatter_free=nms_scatter_free,
        )
