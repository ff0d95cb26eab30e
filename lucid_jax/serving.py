"""Serve an exported detector: images of any size in, detections in their own pixels out.

    from lucid_jax import serving
    detect = serving.load("detector.jax")                  # written by lucid-jax export
    for dets in detect([image_a, image_b]):                # uint8 [H, W, 3] RGB, any sizes
        print(dets["boxes"], dets["scores"], dets["classes"])

Only the artifacts are run; no model code is built. A run trained with
``--image-size S`` has one artifact: each image is fitted onto its square canvas
(aspect ratio kept, padded right and below). A ``SHORT:LONG`` run has one artifact
per canvas and an index, ``detector.jax.json``: each image goes on the canvas of
its orientation, resized as in training. The images go through each artifact
``batch_size`` at a time, and the boxes are mapped back to each image's pixels.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lucid_jax.data.canvases import Canvases
from lucid_jax.export import read_artifact
from lucid_jax.inference import detect_on_canvases
from lucid_jax.tiling import DEFAULT_OVERLAP, detect_tiled

DEFAULT_BATCH = 8  # images per call when the artifact's batch dimension is symbolic


class Detector:
    """Loaded artifacts as a callable; see :func:`load`.

    Attributes:
      class_names: foreground class names; label l is ``class_names[l - 1]``.
      canvases: (height, width) of each artifact's canvas.
      batch_size: images per call of an artifact.
      meta: the JSON description (the index, for several canvases).
    """

    def __init__(self, artifacts: dict, meta: dict, batch_size: int | None = None, resize: Canvases | None = None):
        """
        Args:
          artifacts: canvas (height, width) -> the deserialized jax.export program.
          meta: the JSON description.
          batch_size: see :func:`load`.
          resize: the canvases' rule of a SHORT:LONG run; None for one square canvas.
        """
        self.artifacts, self.meta, self.resize = artifacts, meta, resize
        self.class_names = list(meta["class_names"])
        self.canvases = list(artifacts)
        fixed = meta["batch_size"]
        if fixed != "any" and batch_size not in (None, fixed):
            raise ValueError(f"the artifact was exported for batch size {fixed}, not {batch_size}")
        self.batch_size = fixed if fixed != "any" else (batch_size or DEFAULT_BATCH)

    @property
    def canvas(self) -> tuple[int, int]:
        """The canvas of a one-canvas detector."""
        if len(self.canvases) != 1:
            raise AttributeError(f"this detector has {len(self.canvases)} canvases; see .canvases")
        return self.canvases[0]

    def __call__(
        self,
        images: Sequence[np.ndarray],
        score_thresh: float = 0.0,
        *,
        tile: int | None = None,
        overlap: float = DEFAULT_OVERLAP,
    ) -> list[dict]:
        """Detections per image.

        Args:
          images: uint8 [H_i, W_i, 3] RGB arrays, any sizes.
          score_thresh: keep detections scoring at least this (the artifact's own
            threshold applies first).
          tile: cut each image into windows of this many pixels at native resolution,
            detect each window, and merge the boxes across windows
            (:func:`lucid_jax.tiling.detect_tiled`); None: each image whole.
          overlap: the share of a window shared with its neighbour, with ``tile``.

        Returns:
          One dict per image, in input order: {"boxes": [N, 4] float32 xyxy in the
          image's pixels (clipped to it), "scores": [N] float32, "labels": [N] int32,
          "classes": [N] names}, sorted by decreasing score.
        """
        for i, image in enumerate(images):
            if np.asarray(image).dtype != np.uint8 or np.ndim(image) != 3 or np.shape(image)[2] != 3:
                raise ValueError(
                    f"images[{i}] must be uint8 [H, W, 3] RGB, got {np.asarray(image).dtype} {tuple(np.shape(image))}"
                )
        if tile is not None:
            found = [
                detect_tiled(
                    np.asarray(image),
                    lambda windows: self(windows, score_thresh),
                    tile,
                    overlap,
                    nms_thresh=float(self.meta.get("nms_thresh", 0.5)),
                    batch_size=self.batch_size,
                )
                for image in images
            ]
        else:
            found = detect_on_canvases(
                lambda canvas, batch, sizes: self.artifacts[canvas].call(batch, sizes),
                [np.asarray(image) for image in images],
                self.resize or self.canvases[0],
                self.batch_size,
                score_thresh,
            )
        for dets in found:
            dets["classes"] = [self.class_names[int(lab) - 1] for lab in dets["labels"]]
        return found


def load(path: str | os.PathLike, batch_size: int | None = None) -> Detector:
    """Load what ``lucid-jax export`` wrote to ``path`` as a :class:`Detector`.

    Args:
      path: the ``--out`` of the export: one artifact (and its ``.json``), or, for
        a SHORT:LONG run, the name whose ``.json`` indexes one artifact per canvas.
      batch_size: images per call for artifacts with a symbolic batch dimension
        (default 8); artifacts exported for a fixed batch size keep it.
    """
    path = Path(path)
    index_path = Path(str(path) + ".json")
    index = json.loads(index_path.read_text()) if index_path.is_file() and not path.is_file() else None
    if index is None or "canvases" not in index:
        exported, meta = read_artifact(path)
        return Detector({tuple(meta["canvas"]): exported}, meta, batch_size)
    artifacts = {}
    for entry in index["canvases"]:
        exported, _ = read_artifact(path.with_name(entry["file"]))
        artifacts[tuple(entry["canvas"])] = exported
    r = index["resize"]
    return Detector(artifacts, index, batch_size, Canvases(r["short"], r["long"], r["multiple"], r["band"]))
