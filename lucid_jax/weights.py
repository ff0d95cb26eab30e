"""Start from pretrained weights: one entry point for every kind of file a user has.

    variables, report = load_pretrained(variables, "resnet101.safetensors", model=model)
    print(report.summary())   # torchvision ResNet -> backbone.net: 522 loaded, 0 skipped, 30 left initial

The kind of a state dict is recognised from its key names:

| kind                     | keys look like                                  | loads into    |
|--------------------------|-------------------------------------------------|---------------|
| Lucid detector           | ``backbone.net.stem.0.weight``, ``rpn.head.*``  | the detector  |
| Lucid backbone           | ``stem.0.weight``, ``layer1.0.conv1.conv.*``    | backbone.net  |
| torchvision ResNet       | ``conv1.weight``, ``layer1.0.conv1.weight``     | backbone.net  |
| torchvision FasterRCNN   | ``backbone.body.*``, ``rpn.head.*``, ``roi_heads.*`` | the detector |
| torchvision FasterRCNN v2 | the same, and ``roi_heads.box_head.0.0.*``     | the detector  |

A torchvision file is v2 when it has a conv box head (``roi_heads.box_head.0.0.*``),
a second RPN conv (``rpn.head.conv.1.0.*``) or FPN norms (``inner_blocks.0.1.*``).

The report accounts for every key on both sides: each key of the file is loaded,
skipped (with the reason) or listed apart (Lucid's second stem copy, Lucid's
constant buffers and BatchNorm's ``num_batches_tracked`` counters); each parameter
and statistic of the model is loaded or left at its initial value. Class-count
heads of another size (``cls_score``, ``bbox_pred``, ``fc``) and an RPN head with
another anchor count are skipped, as detectron2 does when fine-tuning on new
classes; any other shape mismatch is an error. So is a detector file whose heads
are not the model's (a v2 file into a v1 model, or the reverse): the same shapes
in other places would load, and mean nothing.
"""

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lucid_jax import state_dict as sd
from lucid_jax.files import write_atomically
from lucid_jax.state_dict_files import StateDictError, load_state_dict_file

LUCID_DETECTOR = "Lucid detector"
LUCID_BACKBONE = "Lucid backbone"
TORCHVISION_RESNET = "torchvision ResNet"
TORCHVISION_FASTER_RCNN = "torchvision FasterRCNN"
TORCHVISION_FASTER_RCNN_V2 = "torchvision FasterRCNN v2"
KINDS = (LUCID_DETECTOR, LUCID_BACKBONE, TORCHVISION_RESNET, TORCHVISION_FASTER_RCNN, TORCHVISION_FASTER_RCNN_V2)
DETECTOR_KINDS = (LUCID_DETECTOR, TORCHVISION_FASTER_RCNN, TORCHVISION_FASTER_RCNN_V2)
BACKBONE_KINDS = (LUCID_BACKBONE, TORCHVISION_RESNET)

_BUFFERS = ("bbox_reg_means", "bbox_reg_stds", "anchor_generator.base_anchors", "rpn.anchor_generator.base_anchors")
_CLASS_HEAD = re.compile(r"^(cls_score|bbox_pred|backbone\.net\.fc|fc)\.(weight|bias)$")
_RPN_ANCHOR_HEAD = re.compile(r"^rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)$")
# The layers that tell one detector head from another: the FPN's norms, the RPN
# head's convs, the conv box head and the fully connected layers.
_HEAD_LAYER = re.compile(
    r"^(backbone\.fpn\.(lateral|output)_norms\.\d+|rpn\.head\.conv(\.\d+)?|box_(convs|norms)\.\d+|fc[12])\.[a-z_]+$"
)
_V2_MARKERS = ("roi_heads.box_head.0.0.", "rpn.head.conv.1.0.", "backbone.fpn.inner_blocks.0.1.")
_MODEL_FOR_KIND = {
    TORCHVISION_FASTER_RCNN: "faster_rcnn_resnet_50_fpn_torchvision",
    TORCHVISION_FASTER_RCNN_V2: "faster_rcnn_resnet_50_fpn_v2_torchvision",
}


@dataclasses.dataclass
class InitReport:
    """What ``load_pretrained`` did with every key.

    Attributes:
      kind: one of ``KINDS``.
      source: the path (or "mapping").
      target: "backbone.net" or "detector" (or "classifier" for a bare ResNet).
      loaded: file key -> model key (Lucid names) it was loaded into.
      skipped: file key -> why it was not loaded.
      left_initial: model keys that keep their initial values.
      apart: "stem_aliases", "buffers", "counters" -> file keys that carry no
        parameter of their own (Lucid's duplicate stem, Lucid's constant
        buffers, BatchNorm's num_batches_tracked).
    """

    kind: str
    source: str
    target: str
    loaded: dict[str, str]
    skipped: dict[str, str]
    left_initial: list[str]
    apart: dict[str, list[str]]

    def summary(self) -> str:
        """One line: ``torchvision ResNet -> backbone.net: 522 loaded, 0 skipped, 30 left initial``."""
        return (
            f"{self.kind} -> {self.target}: {len(self.loaded)} loaded, {len(self.skipped)} skipped, "
            f"{len(self.left_initial)} left initial"
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def detect_kind(keys) -> str:
    """The kind of a state dict, from its key names (see the module docstring).

    Raises:
      StateDictError: no kind matches; the message lists a few keys.
    """
    keys = set(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("backbone.body.") or has("roi_heads."):
        return TORCHVISION_FASTER_RCNN_V2 if any(has(m) for m in _V2_MARKERS) else TORCHVISION_FASTER_RCNN
    if has("backbone.net.") or has("rpn.head.conv."):
        return LUCID_DETECTOR
    if "conv1.weight" in keys and has("layer1.0.conv1.weight"):
        return TORCHVISION_RESNET
    if has("stem.0.") or has("layer1.0.conv1.conv."):
        return LUCID_BACKBONE
    sample = ", ".join(sorted(keys)[:6]) or "(no keys)"
    raise StateDictError(
        f"cannot tell what these weights are ({len(keys)} keys: {sample}); expected a Lucid detector or "
        "backbone, a torchvision ResNet or a torchvision FasterRCNN (v1 or v2) state dict"
    )


def read_source(source) -> tuple[dict[str, np.ndarray], str]:
    """(flat state dict, description) from a file, a lucid_jax run directory or a mapping."""
    if isinstance(source, Mapping):
        return {k: np.asarray(v) for k, v in source.items()}, "mapping"
    path = Path(source)
    if path.is_dir():
        return _run_directory_state_dict(path), f"{path} (lucid_jax run)"
    return load_state_dict_file(path), str(path)


def _run_directory_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The Lucid-named params and statistics of a run directory's latest checkpoint."""
    from lucid_jax.checkpoint import Checkpointer

    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    with Checkpointer(directory, read_only=True) as ckpt:
        variables = ckpt.restore_variables()
    return sd.to_state_dict(variables)


def _file_to_model_names(flat: Mapping[str, Any], kind: str, detector: bool):
    """Map file keys to model names: (file key -> model name or None, apart lists)."""
    apart: dict[str, list[str]] = {"stem_aliases": [], "buffers": [], "counters": []}
    names: dict[str, str | None] = {}
    prefix = "backbone.net." if detector else ""
    name: str | None
    layout = sd.torchvision_faster_rcnn_layout(flat)
    for key in flat:
        if key.endswith(".num_batches_tracked"):
            apart["counters"].append(key)
            continue
        if kind == TORCHVISION_RESNET:
            name = prefix + sd.rename_torchvision_resnet_key(key)
        elif kind == LUCID_BACKBONE:
            name = prefix + key
        else:
            if kind in (TORCHVISION_FASTER_RCNN, TORCHVISION_FASTER_RCNN_V2):
                name = sd.rename_torchvision_faster_rcnn_key(key, **layout)
            else:
                name = key
                if key in _BUFFERS:
                    apart["buffers"].append(key)
                    continue
                if key.startswith("backbone.stem."):
                    apart["stem_aliases"].append(key)
                    continue
            if not detector:  # a detector's weights into a bare ResNet classifier
                name = name[len("backbone.net.") :] if name.startswith("backbone.net.") else None
        names[key] = name
    # Lucid's stem copy stands in for the canonical stem only when that is absent.
    for alias in list(apart["stem_aliases"]):
        canonical = "backbone.net." + alias[len("backbone.") :]
        if canonical not in flat:
            apart["stem_aliases"].remove(alias)
            names[alias] = canonical if detector else canonical[len("backbone.net.") :]
    return names, apart


def load_pretrained(variables: Mapping, source, *, model=None) -> tuple[dict, InitReport]:
    """Load pretrained weights of any supported kind into a copy of ``variables``.

    Args:
      variables: ``{"params", "batch_stats"}`` of a detector (or of a bare ResNet
        classifier), e.g. from ``model.init``; gives the names and shapes.
      source: a ``.lcd``, ``.safetensors``, ``.npz`` or ``.pth``/``.pt`` file, a
        lucid_jax run directory (its latest checkpoint), or a flat mapping.
      model: the detector the variables belong to (for the report's target and
        Lucid's buffers); optional.

    Returns:
      (variables, report): new variables with every loaded key replaced, and an
      ``InitReport``.

    Raises:
      StateDictError: the kind is not recognised, or a key other than a
        class-count or anchor-count head has another shape (key and both shapes).
      FileNotFoundError: the file does not exist.
    """
    flat, description = read_source(source)
    kind = detect_kind(flat)
    detector = sd.is_detector(variables)
    entries = sd.torch_layout_shapes(variables)  # model name -> shape in the file's (torch) layout
    names, apart = _file_to_model_names(flat, kind, detector)
    if detector and kind in DETECTOR_KINDS:
        _check_heads(names, entries, kind, description)
    loaded: dict[str, str] = {}
    skipped: dict[str, str] = {}
    mismatched: list[str] = []
    for key, name in names.items():
        shape = tuple(np.shape(flat[key]))
        if name is None or name not in entries:
            skipped[key] = "not a parameter of this model" + (f" (would be {name})" if name else "")
        elif name in loaded.values():
            skipped[key] = f"{name} is already loaded from another key"
        elif shape != entries[name]:
            what = f"file has shape {shape}, model expects {entries[name]}"
            if _CLASS_HEAD.match(name):
                skipped[key] = f"class-count head of another size: {what}"
            elif _RPN_ANCHOR_HEAD.match(name):
                skipped[key] = f"RPN head with another anchor count: {what}"
            else:
                mismatched.append(f"{key} (-> {name}): {what}")
        else:
            loaded[key] = name
    if mismatched:
        raise StateDictError(
            f"{description}: {len(mismatched)} key(s) of the {kind} do not fit the model: "
            + "; ".join(mismatched[:3])
            + (f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else "")
        )
    new = sd.from_state_dict(variables, {loaded[k]: flat[k] for k in loaded}, strict=False, model=model)
    target = "backbone.net" if kind in BACKBONE_KINDS and detector else ("detector" if detector else "classifier")
    left = sorted(set(entries) - set(loaded.values()))
    report = InitReport(
        kind=kind, source=description, target=target, loaded=loaded, skipped=skipped, left_initial=left, apart=apart
    )
    return new, report


def _head_layers(names) -> set[str]:
    return {name.rsplit(".", 1)[0] for name in names if name and _HEAD_LAYER.match(name)}


def _check_heads(names: Mapping[str, str | None], entries: Mapping[str, tuple], kind: str, description: str) -> None:
    """Refuse a detector file whose heads are not the model's (say, v2 weights into v1).

    Raises:
      StateDictError: naming the layers each side has alone, and the model to use.
    """
    ours, theirs = _head_layers(entries), _head_layers(names.values())
    if ours == theirs:
        return
    only_file, only_model = sorted(theirs - ours), sorted(ours - theirs)
    hint = f"; build {_MODEL_FOR_KIND[kind]} (or its R101 twin) for these weights" if kind in _MODEL_FOR_KIND else ""
    few = lambda names: ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")  # noqa: E731
    sides = [f"the file alone has {few(only_file)}"] * bool(only_file) + [
        f"the model alone has {few(only_model)}"
    ] * bool(only_model)
    raise StateDictError(f"{description}: the {kind}'s heads are not this model's: {'; '.join(sides)}{hint}")


def fine_tuning_defaults(kind: str) -> dict[str, Any]:
    """torchvision's fine-tuning recipe for pretrained weights of ``kind``: 3 trainable
    stages, with frozen BN, except for torchvision's v2 detector, whose BatchNorm
    trains (its recipe, and its norms after the FPN and in the box head)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    norm_mode = "batch" if kind == TORCHVISION_FASTER_RCNN_V2 else "frozen"
    return {"norm_mode": norm_mode, "trainable_backbone_layers": 3}


def save_report(report: InitReport, path: str | os.PathLike) -> None:
    write_atomically(path, report.to_json())
