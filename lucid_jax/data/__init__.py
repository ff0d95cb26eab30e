"""Datasets, transforms and fixed-shape batching for the detector.

Three datasets follow one protocol (:class:`Dataset`): the built-in synthetic
:class:`ShapesDataset`, :class:`VOCDataset` and :class:`COCODataset`. Examples go
through :func:`preprocess` onto a fixed canvas and :func:`collate` into batches whose
shapes never change, which is what a jit-compiled step needs; :class:`Loader` does
both with seeded shuffling, resumption at any step and thread prefetch.

Each dataset also gives ``annotation(i)`` (every object, original pixels, no image
decoded), the ground truth that evaluation counts; :func:`object_counts` and
:func:`dropped_boxes_summary` say what a ``max_boxes`` cut removes from training, and
:func:`coco_ground_truth` writes COCO's json ground truth (``lucid_jax.inference.coco_results``
writes the detections).
"""

from lucid_jax.data.batching import TRAIN_KEYS, Loader, collate, largest_boxes, model_inputs
from lucid_jax.data.canvases import Canvases, parse_image_size
from lucid_jax.data.coco import COCODataset
from lucid_jax.data.coco_format import coco_ground_truth
from lucid_jax.data.dataset import (
    Annotation,
    Dataset,
    DatasetError,
    DroppedBoxes,
    Example,
    dropped_boxes_summary,
    get_annotation,
    image_shapes,
    image_size,
    load_image,
    make_annotation,
    make_example,
    object_counts,
)
from lucid_jax.data.shapes import CLASS_NAMES as SHAPES_CLASSES
from lucid_jax.data.shapes import ShapesDataset
from lucid_jax.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    clip_boxes,
    fit_to_canvas,
    hflip,
    normalize,
    pad_to,
    preprocess,
    preprocess_on_canvas,
    random_hflip,
    resize,
    resized_shape,
    round_up,
)
from lucid_jax.data.voc import VOC_CLASSES, VOCDataset, parse_annotation

__all__ = [
    "Annotation",
    "COCODataset",
    "Canvases",
    "Dataset",
    "DatasetError",
    "DroppedBoxes",
    "Example",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Loader",
    "SHAPES_CLASSES",
    "ShapesDataset",
    "TRAIN_KEYS",
    "VOCDataset",
    "VOC_CLASSES",
    "clip_boxes",
    "coco_ground_truth",
    "collate",
    "dropped_boxes_summary",
    "get_annotation",
    "hflip",
    "image_shapes",
    "image_size",
    "largest_boxes",
    "load_image",
    "make_annotation",
    "make_example",
    "model_inputs",
    "normalize",
    "object_counts",
    "pad_to",
    "parse_annotation",
    "parse_image_size",
    "preprocess",
    "preprocess_on_canvas",
    "random_hflip",
    "fit_to_canvas",
    "resize",
    "resized_shape",
    "round_up",
]
