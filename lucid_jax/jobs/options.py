"""The settings of the jobs that use a trained run: one field per ``lucid-jax`` flag of
``eval``, ``predict`` and ``export``, as ``TrainConfig`` is for ``train``.

Each field's metadata holds its flag's help and argparse keywords (see
:func:`lucid_jax.jobs.config.flag`); the command line makes its flags from them.
"""

import dataclasses

from lucid_jax.jobs.config import COMPUTE_DTYPES, REQUIRED, flag, parse_names
from lucid_jax.tiling import DEFAULT_OVERLAP

_CHECKPOINT = "a train --out directory"
_MODEL = "the architecture expected in the checkpoint"
_CHECKPOINTS_OWN = "the checkpoint's"
_STEP = "the kept step to use: latest, best (the best validated step) or a step number"
_DTYPE = "dtype of the convolutions and matmuls"
_RUNS_OWN = "the run's"
_MAX_DETECTIONS = (
    "detections kept per image, e.g. 1000 for crowded scenes; the test-time proposals rise to it where they are fewer"
)
_MODELS_OWN = "the model's, 100, as torchvision's"
_TILE = (
    "cut each image into SIZE x SIZE windows at its own resolution, fit each window onto the run's canvas "
    "(SIZE equal to the canvas: no resize), and merge the boxes across windows"
)
_OVERLAP = (
    "with --tile, the share of a window shared with its neighbour, in [0, 1): at least the largest object's "
    "size over SIZE"
)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """``lucid-jax eval``: a trained run's metrics on a dataset (:func:`lucid_jax.jobs.evaluate_checkpoint`)."""

    data: str = flag(REQUIRED, "shapes | voc:DIR | coco:ANNOTATIONS.json:IMAGE_DIR")
    checkpoint: str = flag(REQUIRED, _CHECKPOINT)
    split: str = flag("val", "shapes: val (held out); VOC: ImageSets/Main/<split>.txt, or all to score every image")
    model: str | None = flag(None, _MODEL + ", one of {models}", shown=_CHECKPOINTS_OWN)
    step: str = flag("latest", _STEP)
    compute_dtype: str | None = flag(None, _DTYPE, choices=COMPUTE_DTYPES, shown=_RUNS_OWN)
    max_detections: int | None = flag(
        None,
        _MAX_DETECTIONS + "; COCO then counts up to that many per image (COCOeval's maxDets 1, 10, K)",
        type=int,
        shown=_MODELS_OWN,
    )
    batch_size: int | None = flag(
        None, "images per predict call; the metrics do not depend on it", type=int, shown="the run's"
    )
    results: str | None = flag(
        None,
        "write the detections as a COCO results file: the annotation file's own image and category ids "
        "and [x, y, w, h] in original pixels",
    )
    ground_truth: str | None = flag(
        None, "write the matching COCO ground truth (for VOC and shapes; VOC difficult objects as iscrowd 1)"
    )
    tile: int | None = flag(None, _TILE, type=int, metavar="SIZE", shown="each image whole")
    overlap: float = flag(DEFAULT_OVERLAP, _OVERLAP, type=float)
    no_progress: bool = flag(False, "no progress bar", action="store_true")


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """``lucid-jax predict``: detections in image files (:func:`lucid_jax.jobs.predict_files`)."""

    images: tuple[str, ...] = flag(
        REQUIRED, "image files, folders (searched recursively) or glob patterns", positional=True, nargs="+"
    )
    checkpoint: str = flag(REQUIRED, _CHECKPOINT)
    out: str = flag(REQUIRED, "folder for detections.json (and the drawings)")
    model: str | None = flag(None, _MODEL, shown=_CHECKPOINTS_OWN)
    step: str = flag("latest", _STEP)
    compute_dtype: str | None = flag(None, _DTYPE, choices=COMPUTE_DTYPES, shown=_RUNS_OWN)
    max_detections: int | None = flag(None, _MAX_DETECTIONS, type=int, shown=_MODELS_OWN)
    batch_size: int | None = flag(
        None,
        "images per predict call",
        type=int,
        shown="1 on a CPU, where larger batches measured slower; 8 on a GPU or TPU",
    )
    score_thresh: float | None = flag(
        None,
        "keep detections scoring at least this",
        type=float,
        shown="0.05 with --results, COCO's convention; else 0.5, for drawings (export keeps 0.05)",
    )
    draw: bool = flag(False, "also draw each image's detections to OUT/<name>_detections.png", action="store_true")
    draw_max_side: int = flag(
        2048,
        "with --draw, the longest side of a drawing in pixels: larger images are drawn shrunk, boxes "
        "scaled with them (0: every image at its own size)",
        type=int,
    )
    results: str | None = flag(
        None,
        "also write a COCO results file: image ids from numeric file names (else 1-based positions), "
        "category ids = labels, [x, y, w, h] in the file's pixels",
    )
    tile: int | None = flag(None, _TILE, type=int, metavar="SIZE", shown="each image whole")
    overlap: float = flag(DEFAULT_OVERLAP, _OVERLAP, type=float)
    num_workers: int = flag(4, "image decoding threads", type=int)
    no_progress: bool = flag(False, "no progress bar", action="store_true")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """``lucid-jax export``: a run's prediction as files that serve without lucid_jax
    (:func:`lucid_jax.jobs.export_checkpoint`, :func:`lucid_jax.jobs.export_checkpoint_onnx`)."""

    checkpoint: str = flag(REQUIRED, _CHECKPOINT)
    out: str = flag(REQUIRED, "the artifact's file name; its description goes to OUT.json")
    model: str | None = flag(None, _MODEL, shown=_CHECKPOINTS_OWN)
    step: str = flag("latest", _STEP)
    compute_dtype: str | None = flag(None, _DTYPE, choices=COMPUTE_DTYPES, shown=_RUNS_OWN)
    max_detections: int | None = flag(None, _MAX_DETECTIONS, type=int, shown=_MODELS_OWN)
    batch_size: int | None = flag(
        None, "a fixed batch size", type=int, shown="a symbolic batch dimension: any batch size"
    )
    platforms: tuple[str, ...] = flag(("cpu", "cuda", "tpu"), "lower for these platforms", type=parse_names)
    score_thresh: float | None = flag(
        None,
        "the artifact's detection threshold; callers filter further",
        type=float,
        shown="the model's, 0.05, as eval scores (predict's is 0.5 for drawings)",
    )
    format: str = flag("jax", "jax: a serialized jax.export program; onnx: an ONNX model", choices=("jax", "onnx"))
