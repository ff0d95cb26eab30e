"""End-to-end parity with torchvision on identical (random) weights: our detector,
built with ``TORCHVISION_FASTER_RCNN``, against torchvision's ``FasterRCNN`` on a
ResNet FPN backbone: RPN proposals, RoI-head scores and the final detections, on
the same normalised image. The ResNet-101 classifier's parity is in test_resnet.py.
"""

import jax
import numpy as np
import pytest

from lucid_jax import state_dict
from lucid_jax.models import TORCHVISION_FASTER_RCNN, build_resnet_fpn_faster_rcnn
from tests.models.conftest import TV_REASON, randomise_bn
from tests.models.torchvision_twin import compare_with_torchvision, run_torchvision

torch = pytest.importorskip("torch", reason=TV_REASON)
torchvision = pytest.importorskip("torchvision", reason=TV_REASON)

from torchvision.models.detection import FasterRCNN  # noqa: E402
from torchvision.models.detection.backbone_utils import BackboneWithFPN  # noqa: E402
from torchvision.models.resnet import Bottleneck, ResNet  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402


def _torchvision_detector(layers, num_classes, seed, rpn_box_gain=1.0, **kwargs):
    """torchvision's FasterRCNN on a random ResNet FPN; ``kwargs`` go to FasterRCNN."""
    torch.manual_seed(seed)
    body = ResNet(Bottleneck, layers, norm_layer=FrozenBatchNorm2d)
    randomise_bn(body, torch.Generator().manual_seed(seed + 1))
    backbone = BackboneWithFPN(
        body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, [256, 512, 1024, 2048], 256
    )
    tv = FasterRCNN(backbone, num_classes=num_classes, **kwargs).eval()
    with torch.no_grad():
        # Spread the RPN's and the classifier's outputs, so that scores are far
        # apart compared with float rounding and rankings are unambiguous.
        tv.rpn.head.cls_logits.weight.mul_(30.0)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
        tv.rpn.head.bbox_pred.weight.mul_(rpn_box_gain)
    return tv


def _ours(tv, layers, num_classes, x, sizes, **config):
    model = build_resnet_fpn_faster_rcnn(layers, num_classes, 1000, **{**TORCHVISION_FASTER_RCNN, **config})
    template = jax.eval_shape(model.init, jax.random.key(0), x)
    template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)
    flat = state_dict.from_torchvision_faster_rcnn(tv.state_dict())
    variables = state_dict.from_state_dict(template, flat, strict=False, model=model)
    sizes = np.asarray(sizes, np.float32)
    raw = jax.jit(lambda v, x, s: model.apply(v, x, s, method="forward_with_proposals"))(variables, x, sizes)
    dets = jax.jit(lambda v, x, s: model.apply(v, x, s, method="predict"))(variables, x, sizes)
    return raw, dets


def _check_parity(layers, num_classes, size, seed, sizes=None, pre_nms_top_n=1000, rpn_box_gain=1.0):
    """Compare proposals, class probabilities and detections with torchvision.

    Args:
      size: the canvas, an int (square) or (height, width).
      sizes: optional per-image (height, width); each image is random inside its
        size and zero in the padding. Default: one image filling the canvas.
      pre_nms_top_n: the RPN's per-level count before NMS, in test.
      rpn_box_gain: scales the RPN's box-delta weights.

    Returns:
      per image, the largest |ours - torchvision| of (proposals, detection boxes).
    """
    h, w = (size, size) if isinstance(size, int) else size
    sizes = [(h, w)] if sizes is None else sizes
    tv = _torchvision_detector(layers, num_classes, seed, rpn_box_gain, rpn_pre_nms_top_n_test=pre_nms_top_n)
    x = np.random.default_rng(seed).standard_normal((len(sizes), 3, h, w)).astype(np.float32)
    for i, (ih, iw) in enumerate(sizes):
        x[i, :, ih:] = 0.0
        x[i, :, :, iw:] = 0.0
    theirs = run_torchvision(tv, x, sizes)
    raw, dets = _ours(tv, layers, num_classes, x, sizes, rpn_pre_nms_top_n=(2000, pre_nms_top_n))

    return compare_with_torchvision(theirs, raw, dets)


@pytest.mark.parametrize("seed", [0, 1])
def test_faster_rcnn_small_depth_matches_torchvision(seed):
    _check_parity((1, 1, 1, 1), num_classes=4, size=160, seed=seed)


def test_faster_rcnn_resnet101_matches_torchvision():
    _check_parity((3, 4, 23, 3), num_classes=6, size=192, seed=5)


# With 200 boxes per level before NMS, every level's survivors reach the 1000
# proposals, and larger RPN deltas move P6's 512-pixel boxes off the image border:
# then the P6 anchors' positions show in the proposals (these two tests fail when
# P6 anchors are spaced 64 pixels apart instead of canvas // grid).
PROBE_P6 = dict(pre_nms_top_n=200, rpn_box_gain=10.0)


def test_faster_rcnn_odd_grid_matches_torchvision():
    """224x352: H/32 = 7 and W/32 = 11 are odd, so P6 (4x6) has strides 56 and 58."""
    _check_parity((1, 1, 1, 1), num_classes=4, size=(224, 352), seed=2, **PROBE_P6)


def test_faster_rcnn_batch_of_two_sizes_matches_torchvision():
    """Two images of different sizes padded to one taller-than-wide canvas, 288x224
    (P6 5x4, strides 57 and 56); torchvision gets the same batch and true sizes."""
    _check_parity((1, 1, 1, 1), num_classes=4, size=(288, 224), seed=3, sizes=[(288, 224), (230, 170)], **PROBE_P6)
