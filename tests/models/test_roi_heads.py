"""The RoI heads' settings: the class count, background included, is checked when the
detector is built."""

import pytest

from lucid_jax.models import faster_rcnn_resnet_101_fpn


@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_num_classes_below_two(num_classes):
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        faster_rcnn_resnet_101_fpn(num_classes=num_classes)
