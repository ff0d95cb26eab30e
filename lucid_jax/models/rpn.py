"""Region Proposal Network (Ren et al., "Faster R-CNN", NeurIPS 2015, section 3.1)
shared across FPN levels (Lin et al., 2017, section 4.1), and its loss.

One head (a 3x3 conv, then 1x1 objectness and box-delta convs) runs on every
level. Proposals are chosen with static shapes: top-k per level, decode, clip, a
small-box mask, then NMS batched over levels, padded to ``post_nms_top_n``. In
training, anchors are matched to the ground truth and sampled (``rpn_targets``),
and the objectness and box losses are averaged over the sampled anchors.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lucid_jax import ops
from lucid_jax.models import losses as L
from lucid_jax.models.anchors import cell_anchors, grid_anchors, level_stride, octave_sizes
from lucid_jax.models.conv import Conv
from lucid_jax.models.targets import rpn_targets


class RPNHead(nn.Module):
    """``conv`` (3x3 + ReLU), ``cls_logits`` (1x1, A) and ``bbox_pred`` (1x1, 4A).

    With ``conv_depth`` > 1 the 3x3 convs (each with a bias and a ReLU) are
    ``conv.0``, ``conv.1``, ... (torchvision's v2 head has two).
    """

    num_anchors: int
    conv_depth: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
        """Per level: [B, H, W, C] -> objectness [B, H*W*A], deltas [B, H*W*A, 4]."""
        if self.conv_depth < 1:
            raise ValueError(f"the RPN head needs conv_depth >= 1, got {self.conv_depth}")
        init = nn.initializers.normal(0.01)  # Faster R-CNN's RPN init
        names = ["conv"] if self.conv_depth == 1 else [f"conv.{i}" for i in range(self.conv_depth)]
        convs = [
            Conv(features[0].shape[-1], (3, 3), padding=((1, 1), (1, 1)), kernel_init=init, dtype=self.dtype, name=n)
            for n in names
        ]
        cls = Conv(self.num_anchors, (1, 1), kernel_init=init, dtype=self.dtype, name="cls_logits")
        box = Conv(4 * self.num_anchors, (1, 1), kernel_init=init, dtype=self.dtype, name="bbox_pred")
        objectness, deltas = [], []
        for f in features:
            b = f.shape[0]
            t = f
            for conv in convs:
                t = nn.relu(conv(t))
            objectness.append(cls(t).reshape(b, -1).astype(jnp.float32))  # [B, H*W*A]
            deltas.append(box(t).reshape(b, -1, 4).astype(jnp.float32))  # [B, H*W*A, 4]
        return objectness, deltas


def select_proposals(
    objectness: Sequence[jax.Array],
    deltas: Sequence[jax.Array],
    anchors: Sequence[jax.Array],
    image_size: jax.Array,
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    min_size: float,
    score_thresh: float,
    nms_scatter_free: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Turn one image's RPN outputs into a fixed number of proposals.

    Args:
      objectness: per level, [N_l] logits.
      deltas: per level, [N_l, 4] box deltas (weights 1).
      anchors: per level, [N_l, 4] xyxy.
      image_size: [2] (height, width) to clip to.
      pre_nms_top_n: boxes kept per level before NMS.
      post_nms_top_n: proposals returned.
      nms_thresh: IoU threshold of the per-level NMS.
      min_size: boxes narrower or shorter than this are dropped.
      score_thresh: proposals whose probability is below this are dropped.
      nms_scatter_free: NMS's formulation for graph converters (same result).

    Returns:
      boxes [P, 4], probabilities [P] (0 where invalid), valid [P] bool, with
      P = post_nms_top_n, sorted by decreasing probability.
    """
    level_boxes, logits, levels = [], [], []
    for level, (o, d, a) in enumerate(zip(objectness, deltas, anchors)):
        k = min(pre_nms_top_n, o.shape[0])
        top, idx = jax.lax.top_k(o, k)  # [k], [k]
        level_boxes.append(ops.decode_boxes(d[idx], a[idx]))  # [k, 4]
        logits.append(top)
        levels.append(jnp.full((k,), level, jnp.int32))
    boxes = ops.clip_boxes(jnp.concatenate(level_boxes), image_size)  # [K, 4]
    scores = jax.nn.sigmoid(jnp.concatenate(logits))  # [K]
    valid = ops.min_size_mask(boxes, min_size) & (scores >= score_thresh) & jnp.isfinite(scores)
    keep, keep_valid = ops.batched_nms(
        boxes, scores, jnp.concatenate(levels), nms_thresh, post_nms_top_n, valid=valid, scatter_free=nms_scatter_free
    )
    return (
        jnp.where(keep_valid[:, None], boxes[keep], 0.0),
        jnp.where(keep_valid, scores[keep], 0.0),
        keep_valid,
    )


class RPN(nn.Module):
    """Lucid's ``rpn``: the shared ``head``, anchor generation, proposals and the loss.

    Attributes:
      anchor_sizes: per level, the anchor sizes in pixels (default: 32/64/128/256
        times the octave scales 2^0, 2^(1/3), 2^(2/3)).
      aspect_ratios: anchor height / width ratios, shared by all levels.
      round_anchors: round cell anchors to integers (torchvision does).
      pre_nms_top_n: (train, test) boxes kept per level before NMS.
      post_nms_top_n: (train, test) proposals kept after NMS (the seed's 300 in test).
      nms_thresh, min_size, score_thresh: see ``select_proposals``.
      fg_iou_thresh, bg_iou_thresh: anchor labelling for the loss (IoU >= fg is
        foreground, < bg background).
      batch_size_per_image, positive_fraction: anchors sampled per image, and the
        largest share of them that is foreground.
      smooth_l1_beta: the box loss's Huber transition point.
      conv_depth: 3x3 convs of the head (1; torchvision's v2 has 2).
      dtype: computation dtype of the head.
    """

    anchor_sizes: Sequence[Sequence[float]] = octave_sizes((32, 64, 128, 256))
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
    round_anchors: bool = False
    pre_nms_top_n: tuple[int, int] = (2000, 1000)
    post_nms_top_n: tuple[int, int] = (1000, 300)
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    score_thresh: float = 0.0
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    smooth_l1_beta: float = 1.0 / 9
    conv_depth: int = 1
    dtype: Any = jnp.float32

    @property
    def num_anchors(self) -> int:
        """Anchors per location (the same on every level)."""
        return len(self.anchor_sizes[0]) * len(self.aspect_ratios)

    def cell_anchors(self) -> list:
        """Per level, [A, 4] anchors centred on the origin."""
        return [cell_anchors(s, self.aspect_ratios, self.round_anchors) for s in self.anchor_sizes]

    def setup(self):
        counts = {len(s) for s in self.anchor_sizes}
        if len(counts) != 1:
            raise ValueError(f"every level needs the same number of anchor sizes, got {self.anchor_sizes}")
        self.head = RPNHead(self.num_anchors, self.conv_depth, dtype=self.dtype)

    def __call__(
        self,
        features: Sequence[jax.Array],
        image_sizes: jax.Array,
        canvas_size: tuple[int, int],
        train: bool = False,
        *,
        nms_scatter_free: bool = False,
    ) -> dict:
        """Run the head on every level and select proposals.

        Anchors on level l are spaced by its actual stride, canvas // (H_l, W_l),
        as torchvision's ``AnchorGenerator`` spaces them.

        Args:
          features: per level, [B, H_l, W_l, C] (P2.. in order).
          image_sizes: [B, 2] (height, width) of the unpadded images.
          canvas_size: (H, W) of the padded input, static ints.
          train: use the training proposal counts.
          nms_scatter_free: static; see ``FasterRCNN.predict``.

        Returns:
          dict with "proposals" [B, P, 4], "proposal_scores" [B, P],
          "proposal_valid" [B, P], and for the losses "objectness" [B, N],
          "deltas" [B, N, 4], "anchors" [N, 4], N = sum_l H_l * W_l * A.
        """
        if len(features) != len(self.anchor_sizes):
            raise ValueError(
                f"the RPN has anchor sizes for {len(self.anchor_sizes)} levels but got {len(features)} feature maps"
            )
        objectness, deltas = self.head(features)
        anchors = [
            grid_anchors(base, f.shape[1], f.shape[2], level_stride(canvas_size, (f.shape[1], f.shape[2])))
            for base, f in zip(self.cell_anchors(), features)
        ]  # per level [H_l * W_l * A, 4]
        select = lambda o, d, size: select_proposals(  # noqa: E731
            jax.lax.stop_gradient(o),
            jax.lax.stop_gradient(d),
            anchors,
            size,
            pre_nms_top_n=self.pre_nms_top_n[0 if train else 1],
            post_nms_top_n=self.post_nms_top_n[0 if train else 1],
            nms_thresh=self.nms_thresh,
            min_size=self.min_size,
            score_thresh=self.score_thresh,
            nms_scatter_free=nms_scatter_free,
        )
        proposals, scores, valid = jax.vmap(select)(objectness, deltas, image_sizes)
        return {
            "proposals": proposals,
            "proposal_scores": scores,
            "proposal_valid": valid,
            "objectness": jnp.concatenate(objectness, axis=1),
            "deltas": jnp.concatenate(deltas, axis=1),
            "anchors": jnp.concatenate(anchors, axis=0),
        }

    def loss(self, outputs: dict, gt_boxes: jax.Array, gt_valid: jax.Array, keys: jax.Array) -> dict:
        """The RPN's objectness and box losses, averaged over the batch's sampled anchors.

        Args:
          outputs: this module's training output ("objectness" [B, N], "deltas"
            [B, N, 4], "anchors" [N, 4]).
          gt_boxes: [B, M, 4] xyxy; gt_valid: [B, M] bool.
          keys: [B] PRNG keys of the anchor sampler, one per image.

        Returns:
          {"rpn_cls_loss", "rpn_reg_loss"}: float32 scalars.
        """
        match_and_sample = lambda boxes, valid, key: rpn_targets(  # noqa: E731
            outputs["anchors"],
            boxes,
            valid,
            key,
            fg_iou_thresh=self.fg_iou_thresh,
            bg_iou_thresh=self.bg_iou_thresh,
            num_samples=self.batch_size_per_image,
            positive_fraction=self.positive_fraction,
        )
        targets = jax.vmap(match_and_sample)(gt_boxes, gt_valid, keys)
        terms = jax.vmap(lambda o, d, t: L.rpn_loss_terms(o, d, t, self.smooth_l1_beta))(
            outputs["objectness"], outputs["deltas"], targets
        )
        return L.batch_mean(terms, "rpn")
