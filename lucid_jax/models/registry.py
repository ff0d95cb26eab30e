"""Model registry: names to keyword builders, as Lucid's ``@register_model``."""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from lucid_jax.models.anchors import octave_sizes
from lucid_jax.models.faster_rcnn import FasterRCNN
from lucid_jax.models.fpn import ResNetFPN
from lucid_jax.models.resnet import STAGE_STRIDES, STEM_STRIDE, ResNet
from lucid_jax.models.roi_heads import RoIHeads
from lucid_jax.models.rpn import RPN

_REGISTRY: dict[str, Callable[..., Any]] = {}

# Keyword arguments that make a model reproduce torchvision's
# ``FasterRCNN(resnet_fpn_backbone(...))`` on identical weights: 3 anchors per
# location, a P6 level for the RPN, rounded anchors, RoIAlign with aligned=False,
# torchvision's proposal counts, frozen BN and no dropout in the box head.
TORCHVISION_FASTER_RCNN = dict(
    anchor_sizes=((32,), (64,), (128,), (256,), (512,)),
    aspect_ratios=(0.5, 1.0, 2.0),
    round_anchors=True,
    extra_p6=True,
    rpn_pre_nms_top_n=(2000, 1000),
    rpn_post_nms_top_n=(2000, 1000),
    roi_aligned=False,
    dropout_rate=0.0,
    norm_mode="frozen",
)

# torchvision's ``fasterrcnn_resnet50_fpn_v2`` (Li et al., "Benchmarking Detection
# Transfer Learning with Vision Transformers", 2021): v1's anchors, P6 and proposal
# counts, with BatchNorm that trains in the body, after every FPN conv and in a
# box head of four 3x3 convs and one fully connected layer, and an RPN head of two
# 3x3 convs. Every norm follows the model's ``norm_mode``.
TORCHVISION_FASTER_RCNN_V2 = dict(
    TORCHVISION_FASTER_RCNN,
    norm_mode="batch",
    fpn_norm_mode="batch",
    rpn_conv_depth=2,
    box_head_convs=(256, 256, 256, 256),
    box_head_fcs=1,
    box_head_norm_mode="batch",
)


# The flat keywords of the builders (Lucid's and torchvision's names), and the
# attribute of ``FasterRCNN.rpn`` or ``FasterRCNN.roi_heads`` each one sets.
RPN_KEYWORDS = {
    "anchor_sizes": "anchor_sizes",
    "aspect_ratios": "aspect_ratios",
    "round_anchors": "round_anchors",
    "rpn_pre_nms_top_n": "pre_nms_top_n",
    "rpn_post_nms_top_n": "post_nms_top_n",
    "rpn_nms_thresh": "nms_thresh",
    "rpn_min_size": "min_size",
    "rpn_score_thresh": "score_thresh",
    "rpn_fg_iou_thresh": "fg_iou_thresh",
    "rpn_bg_iou_thresh": "bg_iou_thresh",
    "rpn_batch_size_per_image": "batch_size_per_image",
    "rpn_positive_fraction": "positive_fraction",
    "smooth_l1_beta": "smooth_l1_beta",
    "rpn_conv_depth": "conv_depth",
}
ROI_HEADS_KEYWORDS = {
    "roi_output_size": "output_size",
    "roi_sampling_ratio": "sampling_ratio",
    "roi_aligned": "aligned",
    "representation_size": "representation_size",
    "dropout_rate": "dropout_rate",
    "bbox_reg_stds": "bbox_reg_stds",
    "box_score_thresh": "score_thresh",
    "box_nms_thresh": "nms_thresh",
    "box_detections_per_img": "detections_per_img",
    "box_min_size": "min_size",
    "box_fg_iou_thresh": "fg_iou_thresh",
    "box_bg_iou_thresh": "bg_iou_thresh",
    "box_batch_size_per_image": "batch_size_per_image",
    "box_positive_fraction": "positive_fraction",
    "smooth_l1_beta": "smooth_l1_beta",
    "box_head_convs": "conv_channels",
    "box_head_fcs": "num_fc",
    "box_head_norm_mode": "norm_mode",
}


def register_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add a builder to the registry under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def get_model(name: str, **kwargs) -> Any:
    """Build a registered model by name.

    Raises:
      KeyError: the name is unknown; the message lists the known names.
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


def size_divisibility(name: str) -> int:
    """What a registered detector's input height and width must divide by, without building it.

    Every registered detector is a ResNet FPN (:func:`build_resnet_fpn_faster_rcnn`),
    whose ``backbone.size_divisibility`` is its largest RoI stride: C5's, the stem's
    stride times every stage's, as ``ResNet.feature_strides`` multiplies them (32).

    Args:
      name: a registered detector (a ``faster_rcnn_*`` name).

    Returns:
      The multiple of the input sides.

    Raises:
      KeyError: the name is not a registered detector; the message lists the known names.
    """
    if name not in _REGISTRY or not name.startswith("faster_rcnn"):
        raise KeyError(f"unknown detector {name!r}; known models: {', '.join(list_models())}")
    return STEM_STRIDE * math.prod(STAGE_STRIDES)


def build_resnet_fpn_faster_rcnn(
    stage_sizes: Sequence[int],
    num_classes: int = 21,
    backbone_num_classes: int = 1000,
    *,
    widths: Sequence[int] = (64, 128, 256, 512),
    stem_width: int = 64,
    fpn_channels: int = 256,
    extra_p6: bool = False,
    norm_mode: str = "batch",
    fpn_norm_mode: str | None = None,
    bn_axis_name: str | None = None,
    dtype: Any = jnp.float32,
    **kwargs,
) -> FasterRCNN:
    """A Faster R-CNN on any bottleneck ResNet depth (``stage_sizes``).

    ``norm_mode`` is the ResNet's norm and ``fpn_norm_mode`` the FPN's (None: no
    norm). GroupNorm is for the whole network, as in detectron2's from-scratch
    configurations: with ``norm_mode="group"`` an FPN or a conv box head given no
    norm of its own gets GroupNorm too. Backbone keywords are listed; the others are the flat keywords of
    ``RPN_KEYWORDS`` and ``ROI_HEADS_KEYWORDS``, which set the RPN's and the RoI
    heads' attributes.

    Raises:
      TypeError: an unknown keyword; the message lists the known ones.
    """
    unknown = sorted(set(kwargs) - set(RPN_KEYWORDS) - set(ROI_HEADS_KEYWORDS))
    if unknown:
        known = ", ".join(sorted({*RPN_KEYWORDS, *ROI_HEADS_KEYWORDS}))
        raise TypeError(f"unknown detector keyword(s) {', '.join(unknown)}; known: {known}")
    if norm_mode == "group":
        fpn_norm_mode = fpn_norm_mode or "group"
        kwargs["box_head_norm_mode"] = kwargs.get("box_head_norm_mode") or "group"
    roi_heads_kwargs = {field: kwargs[flat] for flat, field in ROI_HEADS_KEYWORDS.items() if flat in kwargs}
    if "conv_channels" in roi_heads_kwargs:
        roi_heads_kwargs["conv_channels"] = tuple(roi_heads_kwargs["conv_channels"])
    roi_heads = RoIHeads(num_classes=num_classes, bn_axis_name=bn_axis_name, dtype=dtype, **roi_heads_kwargs)
    net = ResNet(
        stage_sizes=tuple(stage_sizes),
        num_classes=backbone_num_classes,
        widths=tuple(widths),
        stem_width=stem_width,
        norm_mode=norm_mode,
        bn_axis_name=bn_axis_name,
        dtype=dtype,
    )
    backbone = ResNetFPN(net=net, out_channels=fpn_channels, extra_p6=extra_p6, norm_mode=fpn_norm_mode, dtype=dtype)
    rpn_kwargs = {field: kwargs[flat] for flat, field in RPN_KEYWORDS.items() if flat in kwargs}
    for name in ("pre_nms_top_n", "post_nms_top_n"):
        if name in rpn_kwargs:
            rpn_kwargs[name] = tuple(rpn_kwargs[name])
    return FasterRCNN(backbone=backbone, rpn=RPN(dtype=dtype, **rpn_kwargs), roi_heads=roi_heads)


@register_model
def resnet_50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50 classifier (25,557,032 parameters at 1000 classes)."""
    return ResNet(stage_sizes=(3, 4, 6, 3), num_classes=num_classes, **kwargs)


@register_model
def resnet_101(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-101 classifier (44,549,160 parameters at 1000 classes)."""
    return ResNet(stage_sizes=(3, 4, 23, 3), num_classes=num_classes, **kwargs)


@register_model
def faster_rcnn_resnet_50_fpn(num_classes: int = 21, backbone_num_classes: int = 1000, **kwargs) -> FasterRCNN:
    """Faster R-CNN with a ResNet-50 FPN backbone."""
    return build_resnet_fpn_faster_rcnn((3, 4, 6, 3), num_classes, backbone_num_classes, **kwargs)


@register_model
def faster_rcnn_resnet_101_fpn(num_classes: int = 21, backbone_num_classes: int = 1000, **kwargs) -> FasterRCNN:
    """Faster R-CNN with a ResNet-101 FPN backbone: Lucid's model, 62,498,494 parameters.

    Args:
      num_classes: object classes, background included (21 for PASCAL VOC).
      backbone_num_classes: outputs of the backbone classifier ``backbone.net.fc``;
        must match the classifier whose weights you load.
      **kwargs: backbone keywords (``norm_mode``, ``dtype``, ``extra_p6``, ...)
        and every ``FasterRCNN`` hyperparameter.
    """
    return build_resnet_fpn_faster_rcnn((3, 4, 23, 3), num_classes, backbone_num_classes, **kwargs)


@register_model
def faster_rcnn_mini_fpn(num_classes: int = 21, backbone_num_classes: int = 1000, **kwargs) -> FasterRCNN:
    """A small Faster R-CNN for CPU demos and tests: one narrow bottleneck per stage,
    a 64-channel FPN, a 256-wide box head, anchors from 16 to 128 pixels and fewer
    proposals and sampled RoIs, suited to ~128x128 images with a few objects. The
    architecture and names are the ResNet FPN's."""
    defaults = dict(
        widths=(16, 32, 64, 128),
        stem_width=16,
        fpn_channels=64,
        representation_size=256,
        anchor_sizes=octave_sizes((16, 32, 64, 128)),
        rpn_pre_nms_top_n=(600, 300),
        rpn_post_nms_top_n=(300, 100),
        box_batch_size_per_image=128,
    )
    return build_resnet_fpn_faster_rcnn((1, 1, 1, 1), num_classes, backbone_num_classes, **{**defaults, **kwargs})


@register_model
def faster_rcnn_resnet_50_fpn_torchvision(
    num_classes: int = 91, backbone_num_classes: int = 1000, **kwargs
) -> FasterRCNN:
    """torchvision's ``fasterrcnn_resnet50_fpn`` architecture (``TORCHVISION_FASTER_RCNN``),
    to fine-tune a torchvision FasterRCNN state dict; COCO's 91 classes by default."""
    return build_resnet_fpn_faster_rcnn(
        (3, 4, 6, 3), num_classes, backbone_num_classes, **{**TORCHVISION_FASTER_RCNN, **kwargs}
    )


@register_model
def faster_rcnn_resnet_101_fpn_torchvision(
    num_classes: int = 91, backbone_num_classes: int = 1000, **kwargs
) -> FasterRCNN:
    """torchvision's FasterRCNN on a ResNet-101 FPN backbone (``TORCHVISION_FASTER_RCNN``)."""
    return build_resnet_fpn_faster_rcnn(
        (3, 4, 23, 3), num_classes, backbone_num_classes, **{**TORCHVISION_FASTER_RCNN, **kwargs}
    )


def _v2(stage_sizes, num_classes, backbone_num_classes, norm_mode, kwargs) -> FasterRCNN:
    """torchvision's v2 detector on a ResNet of ``stage_sizes``: ``norm_mode`` sets
    every norm (body, FPN and box head) unless one is given on its own."""
    per_stage = dict(norm_mode=norm_mode, fpn_norm_mode=norm_mode, box_head_norm_mode=norm_mode)
    return build_resnet_fpn_faster_rcnn(
        stage_sizes, num_classes, backbone_num_classes, **{**TORCHVISION_FASTER_RCNN_V2, **per_stage, **kwargs}
    )


@register_model
def faster_rcnn_resnet_50_fpn_v2_torchvision(
    num_classes: int = 91, backbone_num_classes: int = 1000, norm_mode: str = "batch", **kwargs
) -> FasterRCNN:
    """torchvision's ``fasterrcnn_resnet50_fpn_v2`` architecture (``TORCHVISION_FASTER_RCNN_V2``),
    to use or fine-tune its COCO weights (46.7 box AP); COCO's 91 classes by default."""
    return _v2((3, 4, 6, 3), num_classes, backbone_num_classes, norm_mode, kwargs)


@register_model
def faster_rcnn_resnet_101_fpn_v2_torchvision(
    num_classes: int = 91, backbone_num_classes: int = 1000, norm_mode: str = "batch", **kwargs
) -> FasterRCNN:
    """torchvision's v2 heads (``TORCHVISION_FASTER_RCNN_V2``) on a ResNet-101 FPN backbone."""
    return _v2((3, 4, 23, 3), num_classes, backbone_num_classes, norm_mode, kwargs)
