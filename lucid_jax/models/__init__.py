"""Models: ResNet classifiers and Faster R-CNN detectors, by name or by builder."""

from lucid_jax.models.faster_rcnn import FasterRCNN
from lucid_jax.models.fpn import FPN, ResNetFPN
from lucid_jax.models.registry import (
    TORCHVISION_FASTER_RCNN,
    TORCHVISION_FASTER_RCNN_V2,
    build_resnet_fpn_faster_rcnn,
    faster_rcnn_mini_fpn,
    faster_rcnn_resnet_50_fpn,
    faster_rcnn_resnet_101_fpn,
    get_model,
    list_models,
    resnet_50,
    resnet_101,
)
from lucid_jax.models.resnet import ResNet
from lucid_jax.models.roi_heads import RoIHeads
from lucid_jax.models.rpn import RPN

__all__ = [
    "FasterRCNN",
    "FPN",
    "ResNet",
    "ResNetFPN",
    "RoIHeads",
    "RPN",
    "TORCHVISION_FASTER_RCNN",
    "TORCHVISION_FASTER_RCNN_V2",
    "build_resnet_fpn_faster_rcnn",
    "faster_rcnn_mini_fpn",
    "faster_rcnn_resnet_50_fpn",
    "faster_rcnn_resnet_101_fpn",
    "get_model",
    "list_models",
    "resnet_50",
    "resnet_101",
]
