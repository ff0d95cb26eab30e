"""Parity with torchvision's ``fasterrcnn_resnet50_fpn_v2`` on identical random weights.

torchvision's v2 detector (BatchNorm in the body, after every FPN conv and in a
box head of four 3x3 convs and one fully connected layer, two RPN convs) is built
with ``weights=None``, given non-trivial BatchNorm statistics everywhere and
spread output layers, saved as a weights-only ``.pth`` and loaded through the
public path, ``weights.load_pretrained``, into
``faster_rcnn_resnet_50_fpn_v2_torchvision``. Then:

- evaluation: proposals, class probabilities and detections, on a square canvas,
  and on a batch of two images of different sizes on a canvas with odd H/32 and W/32;
- training: one step's four losses, both sides in training mode (batch
  statistics in the body, the FPN and the box head), with every candidate
  anchor and RoI sampled so that the sampling is the same on both sides.

Inputs are small (the full-size comparison is ``benchmarks/bench_predict.py --model v2``).
"""

import jax
import numpy as np
import pytest

from lucid_jax import weights
from lucid_jax.models import get_model
from tests.models.conftest import TV_REASON, randomise_bn
from tests.models.torchvision_twin import (
    compare_with_torchvision,
    every_candidate_sampled,
    run_torchvision,
    torchvision_losses,
)

torch = pytest.importorskip("torch", reason=TV_REASON)
torchvision = pytest.importorskip("torchvision", reason=TV_REASON)

from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2  # noqa: E402

NUM_CLASSES = 91
MODEL = "faster_rcnn_resnet_50_fpn_v2_torchvision"
# Training: every NMS survivor is a proposal (no cut at a near-tie), every
# anchor and every RoI candidate is sampled, and the canvas is small, so that the
# conv box head's thousands of RoIs stay cheap.
TRAIN_TOPN = 700
TRAIN, OURS_TRAIN = every_candidate_sampled(TRAIN_TOPN)


def _torchvision_v2(seed: int, **kwargs):
    """torchvision's v2 detector with random weights, every BN's statistics random,
    and the RPN's and the classifier's logits spread so that scores are far apart
    compared with float rounding and about 100 detections pass 0.05."""
    torch.manual_seed(seed)
    tv = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **kwargs)
    randomise_bn(tv, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        tv.rpn.head.cls_logits.weight.mul_(30.0)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(30.0)
    return tv


def _load_ours(tv, path, x, **config):
    """Our v2 detector, its variables loaded from torchvision's weights-only ``.pth``."""
    torch.save(tv.state_dict(), path)
    model = get_model(MODEL, num_classes=NUM_CLASSES, **config)
    template = jax.eval_shape(model.init, jax.random.key(0), x)
    template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)
    variables, report = weights.load_pretrained(template, path, model=model)
    assert report.kind == weights.TORCHVISION_FASTER_RCNN_V2
    assert report.skipped == {} and report.left_initial == ["backbone.net.fc.bias", "backbone.net.fc.weight"]
    return model, variables


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """(torchvision's detector, our model, its variables, our jitted raw outputs and detections)."""
    tv = _torchvision_v2(11).eval()
    x = np.zeros((1, 3, 192, 192), np.float32)
    model, variables = _load_ours(tv, tmp_path_factory.mktemp("v2") / "v2.pth", x)

    @jax.jit
    def run(v, x, sizes):
        raw = model.apply(v, x, sizes, method="forward_with_proposals")
        return raw, model.apply(v, x, sizes, method="predict")

    return tv, run, variables


def _images(seed, canvas, sizes):
    h, w = canvas
    x = np.random.default_rng(seed).standard_normal((len(sizes), 3, h, w)).astype(np.float32)
    for i, (ih, iw) in enumerate(sizes):
        x[i, :, ih:] = 0.0
        x[i, :, :, iw:] = 0.0
    return x


@pytest.mark.parametrize(
    "canvas, sizes",
    [
        ((192, 192), [(192, 192)]),
        # H/32 = 7 and W/32 = 5 are odd (P6 is 4x3), and the second image is smaller
        ((224, 160), [(224, 160), (181, 130)]),
    ],
    ids=["square", "odd-grid-two-sizes"],
)
def test_v2_detections_match_torchvision(evaluation, canvas, sizes):
    tv, run, variables = evaluation
    x = _images(3, canvas, sizes)
    theirs = run_torchvision(tv, x, sizes)
    assert min(len(t[3]) for t in theirs) >= 80  # a realistic count of detections on both sides
    raw, dets = run(variables, x, np.asarray(sizes, np.float32))
    # The random v2 RPN scores some pairs of proposals alike to 1e-7 (5 pairs of 871
    # on the square canvas), which float rounding may order either way: 2% of the
    # entries may swap with a near-tie, whose probabilities must still agree to 1e-5.
    errors = compare_with_torchvision(theirs, raw, dets, box_atol=1e-3, score_atol=1e-4, max_swapped=0.02)
    assert max(max(e) for e in errors) < 1e-3


def test_v2_training_losses_match_torchvision(tmp_path):
    """One training step's losses, both sides in training mode with batch statistics
    in the body, the FPN and the box head (our box head's counting only the
    sampled RoIs, not the padding), within 1e-4 (relative)."""
    tv = _torchvision_v2(5, **TRAIN)
    tv.rpn.nms_thresh = 0.7
    x = _images(7, (96, 128), [(96, 128), (80, 100)])
    boxes = np.array(
        [[[10, 12, 60, 70], [50, 30, 120, 90], [4, 40, 40, 92]], [[20, 10, 90, 70], [5, 5, 40, 30], [0] * 4]]
    )
    boxes = boxes.astype(np.float32)
    labels = np.array([[1, 35, 90], [2, 17, 7]], np.int32)  # the padded entry's label is garbage
    valid = np.array([[True, True, True], [True, True, False]])
    targets = {"boxes": boxes, "labels": labels, "valid": valid}

    tv.train()
    model, variables = _load_ours(tv, tmp_path / "v2.pth", x, **OURS_TRAIN)
    expected = torchvision_losses(tv, x, [(96, 128), (80, 100)], targets, TRAIN_TOPN)

    def loss(v, x, t, s):
        rngs = {"dropout": jax.random.key(0), "sampling": jax.random.key(1)}
        return model.apply(v, x, t, s, method="loss", rngs=rngs, mutable=["batch_stats"])

    got, updates = jax.jit(loss)(variables, x, targets, np.array([(96, 128), (80, 100)], np.float32))
    for name, value in expected.items():
        assert value > 1e-3, name  # every term is exercised
        np.testing.assert_allclose(float(got[name]), value, rtol=1e-4, err_msg=name)
    # Training mode updated the running means of every norm, as torchvision's did.
    tv_state = tv.state_dict()
    for ours, theirs in (
        (
            updates["batch_stats"]["backbone"]["fpn"]["output_norms.0"]["mean"],
            "backbone.fpn.layer_blocks.0.1.running_mean",
        ),
        (updates["batch_stats"]["box_norms.3"]["mean"], "roi_heads.box_head.3.1.running_mean"),
        (
            updates["batch_stats"]["backbone"]["net"]["layer4"]["2"]["conv3"]["1"]["mean"],
            "backbone.body.layer4.2.bn3.running_mean",
        ),
    ):
        np.testing.assert_allclose(np.asarray(ours), tv_state[theirs].numpy(), rtol=1e-4, atol=1e-5)
