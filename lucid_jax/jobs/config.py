"""A training run's settings: ``TrainConfig`` is the one home of every default.

The command line makes one flag per field, a resumed run reconciles the stored
settings with the flags given, and ``--init`` brings torchvision's fine-tuning
recipe where the user set nothing else.
"""

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lucid_jax.data.canvases import Canvases


class JobError(RuntimeError):
    """A user-facing failure: bad arguments, data or checkpoints (one line)."""


def output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A folder a job writes into, checked before any work: what is there already is a folder.

    Args:
      path: the folder; the job creates it.
      flag: the flag that named it, for the message.

    Returns:
      ``path`` as a Path.

    Raises:
      JobError: ``path`` is a file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise JobError(f"{flag} {path} is a file; give a directory")
    return path


def output_file(path: str | os.PathLike, flag: str = "--out", *, folder_exists: bool = False) -> Path:
    """A file a job writes, checked before any work: it is not a folder.

    Args:
      path: the file.
      flag: the flag that named it, for the message.
      folder_exists: also require its folder to exist (for a job that does not create it).

    Returns:
      ``path`` as a Path.

    Raises:
      JobError: ``path`` is a folder, or (with ``folder_exists``) its folder does not exist.
    """
    path = Path(path)
    if path.is_dir():
        raise JobError(f"{flag} {path} is a folder; give a file name")
    if folder_exists and not path.parent.is_dir():
        raise JobError(f"{flag} {path}: folder {path.parent} not found")
    return path


COMPUTE_DTYPES = ("float32", "bfloat16")
# Validation metrics a run can keep its best step by; val_loss (the held-out training
# loss) is better when lower, the COCO APs when higher.
BEST_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "val_loss")


def best_mode(metric: str) -> str:
    """ "min" for the validation loss, "max" for the APs."""
    return "min" if metric == "val_loss" else "max"


REQUIRED: Any = dataclasses.MISSING  # the default of a field whose flag must be given


def flag(default, help: str, **kwargs):
    """A dataclass field that is also a ``lucid-jax`` flag (see ``cli_parser.add_flags``).

    Args:
      default: the field's default (``REQUIRED``: none; the flag must be given).
      help: the flag's help; the help appends "(default: ...)"; ``{models}`` stands
        for the registered detectors' names.
      **kwargs: argparse keywords (``type``, ``choices``, ``action``, ``nargs``), and
        ``shown``: the default as the help states it, where it is not the value itself
        (e.g. "the checkpoint's"); ``positional``: an argument, not a flag.

    Returns:
      A ``dataclasses.field`` with this metadata.
    """
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def flag_name(field: str) -> str:
    """The flag of a field, e.g. "--batch-size" for ``batch_size``."""
    return "--" + field.replace("_", "-")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)


AUGMENTS = ("none", "flip", "jitter", "color")


def augment_parts(text: str) -> frozenset[str]:
    """The parts of an ``--augment`` comma list, e.g. "jitter,color" -> {"jitter", "color"}.

    Raises:
      JobError: an unknown or repeated part, ``none`` with another, or ``flip`` with
        ``jitter`` (which flips already).
    """
    parts = [p.strip() for p in str(text).split(",")]
    unknown = [p for p in parts if p not in AUGMENTS]
    if unknown or not parts:
        raise JobError(f"--augment takes a comma list of {', '.join(AUGMENTS)}; got {text!r}")
    if len(set(parts)) != len(parts):
        raise JobError(f"--augment names a part twice: {text!r}")
    if "none" in parts and len(parts) > 1:
        raise JobError(f"--augment none stands alone; got {text!r}")
    if {"flip", "jitter"} <= set(parts):
        raise JobError(f"--augment jitter flips already; use jitter or jitter,color, not {text!r}")
    return frozenset(parts) - {"none"}


def parse_names(text: str) -> tuple[str, ...]:
    """A comma-separated flag's names, e.g. "cat, dog" -> ("cat", "dog")."""
    return tuple(v.strip() for v in str(text).split(",") if v.strip())


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on: the one home of every default.

    Stored in each checkpoint's metadata; ``lucid-jax train`` makes one flag per
    field (``--batch-size`` for ``batch_size``) whose help shows this default.
    """

    data: str = flag("shapes", "shapes | voc:DIR | coco:ANNOTATIONS.json:IMAGE_DIR")
    # no argparse choices: a typo is refused later, in one line naming the known models
    model: str = flag("faster_rcnn_mini_fpn", "a registered model name: {models}")
    image_size: str = flag(
        "128",
        "S: one S x S canvas, the longer side resized to S (a multiple of the model's largest stride, "
        "32 for the ResNet FPNs); SHORT:LONG, e.g. 800:1333: the shorter side to SHORT, the longer "
        "at most LONG, on a landscape, a portrait and a square canvas (one compiled step each)",
        type=str,
    )
    batch_size: int = flag(8, "images per step", type=int)
    steps: int = flag(1000, "training steps in all (may change on resume)", type=int)
    lr: float = flag(1e-3, "peak learning rate of the heads", type=float)
    optimizer: str = flag("adamw", "adamw or sgd (momentum 0.9)", choices=("adamw", "sgd"))
    weight_decay: float = flag(1e-4, "decoupled for AdamW, L2 for SGD", type=float)
    schedule: str = flag("cosine", "learning-rate schedule after warmup", choices=("constant", "cosine", "step"))
    warmup_steps: int = flag(50, "linear warmup steps (at most a quarter of --steps)", type=int)
    decay_steps: tuple[int, ...] = flag(
        (), "steps where --schedule step multiplies the LR by --decay-factor, e.g. 16000,22000", type=_ints
    )
    decay_factor: float = flag(0.1, "the step schedule's factor", type=float)
    clip_grad_norm: float | None = flag(None, "clip the global gradient norm to this (none: no clipping)", type=float)
    backbone_lr_mult: float = flag(1.0, "backbone LR / heads' LR", type=float)
    trainable_backbone_layers: int = flag(
        5,
        "backbone stages trained, from the top, as torchvision counts them: "
        "5 all, 3 freezes the stem and layer1, 0 the whole ResNet "
        "(with --init: 3)",
        type=int,
        choices=range(6),
    )
    norm_mode: str = flag(
        "batch",
        "batch: BatchNorm trains its statistics, scale and bias; frozen: fixed "
        "statistics, scale and bias, as torchvision's FrozenBatchNorm2d; group: GroupNorm "
        "(32 groups; each image's own statistics, for training from scratch with small "
        "batches), in the backbone, the FPN and a conv box head. Every norm of the model "
        "(the FPN's and the box head's too, where it has them) (with --init: frozen; batch for "
        "torchvision FasterRCNN v2 weights)",
        choices=("batch", "frozen", "group"),
    )
    rpn_pre_nms_top_n: tuple[int, ...] | None = flag(
        None,
        "TRAIN,TEST: RPN boxes kept per FPN level before NMS, in training and in test "
        "(the mini model's 600,300; torchvision's and the ResNet FPNs' 2000,1000)",
        type=_ints,
        metavar="TRAIN,TEST",
        shown="the model's",
    )
    rpn_post_nms_top_n: tuple[int, ...] | None = flag(
        None,
        "TRAIN,TEST: proposals kept after the RPN's NMS, in training and in test "
        "(the mini model's 300,100; torchvision's 2000,1000; the ResNet FPNs' 1000,300)",
        type=_ints,
        metavar="TRAIN,TEST",
        shown="the model's",
    )
    box_batch_size_per_image: int | None = flag(
        None,
        "proposals sampled per image to train the box head (the mini model's 128; torchvision's "
        "and the ResNet FPNs' 512)",
        type=int,
        shown="the model's",
    )
    dropout_rate: float | None = flag(
        None,
        "dropout after each fully connected layer of the box head in training (Lucid's and the "
        "mini model's 0.5; torchvision's 0)",
        type=float,
        shown="the model's",
    )
    init: str | None = flag(
        None,
        "start from pretrained weights: .lcd, .safetensors, .npz, .pth or a run "
        "directory (Lucid detector or backbone, torchvision ResNet or FasterRCNN v1 or v2); "
        "ignored when the run resumes",
    )
    augment: str = flag(
        "flip",
        "training augmentation, a comma list: none; flip (horizontal, p = 0.5); jitter "
        "(large-scale jitter: resize to 0.5..2.0 x the canvas fit, random crop or pad, flip; "
        "boxes keeping under 30% of their area are dropped); color (brightness, contrast, "
        "saturation and hue, each with p = 0.5, as mmdetection's PhotoMetricDistortion). "
        "E.g. flip,color or jitter,color; none stands alone",
    )
    max_boxes: int | None = flag(
        None,
        "objects per image kept in training (none: the largest object count "
        "in the training split, so nothing is dropped)",
        type=int,
    )
    split: str = flag(
        "train",
        "VOC training split, ImageSets/Main/<split>.txt (VOC 2007: trainval); without "
        "the file, every image not listed in val.txt or test.txt",
    )
    classes: tuple[str, ...] | None = flag(
        None,
        "VOC class list, e.g. cat,dog (none: classes.txt beside the data, or the names found in the XML)",
        type=parse_names,
    )
    compute_dtype: str = flag(
        "float32",
        "dtype of the convolutions and matmuls; bfloat16 keeps float32 parameters, optimiser state and "
        "losses (the run stores it; eval, predict and export use it)",
        choices=COMPUTE_DTYPES,
    )
    eval_every: int | None = flag(
        None,
        "steps between validations on the held-out data, each one a checkpoint (0: none)",
        type=int,
        shown="about a tenth of --steps when there is held-out data",
    )
    eval_data: str | None = flag(
        None,
        "held-out data: shapes | voc:DIR (its val split, else every image) | coco:VAL.json:IMAGE_DIR",
        shown="the held-out shapes; VOC: the val split of --data where it lists one; COCO: none",
    )
    best_metric: str | None = flag(
        None,
        "keep the best validated step by this metric beside the newest: " + ", ".join(BEST_METRICS),
        choices=BEST_METRICS,
        shown="AP when there is validation",
    )
    seed: int = flag(0, "seed of the initialisation, data order and sampling", type=int)
    checkpoint_every: int = flag(200, "steps between checkpoints", type=int)
    keep_checkpoints: int = flag(2, "newest checkpoints kept", type=int)
    log_every: int = flag(10, "steps between log.jsonl lines", type=int)
    num_workers: int = flag(2, "threads loading images", type=int)
    shapes_train_examples: int = flag(2000, "synthetic training images (--data shapes)", type=int)

    def __post_init__(self):
        # Checkpoints before SHORT:LONG stored the square size as an int: 128, "128" and
        # " 128" are one setting, and so are "800:1333" and "800 : 1333".
        object.__setattr__(self, "image_size", str(self.image_size).replace(" ", ""))


# Flags that may differ when a run resumes: they change neither the model nor the data order.
RESUMABLE_CHANGES = (
    "steps",
    "num_workers",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_every",
    "init",
)
# What ``lucid-jax demo`` changes from TrainConfig's defaults.
DEMO_OVERRIDES = {"steps": 800}


def config_from_dict(saved: dict) -> TrainConfig:
    """A TrainConfig from checkpoint metadata (JSON lists become tuples; unknown keys are an error)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise JobError(f"the checkpoint's config has settings this version does not know: {', '.join(unknown)}")
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    return TrainConfig(**values)


def detector_names() -> list[str]:
    """The registered detectors (the registry also holds bare ResNet classifiers)."""
    from lucid_jax.models import list_models

    return [name for name in list_models() if name.startswith("faster_rcnn")]


def check_model_name(name: str) -> None:
    """Raise JobError unless ``name`` is a registered detector; the message lists them."""
    if name not in detector_names():
        raise JobError(f"unknown model {name!r}; known models: {', '.join(detector_names())}")


def size_divisibility(model_name: str) -> int:
    """What the model's canvas sides must divide by: its backbone's largest RoI stride,
    read from the registry's configuration (no model is built).

    Args:
      model_name: a registered detector.

    Returns:
      The multiple of the canvas sides (32 for the ResNet FPNs).

    Raises:
      JobError: ``model_name`` is not a registered detector.
    """
    from lucid_jax.models import registry

    check_model_name(model_name)
    return registry.size_divisibility(model_name)


def canvases(config: TrainConfig) -> "Canvases":
    """The canvases of ``--image-size`` for the run's model: the one reading of the flag.

    ``S`` gives one S x S canvas; ``SHORT:LONG`` a landscape SHORT x LONG, a portrait
    LONG x SHORT and a square canvas (sides rounded up to the model's size divisibility).

    Raises:
      JobError: not S or SHORT:LONG, or an S that is not a multiple of the model's stride.
    """
    from lucid_jax.data.canvases import parse_image_size

    multiple = size_divisibility(config.model)
    text = str(config.image_size).strip()
    if text.isdigit() and (int(text) < 1 or int(text) % multiple):
        raise JobError(
            f"--image-size must be a positive multiple of {multiple} ({config.model}'s largest stride), got {text}"
        )
    try:
        return parse_image_size(text, multiple)
    except ValueError as e:
        raise JobError(str(e)) from None


def describe_canvases(spec: "Canvases") -> str:
    """The line a job logs, e.g. "canvases: 800x1344 landscape, ...: at most 3 compiled step shapes"."""
    n = len(spec.shapes)
    return f"canvases: {spec.describe()}: at most {n} compiled step shape{'s' if n > 1 else ''}"


def check_config(config: TrainConfig) -> None:
    """Raise JobError for values no run can use (one line, naming the flag)."""

    for name in (
        "batch_size",
        "steps",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "shapes_train_examples",
    ):
        if getattr(config, name) < 1:
            raise JobError(f"{flag_name(name)} must be >= 1, got {getattr(config, name)}")
    canvases(config)  # --image-size: S or SHORT:LONG
    augment_parts(config.augment)
    for name in ("rpn_pre_nms_top_n", "rpn_post_nms_top_n"):
        value = getattr(config, name)
        if value is not None and (len(value) != 2 or min(value) < 1):
            raise JobError(
                f"{flag_name(name)} takes TRAIN,TEST, two positive counts, e.g. 2000,1000; got {_show(value)}"
            )
    if config.box_batch_size_per_image is not None and config.box_batch_size_per_image < 1:
        raise JobError(f"--box-batch-size-per-image must be >= 1, got {config.box_batch_size_per_image}")
    if config.dropout_rate is not None and not 0 <= config.dropout_rate < 1:
        raise JobError(f"--dropout-rate must be in [0, 1), got {config.dropout_rate}")
    if config.max_boxes is not None and config.max_boxes < 1:
        raise JobError(f"--max-boxes must be >= 1, got {config.max_boxes}")
    for name in ("weight_decay", "backbone_lr_mult", "warmup_steps", "num_workers", "eval_every"):
        if getattr(config, name) is None:
            continue
        if getattr(config, name) < 0:
            raise JobError(f"{flag_name(name)} must be >= 0, got {getattr(config, name)}")
    if not config.lr > 0:
        raise JobError(f"--lr must be > 0, got {config.lr}")
    if config.clip_grad_norm is not None and not config.clip_grad_norm > 0:
        raise JobError(f"--clip-grad-norm must be > 0, got {config.clip_grad_norm}")
    if not 0 < config.decay_factor <= 1:
        raise JobError(f"--decay-factor must be in (0, 1], got {config.decay_factor}")
    if config.schedule == "step" and not config.decay_steps:
        raise JobError("--schedule step needs --decay-steps, e.g. --decay-steps 16000,22000")
    if list(config.decay_steps) != sorted(config.decay_steps) or any(s < 1 for s in config.decay_steps):
        raise JobError(f"--decay-steps must be increasing positive steps, got {','.join(map(str, config.decay_steps))}")


def check_tiling(tile: int, overlap: float) -> None:
    """Raise JobError for a ``--tile`` or ``--overlap`` no tiling can use (one line)."""
    from lucid_jax.tiling import tile_windows

    try:
        tile_windows(tile, tile, tile, overlap)
    except ValueError as e:
        raise JobError(f"--tile {tile} --overlap {overlap}: {e}") from None


def reconcile_resume(stored: TrainConfig, config: TrainConfig, given) -> tuple[TrainConfig, list[str]]:
    """The config a resumed run continues with, and the notes to print.

    Flags the user did not give take their stored values. A given flag with a
    different value is an error, except for ``RESUMABLE_CHANGES``.

    Args:
      stored: the config saved in the checkpoint.
      config: the config asked for now.
      given: names of the fields the user set (None: every field of ``config``).

    Raises:
      JobError: one line listing every difference, e.g. ``--batch-size 4 (the run has 8)``.
    """
    given = {f.name for f in dataclasses.fields(TrainConfig)} if given is None else set(given)
    changed = {k for k in given if getattr(config, k) != getattr(stored, k)}
    refused = sorted(changed - set(RESUMABLE_CHANGES))
    if refused:
        diffs = ", ".join(
            f"{flag_name(k)} {_show(getattr(config, k))} (the run has {_show(getattr(stored, k))})" for k in refused
        )
        raise JobError(
            f"this run was started with other settings; resuming would change them: {diffs}. "
            "Drop these flags to continue it, or use a new --out"
        )
    notes = []
    resumed = dataclasses.replace(stored, **{k: getattr(config, k) for k in changed if k != "init"})
    if "init" in given and config.init is not None:
        notes.append("resuming from the run's own checkpoint; --init is ignored")
    if "steps" in changed:
        notes.append(
            f"--steps changed from {stored.steps} to {config.steps}: the {stored.schedule} schedule is "
            f"recomputed for {config.steps} steps (warmup {warmup_steps(resumed)})"
        )
    return resumed, notes


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def warmup_steps(config: TrainConfig) -> int:
    """The warmup actually used: at most a quarter of the run."""
    return min(config.warmup_steps, config.steps // 4)


def apply_init_recipe(config: TrainConfig, kind: str, given) -> tuple[TrainConfig, dict]:
    """torchvision's fine-tuning recipe for pretrained weights, where the user set nothing else."""
    from lucid_jax.weights import fine_tuning_defaults

    given = {f.name for f in dataclasses.fields(TrainConfig)} if given is None else set(given)
    recipe = {k: v for k, v in fine_tuning_defaults(kind).items() if k not in given}
    return dataclasses.replace(config, **recipe), recipe
