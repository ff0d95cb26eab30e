"""A trained detector as one file: prediction (``lucid_jax.inference.serving_function``)
serialized with ``jax.export``, the weights inside as constants, and a JSON sidecar
that says how to call it.

The artifact runs with jax alone, without lucid_jax or any model code::

    exp = jax.export.deserialize(bytearray(open("detector.jax", "rb").read()))
    out = exp.call(images, image_sizes)

  images       uint8 [B, H, W, 3]: RGB, resized and padded (bottom/right) onto the canvas
  image_sizes  int32 [B, 2]: (height, width) of each image's content on the canvas
  out          {"boxes": [B, K, 4] float32 xyxy canvas pixels, "scores": [B, K] float32,
                "labels": [B, K] int32, "valid": [B, K] bool}, sorted by score

Normalisation is inside the artifact, and so is the zeroing of the padding, so the
artifact computes exactly what ``model.apply(..., method="predict")`` computes on the
preprocessed float canvas. The canvas (H, W) is static: one artifact serves one
canvas. The batch dimension is symbolic by default (one artifact serves any B) or
fixed with ``batch_size``.
"""

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lucid_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lucid_jax.files import write_atomically
from lucid_jax.inference import check_canvas, serving_function

PLATFORMS = ("cpu", "cuda", "tpu")
OUTPUT_SIGNATURE = {
    "boxes": ["B", "K", 4, "float32", "xyxy canvas pixels"],
    "scores": ["B", "K", "float32", "class probability"],
    "labels": ["B", "K", "int32", "1..C-1; 0 where not valid"],
    "valid": ["B", "K", "bool", "a real detection"],
}


def export_prediction(
    model,
    variables: Mapping,
    *,
    canvas: tuple[int, int],
    batch_size: int | None = None,
    platforms: Sequence[str] = PLATFORMS,
    **serving_kwargs,
) -> jax.export.Exported:
    """``jax.export`` of ``lucid_jax.inference.serving_function`` for one canvas and batch size.

    Args:
      canvas: (height, width), multiples of the backbone's ``size_divisibility``.
      batch_size: B, static; None for a symbolic batch dimension ("b"), which
        serves any batch size.
      platforms: lowered for each of these (any of "cpu", "cuda", "tpu").

    Raises:
      ValueError: a canvas that is not a multiple of the backbone's stride, a batch
        size below 1, or an unknown platform.
    """
    h, w = check_canvas(model, canvas, batch_size)
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise ValueError(f"platforms must be among {', '.join(PLATFORMS)}, got {', '.join(platforms) or 'none'}")
    serve = jax.jit(serving_function(model, variables, **serving_kwargs))
    b = jax.export.symbolic_shape("b")[0] if batch_size is None else batch_size
    specs = (jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8), jax.ShapeDtypeStruct((b, 2), jnp.int32))
    return jax.export.export(serve, platforms=tuple(platforms))(*specs)


def write_artifact(
    exported: jax.export.Exported,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Write ``exported.serialize()`` to ``path`` and its description to ``path + ".json"``.

    Returns:
      The JSON sidecar's content: class names (index 0 is the first foreground
      class, label 1), the canvas, the batch size, the normalisation, the input and
      output signature, the platforms, and the lucid_jax and jax versions.
    """
    from lucid_jax import __version__

    path = Path(path)
    images, sizes = exported.in_avals[0], exported.in_avals[1]
    b, h, w, _ = images.shape
    batch = int(b) if isinstance(b, int) else "any"  # a symbolic dimension serves every batch size
    k = int(exported.out_avals[0].shape[1])
    meta = {
        "format": "jax.export",
        "call": 'jax.export.deserialize(bytearray(open(FILE, "rb").read())).call(images, image_sizes)',
        "class_names": list(class_names),
        "canvas": [int(h), int(w)],
        "batch_size": batch,
        "max_detections": k,
        "normalisation": {"mean": list(mean), "std": list(std), "input_range": "uint8 0..255, RGB"},
        "inputs": {
            "images": [batch, int(h), int(w), 3, str(images.dtype), "RGB, resized and padded onto the canvas"],
            "image_sizes": [batch, 2, str(sizes.dtype), "(height, width) of each image's content"],
        },
        "outputs": OUTPUT_SIGNATURE,
        "platforms": list(exported.platforms),
        "lucid_jax_version": __version__,
        "jax_version": jax.__version__,
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, bytes(exported.serialize()))
    write_atomically(str(path) + ".json", json.dumps(meta, indent=2))
    return meta


class Artifact:
    """A deserialized program whose :meth:`call` checks its inputs against the canvas first.

    Every other attribute is the ``jax.export.Exported``'s (``in_avals``, ``platforms``...).
    """

    def __init__(self, exported: jax.export.Exported, meta: dict):
        self.exported, self.meta = exported, meta

    def __getattr__(self, name: str):
        return getattr(self.exported, name)

    def call(self, images, image_sizes):
        """The program on ``images`` uint8 [B, H, W, 3] and ``image_sizes`` int32 [B, 2].

        Raises:
          ValueError: images not on the artifact's canvas (saying how to fit them), or
            a batch the artifact was not exported for.
        """
        h, w = self.meta["canvas"]
        shape, batch = tuple(np.shape(images)), self.meta["batch_size"]
        if len(shape) != 4 or shape[1:] != (h, w, 3):
            raise ValueError(
                f"this artifact takes images on its {h}x{w} canvas, uint8 [B, {h}, {w}, 3], got {list(shape)}: "
                f"resize each image so that it fits {h}x{w} with its aspect ratio kept, pad it right and below, "
                "and give its resized (height, width) in image_sizes; lucid_jax.serving.load(FILE) does all of that"
            )
        if batch != "any" and shape[0] != batch:
            raise ValueError(f"this artifact was exported for batch size {batch}, got {shape[0]} images")
        if tuple(np.shape(image_sizes)) != (shape[0], 2):
            raise ValueError(f"image_sizes must be int32 [{shape[0]}, 2], got {list(np.shape(image_sizes))}")
        return self.exported.call(images, image_sizes)


def read_artifact(path: str | os.PathLike) -> tuple[Artifact, dict]:
    """(the deserialized program, its JSON sidecar) of a file written by :func:`write_artifact`."""
    path = Path(path)
    meta_path = Path(str(path) + ".json")
    if not path.is_file():
        raise FileNotFoundError(f"no exported detector at {path}")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} has no {meta_path.name} beside it (written by lucid-jax export)")
    meta = json.loads(meta_path.read_text())
    return Artifact(jax.export.deserialize(bytearray(path.read_bytes())), meta), meta
