"""A trained detector as an ONNX file, converted from :func:`lucid_jax.inference.serving_function`
with jax2onnx.

The graph takes what the ``jax.export`` artifact takes and returns what it returns::

    sess = onnxruntime.InferenceSession("detector.onnx")
    boxes, labels, scores, valid = sess.run(
        ["boxes", "labels", "scores", "valid"], {"images": images, "image_sizes": image_sizes})

  images       uint8 [B, H, W, 3]: RGB, resized and padded (bottom/right) onto the canvas
  image_sizes  int32 [B, 2]: (height, width) of each image's content on the canvas
  boxes        float32 [B, K, 4] xyxy canvas pixels; scores float32 [B, K];
  labels       int32 [B, K]; valid bool [B, K], sorted by score

Normalisation, the backbone, the RPN with its NMS, RoIAlign, the box head and the
per-class NMS are all in the graph, with the weights as initializers. The canvas and
the batch size are fixed. Both NMS stages run in their scatter-free formulation
(``FasterRCNN.predict``'s static ``nms_scatter_free=True``; ``lucid_jax.ops.nms``),
which keeps the same boxes.

jax2onnx is an optional dependency (the ``onnx`` extra, see docs/export.md).
"""

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp

from lucid_jax.files import atomic_path
from lucid_jax.inference import check_canvas, serving_function

INPUT_NAMES = ("images", "image_sizes")
# jax2onnx returns the output dict's leaves in sorted key order.
OUTPUT_NAMES = ("boxes", "labels", "scores", "valid")
DEFAULT_OPSET = 23


def export_onnx(
    model,
    variables: Mapping,
    path: str | os.PathLike,
    *,
    canvas: tuple[int, int],
    batch_size: int = 1,
    opset: int = DEFAULT_OPSET,
    **serving_kwargs,
) -> Path:
    """Write ``serving_function(model, variables)`` as an ONNX graph to ``path``.

    Args:
      model: the detector.
      variables: its ``{"params", "batch_stats"}``.
      path: the ``.onnx`` file to write, weights included (its folder is created;
        protobuf caps a file at 2 GiB, far above the ResNet-101 detector's size).
      canvas: (height, width), multiples of the backbone's ``size_divisibility``.
      batch_size: B, static.
      opset: the ONNX opset (23, jax2onnx's default, is the one tested).
      **serving_kwargs: ``mean``, ``std``, ``score_thresh``, ``nms_thresh``,
        ``max_detections`` for :func:`serving_function`.

    Returns:
      The path written. Inputs ``images`` uint8 [B, H, W, 3] and ``image_sizes``
      int32 [B, 2]; outputs ``boxes`` [B, K, 4], ``labels`` [B, K], ``scores``
      [B, K], ``valid`` [B, K], as the module docstring describes.

    Raises:
      ValueError: a canvas that is not a multiple of the backbone's stride, or a
        batch size below 1.
      ImportError: jax2onnx is not installed.
    """
    h, w = check_canvas(model, canvas, batch_size)
    try:
        import onnx
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ImportError("ONNX export needs jax2onnx and onnx: see the onnx extra in docs/export.md") from e

    serve = serving_function(model, variables, nms_scatter_free=True, **serving_kwargs)
    specs = [jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.uint8), jax.ShapeDtypeStruct((batch_size, 2), jnp.int32)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # jax2onnx logs a traceback for each optional plugin whose library (equinox,
    # dm-pix) is not installed; none of them is needed here.
    plugin_log = logging.getLogger("jax2onnx.plugins.plugin_system")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        proto = to_onnx(
            serve,
            specs,
            model_name="lucid_jax_detector",
            opset=opset,
            return_mode="proto",
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
        )
    finally:
        plugin_log.setLevel(level)
    # One self-contained file (jax2onnx's own file mode puts the weights beside it).
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path
