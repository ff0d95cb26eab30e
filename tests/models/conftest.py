"""Small detector configurations shared by the model tests.

Most tests use a tiny ResNet (one bottleneck per stage, narrow widths) at 128x128
so the whole file compiles in seconds; the few full ResNet-101 tests say so. The
``tiny`` fixture, its initial variables, is in tests/conftest.py: built once a session.
"""

import numpy as np

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


def example_targets():
    """Two images, up to four boxes each (padding with garbage labels)."""
    boxes = np.array(
        [
            [[10, 12, 60, 70], [50, 40, 120, 100], [64, 0, 128, 40], [0, 0, 0, 0]],
            [[20, 30, 90, 110], [5, 80, 45, 120], [0, 0, 0, 0], [3, 3, 1, 1]],
        ],
        np.float32,
    )
    labels = np.array([[1, 3, 4, 0], [2, 1, 0, -9]], np.int32)
    valid = np.array([[True, True, True, False], [True, True, False, False]])
    return {"boxes": boxes, "labels": labels, "valid": valid}


def randomise_bn(module, gen):
    """Give every BN non-trivial statistics so the conversion of all four BN tensors is tested.

    ``module`` is a torch module (torch and torchvision are needed).
    """
    import torch
    from torchvision.models.resnet import Bottleneck
    from torchvision.ops.misc import FrozenBatchNorm2d

    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
            c = m.weight.shape[0]
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    # Damp each residual branch so a random ResNet-101's activations stay bounded
    # (otherwise they grow ~2x per block and every proposal degenerates).
    for m in module.modules():
        if isinstance(m, Bottleneck):
            m.bn3.weight.data.mul_(0.2)
