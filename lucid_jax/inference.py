"""Prediction, in one place: the compiled predict function, the uint8 serving function,
and the host-side mapping of canvas detections back to each image's pixels.

As torchvision's ``GeneralizedRCNNTransform`` owns pre- and post-processing beside
the model, this module owns them beside ``FasterRCNN.predict``:

    images (uint8, any size) --fit onto a canvas--> serving function (jit: normalise,
    zero the padding, predict) --> canvas detections --to_image_pixels--> file pixels

Everything that runs a trained detector uses it: the predict, eval and export jobs,
``serving``, ``export`` and ``onnx_export``, the seed example and the benchmarks.
The mapping and the COCO rows run on the host, outside jit, on NumPy arrays.
"""

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lucid_jax.data.boxes import xywh
from lucid_jax.data.coco_format import coco_ids, detection_list
from lucid_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# XLA:CPU's default scheduler orders a program for concurrency and keeps about twice
# the temporaries of its memory-minimising order; fewer fresh pages per call also make
# the step and prediction faster (docs/benchmarks.md has the figures). Other backends
# schedule their own way and get no options.
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(mesh: Mesh | None = None) -> dict:
    """The XLA options the jitted step and prediction compile with on ``mesh``'s
    platform (the default backend's without a mesh): :data:`CPU_COMPILER_OPTIONS` on CPU."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" else {}


def make_predict_fn(model, **predict_kwargs) -> Callable:
    """``predict(variables, images, image_sizes) -> detections``, jit-compiled once per shape.

    Args:
      model: the detector.
      **predict_kwargs: keywords of ``FasterRCNN.predict``: ``score_thresh``,
        ``nms_thresh``, ``max_detections``, and ``channels_last=True`` for the
        Loader's ``[B, H, W, 3]`` batches.

    Returns:
      A function of variables, images [B, 3, H, W] (or [B, H, W, 3] with
      ``channels_last``) and image_sizes [B, 2] (or None) returning
      ``{"boxes": [B, K, 4], "scores", "labels", "valid": [B, K]}``.
    """
    return jax.jit(
        lambda variables, images, image_sizes: model.apply(
            variables, images, image_sizes, method="predict", **predict_kwargs
        ),
        compiler_options=compiler_options(),
    )


def check_canvas(model, canvas: Sequence[int], batch_size: int | None) -> tuple[int, int]:
    """The canvas as ints, checked against the backbone's stride; raise ValueError otherwise.

    Args:
      model: the detector (its ``backbone.size_divisibility``).
      canvas: (height, width).
      batch_size: None (any) or B >= 1.
    """
    multiple = model.backbone.size_divisibility
    h, w = (int(c) for c in canvas)
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise ValueError(f"canvas must be positive multiples of {multiple}, got {tuple(canvas)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return h, w


def uint8_predict_fn(
    model, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, **predict_kwargs
) -> Callable:
    """``predict(variables, images, image_sizes) -> detections`` on uint8 canvases.

    The images stay channels-last from the file to the model's first convolution.

    Args:
      model: the detector.
      mean, std: the normalisation of [0, 1] RGB that training used.
      **predict_kwargs: ``score_thresh``, ``nms_thresh``, ``max_detections``,
        ``nms_scatter_free`` (see ``FasterRCNN.predict``).

    Returns:
      A function of variables, images uint8 [B, H, W, 3] and image_sizes int
      [B, 2] returning ``{"boxes": [B, K, 4], "scores": [B, K], "labels": [B, K],
      "valid": [B, K]}``. Pixels outside each image's size are set to 0 after
      normalisation, as ``lucid_jax.data.preprocess`` pads.
    """
    mean_ = jnp.asarray(mean, jnp.float32)
    std_ = jnp.asarray(std, jnp.float32)

    def predict(variables: Mapping, images: jax.Array, image_sizes: jax.Array) -> dict:
        _, h, w, _ = images.shape
        sizes = image_sizes.astype(jnp.float32)  # [B, 2]
        x = (images.astype(jnp.float32) / 255.0 - mean_) / std_  # [B, H, W, 3]
        rows = jnp.arange(h, dtype=jnp.float32)[None, :, None] < sizes[:, 0, None, None]  # [B, H, 1]
        cols = jnp.arange(w, dtype=jnp.float32)[None, None, :] < sizes[:, 1, None, None]  # [B, 1, W]
        x = jnp.where((rows & cols)[..., None], x, 0.0)
        return model.apply(variables, x, sizes, method="predict", channels_last=True, **predict_kwargs)

    return predict


def serving_function(model, variables: Mapping, **kwargs) -> Callable:
    """:func:`uint8_predict_fn` with the weights closed over: ``serve(images, image_sizes)``."""
    predict = uint8_predict_fn(model, **kwargs)
    return lambda images, image_sizes: predict(variables, images, image_sizes)


# --- on the host: canvas detections to each image's pixels -----------------------


def to_image_pixels(boxes: np.ndarray, scale: Sequence[float], image_hw: Sequence[float]) -> np.ndarray:
    """Boxes on a canvas mapped back to their image's pixels, clipped to the image.

    Args:
      boxes: [K, 4] xyxy canvas pixels.
      scale: (sy, sx), the resize factor from the image to the canvas.
      image_hw: (height, width) of the image.

    Returns:
      [K, 4] float32 xyxy in the image's pixels, inside [0, width] x [0, height].
    """
    sy, sx = (float(s) for s in scale)
    h, w = (float(s) for s in image_hw)
    out = np.asarray(boxes, np.float32).reshape(-1, 4) / np.array([sx, sy, sx, sy], np.float32)
    return np.clip(out, 0.0, np.array([w, h, w, h], np.float32))


def image_detections(
    detections: Mapping, row: int, scale: Sequence[float], image_hw: Sequence[float], score_thresh: float = 0.0
) -> dict:
    """One image's real detections from a padded batch, in its own pixels.

    Args:
      detections: the padded predictions (NumPy), ``{"boxes": [B, K, 4] canvas
        pixels, "scores": [B, K], "labels": [B, K], "valid": [B, K]}``.
      row: the image's row in the batch.
      scale: (sy, sx) image-to-canvas factor; image_hw: the image's (height, width).
      score_thresh: also drop detections scoring below this.

    Returns:
      {"boxes": [N, 4] float32 xyxy clipped to the image, "scores": [N] float32,
      "labels": [N] int32}, in the order of the batch (by decreasing score).
    """
    labels = np.asarray(detections["labels"][row])
    scores = np.asarray(detections["scores"][row], np.float32)
    keep = np.asarray(detections["valid"][row], bool) & (labels > 0) & (scores >= score_thresh)
    return {
        "boxes": to_image_pixels(np.asarray(detections["boxes"][row])[keep], scale, image_hw),
        "scores": scores[keep],
        "labels": labels[keep].astype(np.int32),
    }


def detect_on_canvases(
    call: Callable[[tuple[int, int], np.ndarray, np.ndarray], Mapping],
    images: Sequence[np.ndarray],
    canvases,
    batch_size: int,
    score_thresh: float = 0.0,
) -> list[dict]:
    """Detections in uint8 images of any sizes, each fitted onto its canvas, a batch at a time.

    Images of one canvas are batched together (the last batch padded) and the boxes
    mapped back to each image's pixels: what the predict job, the tiled prediction and
    :mod:`lucid_jax.serving` share.

    Args:
      call: ``call(canvas, images uint8 [B, Hc, Wc, 3], image_sizes int32 [B, 2])`` returns
        the padded detections of one batch on that canvas (NumPy or JAX).
      images: uint8 [H_i, W_i, 3] RGB arrays (views are fine: each is copied onto its canvas).
      canvases: the run's :class:`~lucid_jax.data.canvases.Canvases`, or one (height,
        width) canvas (see :func:`~lucid_jax.data.transforms.fit_to_canvases`).
      batch_size: images per call.
      score_thresh: also drop detections scoring below this.

    Returns:
      One :func:`image_detections` dict per image, in input order.
    """
    from lucid_jax.data.transforms import fit_to_canvases

    by_canvas: dict[tuple[int, int], list] = {}
    for i, image in enumerate(images):
        canvas, *fitted = fit_to_canvases(np.asarray(image), canvases)
        by_canvas.setdefault(canvas, []).append((i, *fitted))
    out: dict[int, dict] = {}
    for canvas, members in by_canvas.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            batch = np.zeros((batch_size, *canvas, 3), np.uint8)
            sizes = np.tile(np.array(canvas, np.int32), (batch_size, 1))  # padding rows: any valid size
            for row, (_, fitted, size, _) in enumerate(chunk):
                batch[row], sizes[row] = fitted, size
            dets = {k: np.asarray(v) for k, v in call(canvas, batch, sizes).items()}
            for row, (index, _, _, scale) in enumerate(chunk):
                out[index] = image_detections(dets, row, scale, np.shape(images[index])[:2], score_thresh)
    return [out[i] for i in range(len(images))]


def canvas_detector(model, variables: Mapping, canvases, batch_size: int, **predict_kwargs) -> Callable:
    """``detect(images) -> detections``: :func:`detect_on_canvases` with the model's
    compiled uint8 prediction (compiled once per canvas), for the predict and eval jobs.

    Args:
      model, variables: the detector.
      canvases: the run's :class:`~lucid_jax.data.canvases.Canvases`, or one (height, width).
      batch_size: images per compiled call.
      **predict_kwargs: ``score_thresh`` and the other keywords of :func:`uint8_predict_fn`.

    Returns:
      A function of a list of uint8 [H_i, W_i, 3] images returning one
      :func:`image_detections` dict per image.
    """
    predict = jax.jit(uint8_predict_fn(model, **predict_kwargs), compiler_options=compiler_options())

    def detect(images: Sequence[np.ndarray]) -> list[dict]:
        return detect_on_canvases(
            lambda canvas, batch, sizes: jax.device_get(predict(variables, batch, sizes)), images, canvases, batch_size
        )

    return detect


def unpad_detections(predictions, batch) -> list[dict]:
    """A Loader batch's padded predictions as per-image detections in original pixels.

    Undoes :func:`lucid_jax.data.preprocess`'s resize (``scales``) and drops
    background, invalid and padding rows, so the output feeds
    ``lucid_jax.evaluation.evaluate_dataset`` and :func:`coco_results`.

    Args:
      predictions: ``{"boxes": [B, K, 4] canvas pixels, "scores": [B, K], "labels":
        [B, K], "valid": [B, K]}`` (NumPy or JAX).
      batch: the loader's batch, for ``scales [B, 2]`` (sy, sx), ``image_sizes [B, 2]``
        and ``image_valid [B]``; evaluation batches must not be flipped.

    Returns:
      One dict per real image, in batch order, as :func:`image_detections`; the
      image's size is its size on the canvas divided by its scale (up to the
      resize's rounding).
    """
    dets = {k: np.asarray(predictions[k]) for k in ("boxes", "scores", "labels")}
    b = dets["boxes"].shape[0]
    dets["valid"] = np.asarray(predictions.get("valid", np.ones(dets["labels"].shape, bool)), bool)
    scales = np.asarray(batch.get("scales", np.ones((b, 2))), np.float32)
    sizes = np.asarray(batch["image_sizes"], np.float32)
    image_valid = np.asarray(batch.get("image_valid", np.ones(b, bool)), bool)
    return [image_detections(dets, i, scales[i], sizes[i] / scales[i]) for i in range(b) if image_valid[i]]


def coco_rows(image_id: int, detections: Mapping, category_ids: Mapping[int, int] | None = None) -> list[dict]:
    """One image's detections as COCO result records.

    Args:
      image_id: the image's COCO id.
      detections: {"boxes": [N, 4] xyxy in the image's pixels, "scores": [N], "labels": [N]}.
      category_ids: label -> category id (default: the label itself).

    Returns:
      [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}], in the given order.
    """
    ids = category_ids or {}
    return [
        {"image_id": image_id, "category_id": ids.get(int(label), int(label)), "bbox": box, "score": float(score)}
        for box, score, label in zip(xywh(detections["boxes"]), detections["scores"], detections["labels"])
    ]


def coco_results(dataset, detections) -> list[dict]:
    """Detections in COCO's results format, with the ids of ``coco_ground_truth``.

    Args:
      dataset: a dataset with ``class_names`` (COCO, VOC, shapes, ...).
      detections: per-image detections in original pixels (see
        ``lucid_jax.data.coco_format``).

    Returns:
      [{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}, ...],
      image by image in dataset order, each image's detections in their given order.
    """
    image_ids, cat_ids = coco_ids(dataset)
    dets = detection_list(detections, len(dataset), len(dataset.class_names))
    return [row for i, det in enumerate(dets) for row in coco_rows(image_ids[i], det, cat_ids)]
