"""Datasets, transforms and fixed-shape batching for the detector.

Three datasets follow one protocol (:class:`Dataset`): the built-in synthetic
:class:`ShapesDataset`, :class:`VOCDataset` and :class:`COCODataset`. Examples go
through :func:`preprocess` onto a fixed canvas and :func:`collate` into batches whose
shapes never change, which is what a jit-compiled step needs; :class:`Loader` does
both with seeded shuffling, resumption at any step and thread prefetch.
"""

from lucid_jax.data.batching import TRAIN_KEYS, Loader, collate, largest_boxes, model_inputs
from lucid_jax.data.coco import COCODataset
from lucid_jax.data.dataset import Dataset, DatasetError, Example, load_image, make_example
from lucid_jax.data.shapes import CLASS_NAMES as SHAPES_CLASSES
from lucid_jax.data.shapes import ShapesDataset
from lucid_jax.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    clip_boxes,
    hflip,
    normalize,
    pad_to,
    preprocess,
    random_hflip,
    resize,
    resized_shape,
    round_up,
)
from lucid_jax.data.voc import VOC_CLASSES, VOCDataset, parse_annotation

__all__ = [
    "COCODataset",
    "Dataset",
    "DatasetError",
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
    "collate",
    "hflip",
    "largest_boxes",
    "load_image",
    "make_example",
    "model_inputs",
    "normalize",
    "pad_to",
    "parse_annotation",
    "preprocess",
    "random_hflip",
    "resize",
    "resized_shape",
    "round_up",
]
