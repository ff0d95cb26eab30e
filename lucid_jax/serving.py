"""Serve an exported detector: images of any size in, detections in their own pixels out.

    from lucid_jax import serving
    detect = serving.load("detector.jax")                  # written by lucid-jax export
    for dets in detect([image_a, image_b]):                # uint8 [H, W, 3] RGB, any sizes
        print(dets["boxes"], dets["scores"], dets["classes"])

Only the artifact is run; no model code is built. Each image is fitted onto the
artifact's canvas (aspect ratio kept, padded right and below), the images go
through the artifact ``batch_size`` at a time, and the boxes are mapped back.
"""

import os
from collections.abc import Sequence

import numpy as np

from lucid_jax.data.transforms import fit_to_canvas
from lucid_jax.export import read_artifact

DEFAULT_BATCH = 8  # images per call when the artifact's batch dimension is symbolic


class Detector:
    """A loaded artifact as a callable; see :func:`load`.

    Attributes:
      class_names: foreground class names; label l is ``class_names[l - 1]``.
      canvas: (height, width) the images are fitted onto.
      batch_size: images per call of the artifact.
      meta: the artifact's JSON description.
    """

    def __init__(self, exported, meta: dict, batch_size: int | None = None):
        self.exported, self.meta = exported, meta
        self.class_names = list(meta["class_names"])
        self.canvas = tuple(meta["canvas"])
        fixed = meta["batch_size"]
        if fixed != "any" and batch_size not in (None, fixed):
            raise ValueError(f"the artifact was exported for batch size {fixed}, not {batch_size}")
        self.batch_size = fixed if fixed != "any" else (batch_size or DEFAULT_BATCH)

    def __call__(self, images: Sequence[np.ndarray], score_thresh: float = 0.0) -> list[dict]:
        """Detections per image.

        Args:
          images: uint8 [H_i, W_i, 3] RGB arrays, any sizes.
          score_thresh: keep detections scoring at least this (the artifact's own
            threshold applies first).

        Returns:
          One dict per image: {"boxes": [N, 4] float32 xyxy in the image's pixels,
          "scores": [N] float32, "labels": [N] int32, "classes": [N] names},
          sorted by decreasing score.
        """
        for i, image in enumerate(images):
            if np.asarray(image).dtype != np.uint8 or np.ndim(image) != 3 or np.shape(image)[2] != 3:
                raise ValueError(
                    f"images[{i}] must be uint8 [H, W, 3] RGB, got {np.asarray(image).dtype} {tuple(np.shape(image))}"
                )
        out: list[dict] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            canvases = np.zeros((self.batch_size, *self.canvas, 3), np.uint8)
            sizes = np.tile(np.array(self.canvas, np.int32), (self.batch_size, 1))  # padding rows: any valid size
            scales = []
            for i, image in enumerate(chunk):
                canvases[i], sizes[i], scale = fit_to_canvas(np.asarray(image), self.canvas)
                scales.append(scale)
            dets = {k: np.asarray(v) for k, v in self.exported.call(canvases, sizes).items()}
            for i, (sy, sx) in enumerate(scales):
                keep = dets["valid"][i] & (dets["scores"][i] >= score_thresh)
                labels = dets["labels"][i][keep].astype(np.int32)
                out.append(
                    {
                        "boxes": (dets["boxes"][i][keep] / np.array([sx, sy, sx, sy], np.float32)).astype(np.float32),
                        "scores": dets["scores"][i][keep].astype(np.float32),
                        "labels": labels,
                        "classes": [self.class_names[int(lab) - 1] for lab in labels],
                    }
                )
        return out


def load(path: str | os.PathLike, batch_size: int | None = None) -> Detector:
    """Load a file written by ``lucid-jax export`` (and its ``.json``) as a :class:`Detector`.

    Args:
      path: the artifact.
      batch_size: images per call for an artifact with a symbolic batch dimension
        (default 8); an artifact exported for a fixed batch size keeps it.
    """
    exported, meta = read_artifact(path)
    return Detector(exported, meta, batch_size)
