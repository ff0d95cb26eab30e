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
