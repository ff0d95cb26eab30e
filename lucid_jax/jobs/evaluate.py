"""Evaluation jobs: a trained detector's metrics on a dataset, and a few predictions to draw."""

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from lucid_jax import distributed
from lucid_jax.data import Loader, model_inputs, preprocess_on_canvas
from lucid_jax.data.canvases import Canvases
from lucid_jax.data.coco_format import coco_ground_truth
from lucid_jax.evaluation import evaluate_dataset
from lucid_jax.files import write_atomically
from lucid_jax.inference import canvas_detector, coco_results, make_predict_fn, unpad_detections
from lucid_jax.jobs.config import JobError, TrainConfig, canvases, check_tiling, output_file
from lucid_jax.jobs.data import make_loader, open_dataset
from lucid_jax.jobs.state import load_trained
from lucid_jax.tiling import DEFAULT_OVERLAP, detect_tiled


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str,
    *,
    split: str = "val",
    model_name: str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    results: str | os.PathLike | None = None,
    ground_truth: str | os.PathLike | None = None,
    step: str | int = "latest",
    compute_dtype: str | None = None,
    max_detections: int | None = None,
    tile: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
) -> dict | None:
    """The eval job: a trained run's metrics on a dataset (see :func:`evaluate`).

    The output paths are checked before anything is loaded; the data's classes must
    be the checkpoint's, in its order.

    Args:
      checkpoint: the ``--out`` of ``train``.
      data: the ``--data`` spec (see :func:`lucid_jax.jobs.open_dataset`).
      split: the split to score.
      model_name: the architecture expected in the checkpoint, if given.
      batch_size: images per predict call (default: the run's); the metrics do not depend on it.
      progress: show a progress bar.
      results, ground_truth: COCO files to write (see :func:`evaluate`); their folders must exist.
      step, compute_dtype, max_detections: the kept step, the dtype and the detections
        per image (see :func:`load_trained`); COCO counts up to ``max_detections`` per
        image (COCOeval's ``maxDets`` 1, 10, K where K > 100).
      tile, overlap: score tiled prediction instead (see :func:`evaluate_tiled`).

    Returns:
      :func:`evaluate`'s metrics on process 0; None on the others.

    Raises:
      JobError: an output path that is a folder or in no folder, an unreadable
        checkpoint or dataset, classes that differ from the checkpoint's, or
        ``tile`` under several processes.
    """
    if tile is not None:
        check_tiling(tile, overlap)
        if jax.process_count() > 1:
            raise JobError("eval --tile runs in one process; run it without --coordinator")
    results = None if results is None else output_file(results, "--results", folder_exists=True)
    ground_truth = None if ground_truth is None else output_file(ground_truth, "--ground-truth", folder_exists=True)
    model, variables, class_names, config = load_trained(
        checkpoint, model_name, step=step, compute_dtype=compute_dtype, max_detections=max_detections
    )
    dataset = open_dataset(
        data,
        split,
        shapes_examples=config.shapes_train_examples,
        image_size=config.image_size,
        class_names=class_names,
    )
    unknown = sorted(set(dataset.class_names) - set(class_names))
    if unknown:
        raise JobError(f"the data has classes the checkpoint was not trained on: {', '.join(unknown)}")
    if list(dataset.class_names) != list(class_names):
        raise JobError(f"the data's classes {list(dataset.class_names)} differ from the checkpoint's {class_names}")
    if batch_size:
        config = dataclasses.replace(config, batch_size=batch_size)
    if tile is not None:
        return evaluate_tiled(
            model,
            variables,
            dataset,
            config,
            tile=tile,
            overlap=overlap,
            progress=progress,
            results=results,
            ground_truth=ground_truth,
        )
    return evaluate(model, variables, dataset, config, progress=progress, results=results, ground_truth=ground_truth)


def evaluate_tiled(
    model,
    variables,
    dataset,
    config: TrainConfig,
    *,
    tile: int,
    overlap: float = DEFAULT_OVERLAP,
    progress: bool = True,
    results: str | os.PathLike | None = None,
    ground_truth: str | os.PathLike | None = None,
) -> dict:
    """:func:`evaluate` of tiled prediction: each image decoded at its own size, cut into
    windows of ``tile`` pixels (``overlap`` shared with each neighbour), the windows
    fitted onto the run's canvases ``config.batch_size`` at a time, and their boxes
    merged (:func:`lucid_jax.tiling.detect_tiled`), at the model's score threshold.

    A tiled image may hold more detections than one window returns, so COCO counts
    up to the most any image has (COCOeval's ``maxDets`` 1, 10, K; ``coco_max_dets``).

    Returns:
      ``evaluate_dataset``'s dict, plus "tile" and "overlap".
    """
    detect = canvas_detector(model, variables, canvases(config), config.batch_size)
    detections = []
    for i in tqdm(range(len(dataset)), desc="eval (tiled)", unit="img", disable=not progress, dynamic_ncols=True):
        image = dataset[i]["image"]
        nms = model.roi_heads.nms_thresh
        detections.append(detect_tiled(image, detect, tile, overlap, nms_thresh=nms, batch_size=config.batch_size))
    metrics = evaluate_dataset(dataset, detections)
    metrics.update(tile=int(tile), overlap=float(overlap))
    if results is not None:
        write_atomically(results, json.dumps(coco_results(dataset, detections)))
    if ground_truth is not None:
        write_atomically(ground_truth, json.dumps(coco_ground_truth(dataset)))
    return metrics


def evaluate(
    model,
    variables,
    dataset,
    config: TrainConfig,
    *,
    progress: bool = True,
    results: str | os.PathLike | None = None,
    ground_truth: str | os.PathLike | None = None,
    spec: Canvases | None = None,
    loader: Loader | None = None,
    predict: Callable | None = None,
    on_batch: Callable[[int, dict], None] | None = None,
) -> dict | None:
    """COCO AP, AP50, AP75, per-class AP and VOC AP50 against every annotated object.

    Predictions are mapped back to each image's own pixels and scored against the
    dataset's annotations, not the padded training targets, so ``max_boxes``
    plays no part. COCO numbers are pycocotools' COCOeval (on the original
    annotation file for COCO data).

    With ``--image-size SHORT:LONG`` the images are batched by canvas, in dataset
    order of each batch's first image, every canvas's last batch padded: images
    [B, 3, Hc, Wc], one compiled prediction per canvas. Each image's detections
    depend on its canvas alone, so the metrics do not depend on the batch size.

    Under ``jax.distributed`` every process calls this with the same arguments:
    each predicts its own slice of every batch (``config.batch_size`` images per
    process), the padded predictions are gathered once at the end, and process 0
    scores them, so the metrics equal a single process's.

    Args:
      results: write the detections here in COCO results format (the file's own
        image and category ids for COCO, synthetic ones otherwise).
      ground_truth: write the matching COCO ground truth here (VOC difficult
        objects as ``iscrowd: 1``, which COCOeval ignores).
      spec: the run's canvases, where the caller has them (default: ``canvases(config)``).
      loader: the dataset's evaluation loader, where the caller keeps one (validation
        during training; default: a new one, in order, padded).
      predict: the compiled prediction, where the caller keeps one (default: a new
        ``make_predict_fn``, which compiles on its first call for each canvas).
      on_batch: called as ``on_batch(step, batch)`` after each batch is predicted (the
        validation loss reads the same batches).

    Returns:
      On process 0, ``evaluate_dataset``'s dict: AP, AP50, AP75, per_class_AP,
      voc_AP50_11pt, voc_AP50_all, num_ground_truth, ..., counting up to the model's
      ``detections_per_img`` per image (``coco_max_dets``); None on the others.
    """
    if loader is None:
        loader = make_loader(
            dataset,
            config,
            train=False,
            max_boxes=1,
            batch_size=config.batch_size,
            num_shards=jax.process_count(),
            shard_index=jax.process_index(),
            spec=spec,
        )
    predict = make_predict_fn(model, channels_last=True) if predict is None else predict
    progress = progress and distributed.is_primary()
    local = []  # per step: this process's padded predictions and what unpadding them needs
    for step, batch in enumerate(
        tqdm(loader.epoch(0), total=len(loader), desc="eval", disable=not progress, dynamic_ncols=True)
    ):
        inputs = model_inputs(batch, ("images", "image_sizes"))
        predictions = jax.device_get(predict(variables, inputs["images"], inputs["image_sizes"]))
        indices = loader.batch_indices(step)[1]
        local.append(
            {
                **predictions,
                **{k: batch[k] for k in ("image_sizes", "scales", "image_valid")},
                "index": np.array(indices + [-1] * (loader.batch_size - len(indices))),
            }
        )
        if on_batch is not None:
            on_batch(step, batch)
    # [P, steps, B, ...]: every process's steps, gathered in one collective
    gathered = distributed.gather({k: np.stack([b[k] for b in local]) for k in local[0]})
    if not distributed.is_primary():
        return None
    by_index: dict[int, dict] = {}
    for process_steps in zip(*(gathered[k] for k in gathered)):
        for arrays in zip(*process_steps):
            part = dict(zip(gathered, arrays))
            real = part["index"][part["image_valid"]]
            by_index.update(zip(real.tolist(), unpad_detections(part, part)))
    detections = [by_index[i] for i in range(len(dataset))]
    metrics = evaluate_dataset(dataset, detections, max_detections=model.roi_heads.detections_per_img)
    if results is not None:
        write_atomically(results, json.dumps(coco_results(dataset, detections)))
    if ground_truth is not None:
        write_atomically(ground_truth, json.dumps(coco_ground_truth(dataset)))
    return metrics


def predictions_on(
    model, variables, dataset, config: TrainConfig, indices: Sequence[int], *, spec: Canvases | None = None
):
    """(normalised images [N, H, W, 3], predictions, targets) for a few examples to draw.

    Each image is resized as on its canvas; on SHORT:LONG canvases they are padded
    further, right and below, to one (H, W) that holds them all (the largest sides).

    Args:
      model, variables: the detector.
      dataset: the examples.
      config: the run's settings.
      indices: the examples to predict.
      spec: the run's canvases, where the caller has them (default: ``canvases(config)``).

    Returns:
      (images, predictions, the preprocessed examples).
    """
    spec = canvases(config) if spec is None else spec
    examples = [
        preprocess_on_canvas(dataset[i], canvases=spec, size_divisibility=model.backbone.size_divisibility)
        for i in indices
    ]
    height = max(e["image"].shape[0] for e in examples)
    width = max(e["image"].shape[1] for e in examples)
    images = np.stack(
        [
            np.pad(e["image"], ((0, height - e["image"].shape[0]), (0, width - e["image"].shape[1]), (0, 0)))
            for e in examples
        ]
    )
    sizes = np.stack([e["image_size"] for e in examples])
    return images, jax.device_get(make_predict_fn(model, channels_last=True)(variables, images, sizes)), examples
