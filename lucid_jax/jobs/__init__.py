"""The jobs behind the command line, usable from Python: each job is a function of its
settings that prints little and returns what it made.

- ``config``: ``TrainConfig`` (every training default), resume and ``--init`` rules, the
  checks of the paths a job writes.
- ``options``: the settings of ``eval``, ``predict`` and ``export``, one field per flag.
- ``data``: datasets from ``--data`` specs and their loaders.
- ``state``: a run's detector and train state, fresh or from its checkpoints
  (``load_trained``, at any kept step).
- ``training``: ``train`` (or resume) into a run directory, as ``prepare_run`` then
  ``run_loop``.
- ``validation``: held-out data scored during a run, and its loss.
- ``run_log``: ``log.jsonl`` and TensorBoard events of a run.
- ``curves``: a run's curves drawn to ``curves.png``.
- ``evaluate``: metrics against every annotated object, COCO results files.
- ``predict``: detections on files, folders and globs of images, batched.
- ``export``: a run's prediction as one serialized file.
- ``demo``: train, evaluate and draw on the built-in shapes.
- ``seed``: the seed example on the full ResNet-101 FPN, with timings.
"""

from lucid_jax.jobs.config import (
    DEMO_OVERRIDES,
    RESUMABLE_CHANGES,
    JobError,
    TrainConfig,
    apply_init_recipe,
    canvases,
    check_config,
    check_model_name,
    config_from_dict,
    detector_names,
    reconcile_resume,
)
from lucid_jax.jobs.data import describe_data, make_loader, open_dataset
from lucid_jax.jobs.demo import demo, pad_targets
from lucid_jax.jobs.evaluate import evaluate, evaluate_checkpoint, predictions_on
from lucid_jax.jobs.export import export_checkpoint, export_checkpoint_onnx
from lucid_jax.jobs.options import EvalOptions, ExportOptions, PredictOptions
from lucid_jax.jobs.predict import default_score_thresh, detect_files, expand_image_paths, predict_files
from lucid_jax.jobs.seed import seed_example
from lucid_jax.jobs.state import build_model, frozen_labels, initial_state, load_trained
from lucid_jax.jobs.training import Run, prepare_run, run_loop, train

__all__ = [
    "DEMO_OVERRIDES",
    "EvalOptions",
    "ExportOptions",
    "RESUMABLE_CHANGES",
    "JobError",
    "PredictOptions",
    "Run",
    "TrainConfig",
    "apply_init_recipe",
    "build_model",
    "canvases",
    "check_config",
    "check_model_name",
    "config_from_dict",
    "default_score_thresh",
    "demo",
    "describe_data",
    "detect_files",
    "detector_names",
    "evaluate",
    "evaluate_checkpoint",
    "expand_image_paths",
    "export_checkpoint",
    "export_checkpoint_onnx",
    "frozen_labels",
    "initial_state",
    "load_trained",
    "make_loader",
    "open_dataset",
    "pad_targets",
    "predict_files",
    "predictions_on",
    "prepare_run",
    "reconcile_resume",
    "run_loop",
    "seed_example",
    "train",
]
