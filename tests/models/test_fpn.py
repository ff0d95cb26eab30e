"""The ResNet FPN backbone: the strides it declares on the unbound module (for anchors,
RoIAlign and the canvas multiple), and the feature shapes they predict."""

import jax
import jax.numpy as jnp
import pytest

from lucid_jax.models import TORCHVISION_FASTER_RCNN, faster_rcnn_resnet_101_fpn
from tests.models.conftest import tiny_detector


def _ceil_div(a, b):
    return -(-a // b)


def test_backbone_declares_strides_on_the_unbound_module():
    lucid = faster_rcnn_resnet_101_fpn().backbone
    assert lucid.net.feature_strides == (4, 8, 16, 32)
    assert lucid.strides == (4, 8, 16, 32)
    assert lucid.roi_strides == (4, 8, 16, 32)
    assert lucid.size_divisibility == 32
    tv = tiny_detector(**TORCHVISION_FASTER_RCNN).backbone
    assert tv.strides == (4, 8, 16, 32, 64)
    assert tv.roi_strides == (4, 8, 16, 32)  # RoIAlign never pools from P6
    assert tv.size_divisibility == 32


@pytest.mark.parametrize("extra_p6", [False, True])
def test_feature_shapes_follow_the_declared_strides(extra_p6):
    backbone = tiny_detector(extra_p6=extra_p6).backbone
    h, w = 224, 352  # H/32 = 7 and W/32 = 11: P6 is ceil-sized
    x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    features, _ = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x), x)
    assert [f.shape[1:3] for f in features] == [(_ceil_div(h, s), _ceil_div(w, s)) for s in backbone.strides]
