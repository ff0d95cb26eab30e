"""The predict job: detections on collections of image files, in each file's own pixels.

Paths may be files, folders (every image inside, recursively, in sorted order) or
glob patterns. Images are decoded on a thread pool a few batches ahead, fitted onto
their canvas of the run's ``--image-size`` (one square canvas for S; for SHORT:LONG
the landscape, portrait or square one, by the image's size) and predicted
``batch_size`` images of one canvas at a time, by one compiled program per canvas
(the last batch of each canvas is padded, so nothing recompiles). A file that
cannot be read is reported and skipped; the others still get their detections.

``detections.json`` lists one entry per image that was read, in input order::

    {"image": path, "height": H, "width": W, "detections_png": path or null,
     "detections": [{"box_xyxy": [x1, y1, x2, y2], "score": s, "label": l, "class": name}]}

With ``results``, the same detections are also written as a COCO results file.
"""

import collections
import glob
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lucid_jax import viz
from lucid_jax.data import DatasetError, load_image
from lucid_jax.data.canvases import Canvases
from lucid_jax.data.transforms import canvas_of
from lucid_jax.files import atomic_path, write_atomically
from lucid_jax.inference import canvas_detector, coco_rows
from lucid_jax.jobs.config import JobError, canvases, check_tiling, output_file, output_folder
from lucid_jax.jobs.state import load_trained
from lucid_jax.tiling import DEFAULT_OVERLAP, detect_tiled

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# A results file is scored by COCO's evaluation, which keeps low-scoring detections.
COCO_SCORE_THRESH = 0.05
SCORE_THRESH = 0.5


def default_score_thresh(results: bool) -> float:
    """0.05 when writing a COCO results file (COCO's convention), 0.5 otherwise."""
    return COCO_SCORE_THRESH if results else SCORE_THRESH


def expand_image_paths(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files, folders and glob patterns to a list of image paths, in order, each once.

    A folder gives its image files (by suffix, recursively, sorted); a pattern its
    sorted matches; a file itself (whatever its suffix, so that a bad file is
    reported rather than silently left out).

    Raises:
      JobError: a folder or pattern that matches no image, or a path that does not exist.
    """
    paths: list[Path] = []
    for spec in map(str, specs):
        if os.path.isdir(spec):
            found = sorted(p for p in Path(spec).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise JobError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder {spec}")
        elif glob.has_magic(spec):
            found = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if os.path.isfile(p)]
            if not found:
                raise JobError(f"no files match {spec}")
        elif os.path.exists(spec):
            found = [Path(spec)]
        else:
            raise JobError(f"no such file or folder: {spec}")
        paths.extend(found)
    return list(dict.fromkeys(paths))


def _coco_image_id(path: Path, index: int) -> int:
    """A COCO file name's number (000000397133.jpg -> 397133), else the 1-based position."""
    return int(path.stem) if path.stem.isdigit() else index + 1


@dataclass
class PredictReport:
    """What a predict run made: ``results`` (one dict per image read, as in
    ``detections.json``) and ``failures`` ((path, reason) of the files skipped)."""

    results: list[dict] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


def _load(path: Path) -> np.ndarray | str:
    try:
        return load_image(path)
    except (DatasetError, OSError) as e:
        return str(e)


def _decoded(paths: Sequence[Path], num_workers: int, ahead: int) -> Iterator[tuple[Path, np.ndarray | str]]:
    """(path, image or error message) in input order, decoding up to ``ahead`` files ahead."""
    if num_workers == 0:
        yield from ((p, _load(p)) for p in paths)
        return
    with ThreadPoolExecutor(num_workers) as pool:
        pending: collections.deque = collections.deque()
        todo = iter(paths)
        for path in todo:
            pending.append((path, pool.submit(_load, path)))
            if len(pending) >= ahead:
                break
        while pending:
            path, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_load, nxt)))
            yield path, future.result()


def predict_files(
    specs: Sequence[str | os.PathLike],
    checkpoint,
    out: str | os.PathLike,
    *,
    model_name: str | None = None,
    step: str | int = "latest",
    compute_dtype: str | None = None,
    max_detections: int | None = None,
    **kwargs,
) -> PredictReport:
    """Detect objects in image files with a trained run (see :func:`detect_files`).

    Args:
      specs: files, folders and glob patterns (see :func:`expand_image_paths`).
      checkpoint: the ``--out`` of ``train``; its canvases are the run's ``--image-size``.
      out: folder for ``detections.json`` (and the drawings).
      model_name: the architecture expected in the checkpoint, if given.
      step, compute_dtype, max_detections: the kept step, the dtype and the detections
        per image (see :func:`load_trained`).
      **kwargs: the options of :func:`detect_files`.

    Raises:
      JobError: ``out`` is a file, ``results`` a folder or in none, no image matches, a
        ``tile`` or ``overlap`` no tiling can use, or the checkpoint cannot be read (all
        before anything is written).
    """
    if kwargs.get("tile") is not None:
        check_tiling(kwargs["tile"], kwargs.get("overlap", DEFAULT_OVERLAP))
    out = output_folder(out)
    if kwargs.get("results") is not None:
        kwargs["results"] = output_file(kwargs["results"], "--results", folder_exists=True)
    paths = expand_image_paths(specs)
    model, variables, class_names, config = load_trained(
        checkpoint, model_name, step=step, compute_dtype=compute_dtype, max_detections=max_detections
    )
    return detect_files(model, variables, class_names, canvases(config), paths, out, **kwargs)


def detect_files(
    model,
    variables,
    class_names: Sequence[str],
    canvas: tuple[int, int] | Canvases,
    paths: Sequence[Path],
    out: str | os.PathLike,
    *,
    score_thresh: float | None = None,
    batch_size: int = 8,
    draw: bool = False,
    draw_max_side: int = 2048,
    results: str | os.PathLike | None = None,
    num_workers: int = 4,
    progress: bool = True,
    tile: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
) -> PredictReport:
    """Detect objects in image files with a model and its variables.

    Args:
      model, variables: the detector.
      class_names: its foreground classes (label l is ``class_names[l - 1]``).
      canvas: (height, width) every image is fitted onto (the largest size that
        fits), or the run's :class:`Canvases`: each image resized by their rule
        onto its own canvas, and batched with images of that canvas only.
      paths: image files.
      out: folder for ``detections.json`` (and the drawings).
      score_thresh: keep detections scoring at least this (default:
        :func:`default_score_thresh`).
      batch_size: images (with ``tile``: windows) per compiled call.
      draw: also write ``<stem>_detections.png`` per image.
      draw_max_side: the longest side of a drawing: larger images are drawn shrunk
        to it, boxes scaled with them (0: each at its own size). An 8000x6000
        photograph at its own size needs gigabytes to render.
      results: also write a COCO results file here (image ids from numeric file
        names, else 1-based positions; category ids are the labels 1..C-1).
      num_workers: decoding threads (0: decode in this thread). With ``tile`` each
        image is decoded in this thread when its turn comes, so that one decoded
        image is held at a time.
      progress: show a progress bar (images per second).
      tile: cut each image into windows of this many pixels at native resolution,
        fit each onto the canvas, and merge the boxes across windows
        (:func:`lucid_jax.tiling.detect_tiled`); None: each image whole.
      overlap: the share of a window shared with its neighbour, with ``tile``.

    Returns:
      A :class:`PredictReport`.
    """
    out = Path(out)
    thresh = default_score_thresh(results is not None) if score_thresh is None else score_thresh
    detect = canvas_detector(model, variables, canvas, batch_size, score_thresh=thresh)

    names = ["background", *class_names]
    out.mkdir(parents=True, exist_ok=True)
    report = PredictReport()
    position = {p: i for i, p in enumerate(paths)}
    done: dict[int, tuple[dict, list[dict]]] = {}  # input position: (detections.json entry, COCO results)

    def record(path: Path, image: np.ndarray, found: dict) -> None:
        boxes, scores, labels = found["boxes"], found["scores"], found["labels"]
        png = None
        if draw:
            png = out / (path.stem + "_detections.png")
            with atomic_path(png) as tmp:
                viz.save_detections(image, found, tmp, names, max_side=draw_max_side)
        coco = [] if results is None else coco_rows(_coco_image_id(path, position[path]), found)
        entry = {
            "image": str(path),
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
            "detections_png": None if png is None else str(png),
            "detections": [
                {
                    "box_xyxy": [round(float(v), 2) for v in b],
                    "score": round(float(s), 4),
                    "label": int(lab),
                    "class": class_names[int(lab) - 1],
                }
                for b, s, lab in zip(boxes, scores, labels, strict=True)
            ],
        }
        done[position[path]] = entry, coco

    def flush(batch: list[tuple[Path, np.ndarray]]) -> None:
        for (path, image), found in zip(batch, detect([image for _, image in batch]), strict=True):
            record(path, image, found)

    batches: dict[tuple[int, int], list] = {}  # canvas: the images waiting for a batch of it
    workers, ahead = (0, 0) if tile else (num_workers, 2 * batch_size)
    # closed on an error too, so that the error's line is not written after the bar's
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for path, image in _decoded(paths, workers, ahead=ahead):
            if isinstance(image, str):
                report.failures.append((str(path), image))
            elif tile:
                nms = model.roi_heads.nms_thresh
                record(path, image, detect_tiled(image, detect, tile, overlap, nms_thresh=nms, batch_size=batch_size))
            else:
                batch = batches.setdefault(canvas_of(image.shape[:2], canvas), [])
                batch.append((path, image))
                if len(batch) == batch_size:
                    flush(batch)
                    batch.clear()
            bar.update(1)
        for batch in batches.values():
            if batch:
                flush(batch)

    report.results = [done[i][0] for i in sorted(done)]  # input order, whatever the canvases
    write_atomically(out / "detections.json", json.dumps(report.results, indent=2))
    if results is not None:
        write_atomically(results, json.dumps([r for i in sorted(done) for r in done[i][1]]))
    return report
