"""The predict job: detections on image files, drawn as PNGs and listed in JSON in
each file's own pixels."""

import json
import os
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from lucid_jax import viz
from lucid_jax.data import load_image, preprocess
from lucid_jax.jobs.training import load_trained
from lucid_jax.train import make_predict_fn


def predict_files(paths: Sequence[str | os.PathLike], checkpoint, out: str | os.PathLike, *,
                  model_name: str | None = None, score_thresh: float = 0.5) -> list[dict]:
    """Detect objects in image files with a trained run; write PNGs and ``out/detections.json``.

    Every image is read before anything is written, so an unreadable file fails
    with nothing on disk.

    Returns:
      One dict per image: {"image", "detections_png", "detections": [{"box_xyxy"
      (the file's pixels), "score", "label", "class"}]}.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder")
    images = [load_image(p) for p in paths]
    model, variables, class_names, config = load_trained(checkpoint, model_name)
    out.mkdir(parents=True, exist_ok=True)
    predict = make_predict_fn(model, score_thresh=score_thresh)
    results = []
    for path, image in zip(paths, images):
        ex = preprocess({"image": image, "boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int32)},
                        canvas=config.image_size, longer_side=config.image_size,
                        size_divisibility=model.backbone.size_divisibility)
        dets = jax.device_get(predict(variables, ex["image"][None], ex["image_size"][None]))
        sy, sx = ex["scale"]
        keep = dets["valid"][0]
        boxes = dets["boxes"][0][keep] / np.array([sx, sy, sx, sy], np.float32)  # back to the file's pixels
        scores, labels = dets["scores"][0][keep], dets["labels"][0][keep]
        png = out / (Path(path).stem + "_detections.png")
        viz.save_detections(image, {"boxes": boxes, "scores": scores, "labels": labels}, png, ["background", *class_names])
        results.append({
            "image": str(path),
            "detections_png": str(png),
            "detections": [
                {"box_xyxy": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": int(l),
                 "class": class_names[int(l) - 1]}
                for b, s, l in zip(boxes, scores, labels)
            ],
        })
    (out / "detections.json").write_text(json.dumps(results, indent=2))
    return results
