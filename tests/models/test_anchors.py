"""Anchors: each level's actual stride per axis (canvas // grid), and the RPN's
anchors spaced by it, against torchvision's ``AnchorGenerator`` and a NumPy
reference of the nominal-stride grid."""

import jax
import numpy as np
import pytest

from lucid_jax.models import TORCHVISION_FASTER_RCNN
from lucid_jax.models.anchors import cell_anchors, level_stride
from tests.models.conftest import TV_REASON, tiny_detector


def _ceil_div(a, b):
    return -(-a // b)


def _model_anchors(model, h, w):
    """The anchors [N, 4] the detector's RPN lays over an h x w canvas.

    Only the output "anchors" is kept, and it depends on shapes alone, so XLA
    drops the whole network from the compiled program.
    """
    x = np.zeros((1, 3, h, w), np.float32)
    template = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)
    anchors = jax.jit(lambda v, x: model.apply(v, x, method="forward_with_proposals")["anchors"])
    return np.asarray(anchors(variables, x))


def test_level_stride():
    assert level_stride((160, 160), (3, 3)) == (53, 53)
    assert level_stride((800, 800), (13, 13)) == (61, 61)
    assert level_stride((224, 352), (4, 6)) == (56, 58)
    assert level_stride((224, 352), (7, 11)) == (32, 32)


@pytest.mark.parametrize("h, w", [(160, 160), (800, 800), (224, 352)])
def test_rpn_anchors_match_torchvision(h, w):
    torch = pytest.importorskip("torch", reason=TV_REASON)
    pytest.importorskip("torchvision", reason=TV_REASON)
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    model = tiny_detector(**TORCHVISION_FASTER_RCNN)
    ours = _model_anchors(model, h, w)
    grids = [(_ceil_div(h, s), _ceil_div(w, s)) for s in model.backbone.strides]
    generator = AnchorGenerator(
        tuple(tuple(s) for s in model.rpn.anchor_sizes), (tuple(model.rpn.aspect_ratios),) * len(grids)
    )
    features = [torch.zeros(1, 1, gh, gw) for gh, gw in grids]
    theirs = generator(ImageList(torch.zeros(1, 3, h, w), [(h, w)]), features)[0].numpy()
    np.testing.assert_array_equal(ours, theirs)

    # P6, the last level: its centres step by canvas // grid on each axis
    gh, gw = grids[-1]
    p6, tv_p6 = ours[-gh * gw * 3 :], theirs[-gh * gw * 3 :]
    centres = (p6[:, :2] + p6[:, 2:]) / 2  # [N6, 2] (x, y)
    np.testing.assert_array_equal(centres, (tv_p6[:, :2] + tv_p6[:, 2:]) / 2)
    np.testing.assert_array_equal(np.unique(centres[:, 0]), np.arange(gw) * (w // gw))
    np.testing.assert_array_equal(np.unique(centres[:, 1]), np.arange(gh) * (h // gh))


@pytest.mark.parametrize("h, w", [(128, 128), (224, 352)])
def test_p2_to_p5_anchors_sit_on_the_nominal_strides(h, w):
    """On a canvas that is a multiple of 32, canvas // grid is the nominal stride."""
    model = tiny_detector()  # Lucid's defaults: P2..P5, 9 unrounded anchors
    ours = _model_anchors(model, h, w)
    expected = []
    for sizes, s in zip(model.rpn.anchor_sizes, model.backbone.strides):
        base = cell_anchors(sizes, model.rpn.aspect_ratios)  # [A, 4]
        ys, xs = np.mgrid[0 : h // s, 0 : w // s].astype(np.float32) * s  # [H/s, W/s] each
        shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)  # [HW, 1, 4], (y, x) order
        expected.append((shifts + base[None]).reshape(-1, 4))
    np.testing.assert_array_equal(ours, np.concatenate(expected))
