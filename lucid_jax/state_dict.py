"""Flat, Lucid-named state dicts for flax variables, and torchvision imports.

Module paths are Lucid's names already, so the conversion is a flat key map:
the pytree path joined with dots, the leaf renamed, and one explicit list of
transposes (flax keeps conv kernels HWIO and dense kernels (in, out); Lucid and
torch keep OIHW and (out, in)).

    params/...conv/kernel  [kh, kw, in, out] <-> ...conv.weight  [out, in, kh, kw]
    params/...fc/kernel    [in, out]         <-> ...fc.weight    [out, in]
    params/...bn/scale                       <-> ...bn.weight
    params/.../bias                          <-> ....bias
    batch_stats/...bn/mean, var              <-> ...bn.running_mean, running_var

A detector's dict also carries Lucid's buffers (``bbox_reg_means``,
``bbox_reg_stds``, ``anchor_generator.base_anchors``,
``rpn.anchor_generator.base_anchors``) and Lucid's second copy of the stem under
``backbone.stem``. They are written so Lucid can load our dicts; on load they are
checked for shape only, since here they follow from the model's configuration.
"""

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lucid_jax.state_dict_files import StateDictError, save_state_dict_file

_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# flax layout -> torch layout, by rank; the inverse permutation goes back.
_TRANSPOSES = {4: (3, 2, 0, 1), 2: (1, 0)}
_INVERSE = {4: (2, 3, 1, 0), 2: (1, 0)}
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_STEM_ALIAS = ("backbone.stem.", "backbone.net.stem.")


def _entries(variables: Mapping) -> dict[str, tuple[tuple, Any]]:
    """Lucid name -> ((collection, *path), flax leaf) for params and batch_stats."""
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in flatten_dict(dict(variables.get(collection, {}))).items():
            name = ".".join(path[:-1] + (_LEAF_NAMES[(collection, path[-1])],))
            out[name] = ((collection,) + path, leaf)
    return out


def is_detector(variables: Mapping) -> bool:
    """True for a detector's variables (a backbone and an RPN), False for a bare ResNet."""
    params = variables.get("params", {})
    return "backbone" in params and "rpn" in params


def _torch_shape(flax_shape: tuple) -> tuple:
    return tuple(flax_shape[i] for i in _TRANSPOSES[len(flax_shape)]) if len(flax_shape) in _TRANSPOSES else flax_shape


def torch_layout_shapes(variables: Mapping) -> dict[str, tuple]:
    """Lucid name -> shape in Lucid's (torch) layout, for every parameter and statistic."""
    return {name: _torch_shape(tuple(np.shape(leaf))) for name, (_, leaf) in _entries(variables).items()}


def _buffers(model=None) -> dict[str, np.ndarray]:
    """Lucid's derived buffers of a detector: its RPN's first-level cell anchors and
    its RoI heads' ``bbox_reg_stds`` (the default configuration's if no model)."""
    from lucid_jax.models.anchors import cell_anchors
    from lucid_jax.models.roi_heads import RoIHeads
    from lucid_jax.models.rpn import RPN

    rpn = RPN() if model is None else model.rpn
    roi_heads = RoIHeads() if model is None else model.roi_heads
    anchors = cell_anchors(rpn.anchor_sizes[0], rpn.aspect_ratios, rpn.round_anchors)
    return {
        "bbox_reg_means": np.zeros(4, np.float32),
        "bbox_reg_stds": np.asarray(roi_heads.bbox_reg_stds, np.float32),
        "anchor_generator.base_anchors": anchors,
        "rpn.anchor_generator.base_anchors": anchors.copy(),
    }


def to_state_dict(variables: Mapping, *, model=None) -> dict[str, np.ndarray]:
    """Flat ``{lucid_name: np.ndarray}`` in Lucid's (torch) layouts.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of a detector, a ResNet
        or any module built from this package.
      model: the detector, to write its own buffers (anchors, stds); defaults
        to the default configuration's.

    Returns:
      A new dict of float32 numpy arrays, e.g. ``"backbone.net.stem.0.weight"``
      of shape (64, 3, 7, 7).
    """
    flat = {}
    for name, (_, leaf) in _entries(variables).items():
        arr = np.asarray(leaf)
        flat[name] = np.ascontiguousarray(arr.transpose(_TRANSPOSES[arr.ndim]) if arr.ndim in _TRANSPOSES else arr)
    if is_detector(variables):
        for name in [k for k in flat if k.startswith(_STEM_ALIAS[1])]:
            flat[_STEM_ALIAS[0] + name[len(_STEM_ALIAS[1]) :]] = flat[name].copy()
        flat.update(_buffers(model))
    return flat


def _fmt(keys, limit=20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def from_state_dict(variables: Mapping, flat: Mapping[str, Any], strict: bool = True, *, model=None) -> dict:
    """Load a flat Lucid-named state dict into a copy of ``variables``.

    Args:
      variables: template ``{"params", "batch_stats"}`` giving names, shapes, dtypes.
      flat: ``{name: array}`` (numpy, torch tensors via ``np.asarray``, ...).
      strict: fail on missing or unexpected keys (shape mismatches always fail).
      model: the detector, to check its buffers' shapes against.

    Returns:
      New variables with every given entry replaced.

    Raises:
      StateDictError: lists missing, unexpected and mis-shaped keys by name,
        with both shapes for the latter.
    """
    entries = _entries(variables)
    buffers = _buffers(model) if is_detector(variables) else {}
    given = {k: v for k, v in flat.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if buffers:
        for alias in [k for k in given if k.startswith(_STEM_ALIAS[0])]:
            canonical = _STEM_ALIAS[1] + alias[len(_STEM_ALIAS[0]) :]
            value = given.pop(alias)
            given.setdefault(canonical, value)
    new_leaves, missing, mismatched = {}, [], []
    for name, (path, leaf) in entries.items():
        if name not in given:
            missing.append(name)
            continue
        arr = np.asarray(given[name])
        torch_shape = _torch_shape(tuple(np.shape(leaf)))
        if arr.shape != torch_shape:
            mismatched.append(f"{name}: state dict has shape {arr.shape}, model expects {torch_shape}{_hint(name)}")
            continue
        if arr.ndim in _INVERSE:
            arr = arr.transpose(_INVERSE[arr.ndim])
        new_leaves[path] = np.asarray(arr, dtype=np.asarray(leaf).dtype)
    for name, value in buffers.items():
        if name in given and np.shape(given[name]) != value.shape:
            mismatched.append(f"{name}: state dict has shape {np.shape(given[name])}, model expects {value.shape}")
    unexpected = [k for k in given if k not in entries and k not in buffers]
    problems = []
    if mismatched:
        problems.append("mis-shaped keys:\n  " + "\n  ".join(mismatched))
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if problems:
        raise StateDictError("state dict does not fit the model; " + "\n".join(problems))
    out = {}
    for collection in variables:
        tree = flatten_dict(dict(variables[collection]))
        for path in tree:
            if (collection,) + path in new_leaves:
                tree[path] = new_leaves[(collection,) + path]
        out[collection] = unflatten_dict(tree)
    return out


def _hint(name: str) -> str:
    if name.endswith(("fc.weight", "fc.bias")):
        return " (the backbone's fc must match backbone_num_classes of the classifier the weights came from)"
    if name.startswith(("cls_score", "bbox_pred")):
        return " (num_classes differs)"
    return ""


def backbone_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
    """The state dict of ``model.backbone.net`` (names like ``layer1.0.conv1.conv.weight``)."""
    return to_state_dict(backbone_variables(variables))


def backbone_variables(variables: Mapping) -> dict:
    """The variables of ``model.backbone.net``, a subtree of the detector's."""
    return {c: variables[c]["backbone"]["net"] for c in variables if "backbone" in variables[c]}


def load_backbone(variables: Mapping, flat: Mapping[str, Any], strict: bool = True) -> dict:
    """Load a ResNet classifier state dict into a detector's ``backbone.net``."""
    net = from_state_dict(backbone_variables(variables), flat, strict=strict)
    out = {c: dict(variables[c]) for c in variables}
    for c in net:
        out[c]["backbone"] = {**variables[c]["backbone"], "net": net[c]}
    return out


# --- torchvision names -------------------------------------------------------

_TV_RESNET_RULES = [
    (r"^conv1\.", "stem.0."),
    (r"^bn1\.", "stem.1."),
    (r"^(layer\d+\.\d+)\.conv([12])\.", r"\1.conv\2.conv."),
    (r"^(layer\d+\.\d+)\.bn([12])\.", r"\1.conv\2.bn."),
    (r"^(layer\d+\.\d+)\.conv3\.", r"\1.conv3.0."),
    (r"^(layer\d+\.\d+)\.bn3\.", r"\1.conv3.1."),
]
_TV_DETECTOR_RULES = [
    (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.", r"backbone.fpn.lateral_convs.\1."),
    (r"^backbone\.fpn\.inner_blocks\.(\d)\.1\.", r"backbone.fpn.lateral_norms.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.", r"backbone.fpn.output_convs.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d)\.1\.", r"backbone.fpn.output_norms.\1."),
    (r"^roi_heads\.box_head\.fc6\.", "fc1."),
    (r"^roi_heads\.box_head\.fc7\.", "fc2."),
    (r"^roi_heads\.box_predictor\.", ""),
]
_TV_RPN_CONV = re.compile(r"^rpn\.head\.conv\.(\d+)\.0\.")
_TV_BOX_HEAD_LAYER = re.compile(r"^roi_heads\.box_head\.(\d+)\.")


def torchvision_faster_rcnn_layout(keys) -> dict[str, int]:
    """The head layout of a torchvision FasterRCNN state dict, from its key names.

    Returns:
      {"rpn_conv_depth": the RPN head's 3x3 convs (1 in v1, 2 in v2),
      "box_head_convs": the conv box head's convs (0 in v1's ``TwoMLPHead``, 4 in v2)}.
    """
    rpn = {int(m.group(1)) for k in keys if (m := _TV_RPN_CONV.match(k))}
    convs = {int(m.group(1)) for k in keys if (m := _TV_BOX_HEAD_LAYER.match(k)) and k.count(".") == 4}
    return {"rpn_conv_depth": max(rpn, default=0) + 1, "box_head_convs": max(convs, default=-1) + 1}


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def rename_torchvision_resnet_key(key: str) -> str:
    """``layer1.0.bn2.weight`` -> ``layer1.0.conv2.bn.weight`` (Lucid's classifier names)."""
    return _rename(key, _TV_RESNET_RULES)


def rename_torchvision_faster_rcnn_key(key: str, rpn_conv_depth: int = 1, box_head_convs: int = 0) -> str:
    """``backbone.body.layer1.0.conv1.weight`` -> ``backbone.net.layer1.0.conv1.conv.weight``, etc.

    The head's names depend on its layout (``torchvision_faster_rcnn_layout``):
    v1's ``rpn.head.conv.0.0`` is ``rpn.head.conv``, and v2's ``rpn.head.conv.{0,1}.0``
    are ``rpn.head.conv.{0,1}``; v2's box head ``roi_heads.box_head.{i}.{0,1}``
    (conv, BatchNorm) is ``box_convs.{i}`` and ``box_norms.{i}``, and the linear
    layers after its flatten are ``fc1`` (and ``fc2``).
    """
    if key.startswith("backbone.body."):
        key = "backbone.net." + rename_torchvision_resnet_key(key[len("backbone.body.") :])
    if m := _TV_RPN_CONV.match(key):
        layer = "rpn.head.conv." if rpn_conv_depth == 1 else f"rpn.head.conv.{m.group(1)}."
        key = layer + key[m.end() :]
    elif m := _TV_BOX_HEAD_LAYER.match(key):
        index, rest = int(m.group(1)), key[m.end() :]
        if index < box_head_convs:
            part, leaf = rest.split(".", 1)
            key = f"box_{'convs' if part == '0' else 'norms'}.{index}.{leaf}"
        elif box_head_convs and (index - box_head_convs) % 2 == 1:
            key = f"fc{(index - box_head_convs + 1) // 2}.{rest}"  # Flatten, then Linear/ReLU pairs
    return _rename(key, _TV_DETECTOR_RULES)


def from_torchvision_resnet(tv_state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Rename a torchvision ResNet-50/101 state dict to Lucid's classifier names.

    The arrays are copies: training the torch model afterwards leaves them as they were.
    """
    return {
        rename_torchvision_resnet_key(k): np.asarray(v).copy()
        for k, v in tv_state_dict.items()
        if not k.endswith(_IGNORED_SUFFIXES)
    }


def from_torchvision_faster_rcnn(tv_state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Rename torchvision ``FasterRCNN`` (ResNet FPN backbone, v1 or v2) keys to Lucid's.

    The result loads with ``from_state_dict(..., strict=False)`` into a model built
    with ``TORCHVISION_FASTER_RCNN`` (v1) or ``TORCHVISION_FASTER_RCNN_V2``; only
    ``backbone.net.fc`` is missing, since torchvision's detector drops the classifier.
    The arrays are copies: training the torch model afterwards leaves them as they were.
    """
    layout = torchvision_faster_rcnn_layout(tv_state_dict)
    return {
        rename_torchvision_faster_rcnn_key(k, **layout): np.asarray(v).copy()
        for k, v in tv_state_dict.items()
        if not k.endswith(_IGNORED_SUFFIXES)
    }


def export_inference_weights(variables: Mapping, path, *, model=None) -> dict[str, np.ndarray]:
    """Write Lucid-named weights for inference (no optimizer state) to a file.

    Args:
      variables: {"params": ..., "batch_stats": ...}, e.g. from a ``TrainState``.
      path: ``.safetensors`` or ``.npz``.
      model: the detector, to write its own buffers (see ``state_dict.to_state_dict``).

    Returns:
      The flat state dict that was written.
    """
    flat = to_state_dict(variables, model=model)
    save_state_dict_file(flat, path)
    return flat
