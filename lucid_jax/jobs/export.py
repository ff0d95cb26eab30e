"""The export job: a trained run as files that serve prediction without lucid_jax, one
per canvas (see :mod:`lucid_jax.export` for the calling contract)."""

import json
import os
import time
from pathlib import Path
from typing import Any

from lucid_jax.data.canvases import ORIENTATIONS, Canvases
from lucid_jax.export import PLATFORMS, export_prediction, write_artifact
from lucid_jax.files import write_atomically
from lucid_jax.jobs.config import JobError, canvases, output_file
from lucid_jax.jobs.state import load_trained


def canvas_files(out: Path, spec: Canvases) -> dict[tuple[int, int], Path]:
    """Where each canvas's file goes.

    A run trained with ``--image-size S`` has one canvas, written to ``out`` itself.
    A ``SHORT:LONG`` run has three, written beside it as ``STEM.HxW.SUFFIX`` (e.g.
    ``detector.800x1344.jax``), with ``out.json`` as their index.
    """
    if spec.square_only:
        return {spec.shapes[0]: out}
    return {(h, w): out.with_name(f"{out.stem}.{h}x{w}{out.suffix}") for h, w in spec.shapes}


def write_index(out: Path, spec: Canvases, files: dict[tuple[int, int], Path], common: dict) -> dict:
    """``out.json`` of a SHORT:LONG export: the resize rule and which file serves which canvas.

    An image of size (h, w) after EXIF rotation goes on canvas
    ``Canvases(short, long, multiple, band).canvas_index(h, w)``: landscape when
    ``w > band * h``, portrait when ``h > band * w``, square otherwise; it is
    resized to ``resized_shape(h, w)`` (shorter side to SHORT, longer at most LONG,
    and never past its canvas) and padded right and below.
    """
    index = {
        **common,
        "image_size": str(spec),
        "resize": {"short": spec.short, "long": spec.long, "multiple": spec.multiple, "band": spec.band},
        "canvases": [
            {"canvas": [h, w], "orientation": name, "file": files[(h, w)].name}
            for (h, w), name in zip(spec.shapes, ORIENTATIONS, strict=True)
        ],
    }
    write_atomically(str(out) + ".json", json.dumps(index, indent=2))
    return index


def _trained_for_export(checkpoint, out: str | os.PathLike, model_name: str | None, **selection):
    """The run to export and where each canvas's file goes, ``out`` checked before the checkpoint is read.

    Args:
      checkpoint: the ``--out`` of ``train``.
      out: the artifact's path (see :func:`canvas_files`).
      model_name: the architecture expected in the checkpoint, if given.
      **selection: ``step``, ``compute_dtype`` and ``max_detections`` of :func:`load_trained`.

    Returns:
      (model, variables, class names, config, canvases, {canvas: file}).

    Raises:
      JobError: ``out`` is a folder, or the checkpoint cannot be read.
    """
    files_at = output_file(out)
    model, variables, class_names, config = load_trained(checkpoint, model_name, **selection)
    spec = canvases(config)
    return model, variables, class_names, config, spec, canvas_files(files_at, spec)


def export_checkpoint_onnx(
    checkpoint,
    out: str | os.PathLike,
    *,
    model_name: str | None = None,
    batch_size: int = 1,
    score_thresh: float | None = None,
    step: str | int = "latest",
    compute_dtype: str | None = None,
    max_detections: int | None = None,
) -> list[Path]:
    """Export a run's prediction as ONNX graphs, one per canvas (see :func:`canvas_files`).

    Needs jax2onnx (the ``onnx`` extra, installed as ``.ci/run`` does). The batch size is
    static (default 1); inputs and outputs are those of the jax.export artifact. Each
    file gets its own ``.json``; a SHORT:LONG run also gets the index ``out.json``.

    Args:
      checkpoint: the ``--out`` of ``train``.
      out: the graph's path.
      model_name: the architecture expected in the checkpoint, if given.
      batch_size: B, static (>= 1).
      score_thresh: the graph's detection threshold (default: the model's, 0.05).
      step, compute_dtype, max_detections: the kept step, the dtype and the detections
        per image (see :func:`load_trained`).

    Returns:
      The files written, one per canvas.

    Raises:
      JobError: jax2onnx is missing, ``out`` is a folder, or the checkpoint cannot be read.
    """
    try:
        from lucid_jax.onnx_export import DEFAULT_OPSET, export_onnx
    except ImportError as e:
        raise JobError(f"--format onnx needs jax2onnx and onnx: {e}") from None
    model, variables, class_names, config, spec, files = _trained_for_export(
        checkpoint, out, model_name, step=step, compute_dtype=compute_dtype, max_detections=max_detections
    )
    kwargs: dict[str, Any] = {} if score_thresh is None else {"score_thresh": score_thresh}
    common = {
        "format": "onnx",
        "opset": DEFAULT_OPSET,
        "class_names": list(class_names),
        "batch_size": batch_size,
        "model": config.model,
        "score_thresh": model.roi_heads.score_thresh if score_thresh is None else score_thresh,
        "max_detections": model.roi_heads.detections_per_img,
        "nms_thresh": model.roi_heads.nms_thresh,
        "inputs": {"images": "uint8 [B, H, W, 3] RGB on the canvas", "image_sizes": "int32 [B, 2]"},
        "outputs": ["boxes", "labels", "scores", "valid"],
    }
    for canvas, path in files.items():
        try:
            export_onnx(model, variables, path, canvas=canvas, batch_size=batch_size, **kwargs)
        except ImportError as e:
            raise JobError(f"--format onnx needs jax2onnx (the onnx extra): {e}") from None
        write_atomically(str(path) + ".json", json.dumps({**common, "canvas": list(canvas)}, indent=2))
    if not spec.square_only:
        write_index(Path(out), spec, files, common)
    return list(files.values())


def export_checkpoint(
    checkpoint,
    out: str | os.PathLike,
    *,
    model_name: str | None = None,
    batch_size: int | None = None,
    platforms=PLATFORMS,
    score_thresh: float | None = None,
    step: str | int = "latest",
    compute_dtype: str | None = None,
    max_detections: int | None = None,
) -> dict:
    """Export a run's prediction on its canvas as ``out`` (jax.export) and ``out.json``.

    Args:
      checkpoint: the ``--out`` of ``train``.
      out: the artifact's path.
      model_name: the architecture expected in the checkpoint, if given.
      batch_size: a fixed batch size (>= 1); None for a symbolic batch dimension (any B).
      platforms: lower for each of these (any of "cpu", "cuda", "tpu").
      score_thresh: the artifact's detection threshold (default: the model's, 0.05).
      step, compute_dtype, max_detections: the kept step, the dtype and the detections
        per image (see :func:`load_trained`).

    A run trained with ``--image-size S`` gives one artifact, ``out``. A SHORT:LONG
    run gives one artifact per canvas (landscape, portrait, square), each a complete
    artifact with its own ``.json``, named by :func:`canvas_files`, and the index
    ``out.json`` that says which canvas an image goes on.

    Returns:
      The JSON sidecar's content (of ``out``, or the index), plus "files" (the
      artifacts written), "bytes" (their total size) and "seconds".

    Raises:
      JobError: ``out`` is a folder, or the checkpoint cannot be read.
    """
    start = time.perf_counter()
    model, variables, class_names, config, spec, files = _trained_for_export(
        checkpoint, out, model_name, step=step, compute_dtype=compute_dtype, max_detections=max_detections
    )
    kwargs = {} if score_thresh is None else {"score_thresh": score_thresh}
    thresh = model.roi_heads.score_thresh if score_thresh is None else score_thresh
    extra = {
        "model": config.model,
        "score_thresh": thresh,
        "nms_thresh": model.roi_heads.nms_thresh,
        "checkpoint": str(checkpoint),
        "step": str(step),
        "compute_dtype": compute_dtype or config.compute_dtype,
        "image_size": str(spec),
    }
    metas = {}
    for canvas, path in files.items():
        exported = export_prediction(
            model, variables, canvas=canvas, batch_size=batch_size, platforms=tuple(platforms), **kwargs
        )
        metas[canvas] = write_artifact(exported, path, class_names=class_names, extra=extra)
    meta = next(iter(metas.values()))
    if not spec.square_only:
        common = {k: v for k, v in meta.items() if k not in ("canvas", "inputs")}
        meta = write_index(Path(out), spec, files, {**common, "format": "jax.export canvases"})
    return {
        **meta,
        "files": [str(p) for p in files.values()],
        "bytes": sum(p.stat().st_size for p in files.values()),
        "seconds": round(time.perf_counter() - start, 1),
    }
