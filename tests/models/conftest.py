"""Small detector configurations shared by the model tests.

Most tests use a tiny ResNet (one bottleneck per stage, narrow widths) at 128x128
so the whole file compiles in seconds; the few full ResNet-101 tests say so.
"""

import jax
import numpy as np
import pytest

from lucid_jax.models import build_resnet_fpn_faster_rcnn

TV_REASON = "torchvision is not installed; pip install -e '.[parity]' to run the parity tests"

TINY = dict(
    widths=(8, 16, 32, 64),
    stem_width=8,
    fpn_channels=32,
    representation_size=64,
)


def tiny_detector(num_classes=5, **kwargs):
    """A Faster R-CNN with one bottleneck per stage and narrow layers."""
    return build_resnet_fpn_faster_rcnn((1, 1, 1, 1), num_classes, 10, **{**TINY, **kwargs})


def random_images(seed, batch=1, size=128):
    """[batch, 3, size, size] float32 standard-normal images."""
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    """(model, variables) of the tiny detector, initialised at 128x128."""
    model = tiny_detector()
    variables = jax.jit(model.init)(jax.random.key(0), random_images(0))
    return model, variables
