"""Static-shape detection ops for one image; batch them with ``jax.vmap``.

Every function here is pure, traceable under ``jit``/``vmap``/``grad`` and returns
arrays whose shapes depend only on the shapes (and static arguments) of its inputs.
"""

from lucid_jax.ops.boxes import (
    BBOX_XFORM_CLIP,
    box_area,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    min_size_mask,
)
from lucid_jax.ops.matching import MatchLabel, match_boxes
from lucid_jax.ops.nms import batched_nms, nms
from lucid_jax.ops.roi_align import fpn_level_of_boxes, multiscale_roi_align, roi_align
from lucid_jax.ops.sampling import sample_balanced, sample_balanced_indices

__all__ = [
    "BBOX_XFORM_CLIP",
    "box_area",
    "box_iou",
    "clip_boxes",
    "decode_boxes",
    "encode_boxes",
    "min_size_mask",
    "nms",
    "batched_nms",
    "roi_align",
    "multiscale_roi_align",
    "fpn_level_of_boxes",
    "MatchLabel",
    "match_boxes",
    "sample_balanced",
    "sample_balanced_indices",
]
