"""The export job: a trained run as one file that serves prediction without lucid_jax
(see :mod:`lucid_jax.export` for the calling contract)."""

import os
import time
from pathlib import Path
from typing import Any

from lucid_jax.export import PLATFORMS, export_prediction, write_artifact
from lucid_jax.jobs.config import JobError, TrainConfig, canvases
from lucid_jax.jobs.training import load_trained


def _square_canvas(config: TrainConfig) -> tuple[int, int]:
    """(S, S) of a run trained with ``--image-size S``.

    Raises:
      JobError: the run has SHORT:LONG canvases, which one artifact does not serve yet.
    """
    spec = canvases(config)
    if not spec.square_only:
        raise JobError(
            f"export of SHORT:LONG runs: not yet supported (this run has --image-size {spec}, "
            f"canvases {spec.describe()}); export a run trained with --image-size S"
        )
    return spec.shapes[0]


def export_checkpoint_onnx(
    checkpoint,
    out: str | os.PathLike,
    *,
    model_name: str | None = None,
    batch_size: int = 1,
    score_thresh: float | None = None,
) -> Path:
    """Export a run's prediction on its canvas as an ONNX graph (``out``) and ``out.json``.

    Needs jax2onnx (the ``onnx`` extra, installed as ``.ci/run`` does). The batch size is
    static (default 1); inputs and outputs are those of the jax.export artifact.
    """
    import json

    try:
        from lucid_jax.onnx_export import DEFAULT_OPSET, export_onnx
    except ImportError as e:
        raise JobError(f"--format onnx needs jax2onnx and onnx: {e}") from None
    out = Path(out)
    if out.is_dir():
        raise JobError(f"--out {out} is a folder; give a file name")
    model, variables, class_names, config = load_trained(checkpoint, model_name)
    canvas = _square_canvas(config)
    kwargs: dict[str, Any] = {} if score_thresh is None else {"score_thresh": score_thresh}
    try:
        export_onnx(model, variables, out, canvas=canvas, batch_size=batch_size, **kwargs)
    except ImportError as e:
        raise JobError(f"--format onnx needs jax2onnx (the onnx extra): {e}") from None
    meta = {
        "format": "onnx",
        "opset": DEFAULT_OPSET,
        "class_names": list(class_names),
        "canvas": list(canvas),
        "batch_size": batch_size,
        "model": config.model,
        "score_thresh": model.roi_heads.score_thresh if score_thresh is None else score_thresh,
        "inputs": {"images": "uint8 [B, H, W, 3] RGB on the canvas", "image_sizes": "int32 [B, 2]"},
        "outputs": ["boxes", "labels", "scores", "valid"],
    }
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=2))
    return out


def export_checkpoint(
    checkpoint,
    out: str | os.PathLike,
    *,
    model_name: str | None = None,
    batch_size: int | None = None,
    platforms=PLATFORMS,
    score_thresh: float | None = None,
) -> dict:
    """Export a run's prediction on its canvas as ``out`` (jax.export) and ``out.json``.

    Args:
      checkpoint: the ``--out`` of ``train``.
      out: the artifact's path.
      batch_size: a fixed batch size; None for a symbolic batch dimension (any B).
      platforms: lower for each of these ("cpu", "cuda", "tpu").
      score_thresh: the artifact's detection threshold (default: the model's, 0.05).

    Returns:
      The JSON sidecar's content, plus "bytes" (the artifact's size) and "seconds".
    """
    out = Path(out)
    if out.is_dir():
        raise JobError(f"--out {out} is a folder; give a file name")
    bad = sorted(set(platforms) - set(PLATFORMS))
    if bad or not platforms:
        raise JobError(f"--platforms must be among {', '.join(PLATFORMS)}, got {', '.join(platforms) or 'none'}")
    if batch_size is not None and batch_size < 1:
        raise JobError(f"--batch-size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    model, variables, class_names, config = load_trained(checkpoint, model_name)
    canvas = _square_canvas(config)
    kwargs = {} if score_thresh is None else {"score_thresh": score_thresh}
    exported = export_prediction(
        model,
        variables,
        canvas=canvas,
        batch_size=batch_size,
        platforms=tuple(platforms),
        **kwargs,
    )
    thresh = model.roi_heads.score_thresh if score_thresh is None else score_thresh
    meta = write_artifact(
        exported,
        out,
        class_names=class_names,
        extra={"model": config.model, "score_thresh": thresh, "checkpoint": str(checkpoint)},
    )
    return {**meta, "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - start, 1)}
