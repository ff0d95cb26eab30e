"""The model registry: names, ``get_model``, and the detector builder's flat keywords,
each routed to its stage."""

import pytest

from lucid_jax.models import faster_rcnn_resnet_101_fpn, get_model, list_models


def test_registry():
    assert {"faster_rcnn_resnet_101_fpn", "faster_rcnn_resnet_50_fpn", "resnet_50", "resnet_101"} <= set(list_models())
    with pytest.raises(KeyError, match="faster_rcnn_resnet_101_fpn"):
        get_model("faster_rcnn_resnet_102_fpn")
    assert get_model("faster_rcnn_resnet_101_fpn", num_classes=3).num_classes == 3


def test_flat_keywords_set_each_stage():
    model = faster_rcnn_resnet_101_fpn(
        num_classes=4,
        rpn_post_nms_top_n=[50, 20],
        rpn_fg_iou_thresh=0.6,
        box_score_thresh=0.3,
        box_detections_per_img=7,
        roi_aligned=False,
        smooth_l1_beta=0.5,
    )
    assert (model.rpn.post_nms_top_n, model.rpn.fg_iou_thresh, model.rpn.smooth_l1_beta) == ((50, 20), 0.6, 0.5)
    heads = model.roi_heads
    assert (heads.num_classes, heads.score_thresh, heads.detections_per_img, heads.aligned) == (4, 0.3, 7, False)
    assert heads.smooth_l1_beta == 0.5
    # untouched settings keep the stage's own defaults
    assert (model.rpn.pre_nms_top_n, heads.nms_thresh, heads.batch_size_per_image) == ((2000, 1000), 0.5, 512)
    with pytest.raises(TypeError, match="unknown detector keyword.*rpn_post_nms_topn.*known: anchor_sizes"):
        faster_rcnn_resnet_101_fpn(rpn_post_nms_topn=(1, 1))


def test_v2_heads_are_fields_of_their_stages_and_bad_values_are_one_line_errors():
    import jax
    import numpy as np

    model = get_model("faster_rcnn_resnet_50_fpn_v2_torchvision", num_classes=5)
    assert (model.backbone.norm_mode, model.rpn.conv_depth) == ("batch", 2)
    heads = model.roi_heads
    assert (heads.conv_channels, heads.num_fc, heads.norm_mode) == ((256, 256, 256, 256), 1, "batch")
    x = np.zeros((1, 3, 64, 64), np.float32)
    for kwargs, message in [
        (
            dict(fpn_norm_mode="layer"),
            r"the FPN's norm_mode must be one of \('batch', 'frozen', 'group', None\), got 'layer'",
        ),
        (dict(box_head_norm_mode="sync"), r"the box head's norm_mode must be one of .*got 'sync'"),
        (dict(box_head_fcs=3), "the box head has 1 or 2 fully connected layers, got num_fc=3"),
        (dict(rpn_conv_depth=0), "the RPN head needs conv_depth >= 1, got 0"),
        (dict(norm_mode="none"), r"norm_mode must be one of \('batch', 'frozen', 'group'\), got 'none'"),
    ]:
        bad = get_model("faster_rcnn_mini_fpn", **kwargs)
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(bad.init, jax.random.key(0), x)
