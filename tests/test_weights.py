"""load_pretrained: the four kinds of weights, the report's accounting, the heads that
are skipped and the mismatches that are errors; then ``lucid-jax train --init`` from
real torchvision files, checked tensor for tensor in the checkpoint it writes."""

import builtins
import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from lucid_jax import state_dict as sd
from lucid_jax import weights
from lucid_jax.checkpoint import Checkpointer
from lucid_jax.models import get_model
from lucid_jax.state_dict_files import StateDictError
from tests.models.conftest import TV_REASON, tiny_detector


def _zeros(model, size=64):
    """Zero variables with the model's structure, without compiling anything."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 3, size, size), np.float32))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _random_flat(variables, seed, model=None):
    rng = np.random.default_rng(seed)
    flat = sd.to_state_dict(variables, model=model)
    return {k: (rng.standard_normal(v.shape) + 1).astype(v.dtype) for k, v in flat.items()}


def _check_accounting(report, file_keys, variables):
    """Every file key is loaded, skipped or apart; every model key loaded or left initial."""
    model_keys = set(sd.torch_layout_shapes(variables))
    parts = [set(report.loaded), set(report.skipped), *map(set, report.apart.values())]
    assert sum(len(p) for p in parts) == len(file_keys)
    assert set().union(*parts) == set(file_keys)
    targets = list(report.loaded.values())
    assert len(targets) == len(set(targets))
    assert set(targets) | set(report.left_initial) == model_keys
    assert not set(targets) & set(report.left_initial)


def _value(variables, name):
    """A model key's array in the file's (torch) layout."""
    return sd.to_state_dict(variables)[name]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_detector(num_classes=5)
    return model, _zeros(model)


def test_lucid_detector(tiny):
    model, variables = tiny
    flat = _random_flat(variables, 1, model)
    new, report = weights.load_pretrained(variables, flat, model=model)
    assert report.kind == weights.LUCID_DETECTOR and report.target == "detector"
    _check_accounting(report, flat, variables)
    assert report.skipped == {} and report.left_initial == []
    assert len(report.apart["buffers"]) == 4
    assert sorted(report.apart["stem_aliases"]) == sorted(k for k in flat if k.startswith("backbone.stem."))
    for name in (
        "backbone.net.layer2.0.conv2.conv.weight",
        "rpn.head.conv.weight",
        "fc1.weight",
        "backbone.net.layer4.0.conv3.1.running_var",
    ):
        np.testing.assert_array_equal(_value(new, name), flat[name])


def test_lucid_stem_alias_stands_in_when_the_canonical_stem_is_absent(tiny):
    model, variables = tiny
    flat = _random_flat(variables, 2, model)
    for k in [k for k in flat if k.startswith("backbone.net.stem.")]:
        del flat[k]
    new, report = weights.load_pretrained(variables, flat, model=model)
    _check_accounting(report, flat, variables)
    assert report.left_initial == [] and report.apart["stem_aliases"] == []
    np.testing.assert_array_equal(_value(new, "backbone.net.stem.0.weight"), flat["backbone.stem.0.weight"])


def test_lucid_backbone_goes_into_backbone_net(tiny):
    model, variables = tiny
    flat = sd.to_state_dict(sd.backbone_variables(_zeros(model)))
    flat = {k: np.full(v.shape, 0.5, v.dtype) for k, v in flat.items()}
    new, report = weights.load_pretrained(variables, flat, model=model)
    assert report.kind == weights.LUCID_BACKBONE and report.target == "backbone.net"
    _check_accounting(report, flat, variables)
    assert all(v == "backbone.net." + k for k, v in report.loaded.items())
    assert report.left_initial and all(not k.startswith("backbone.net.") for k in report.left_initial)
    np.testing.assert_array_equal(_value(new, "backbone.net.layer3.0.conv1.conv.weight"), 0.5)


def test_class_count_heads_of_another_size_are_skipped_with_both_shapes(tiny):
    model, variables = tiny
    other = tiny_detector(num_classes=9)
    flat = _random_flat(_zeros(other), 3, other)
    new, report = weights.load_pretrained(variables, flat, model=model)
    _check_accounting(report, flat, variables)
    assert set(report.skipped) == {"cls_score.weight", "cls_score.bias", "bbox_pred.weight", "bbox_pred.bias"}
    assert report.skipped["cls_score.weight"] == (
        "class-count head of another size: file has shape (9, 64), model expects (5, 64)"
    )
    assert set(report.left_initial) == set(report.skipped)
    np.testing.assert_array_equal(_value(new, "cls_score.weight"), 0)


def test_rpn_head_with_another_anchor_count_is_skipped(tiny):
    model, variables = tiny
    other = tiny_detector(num_classes=5, anchor_sizes=((32,), (64,), (128,), (256,)))  # 3 anchors, not 9
    flat = _random_flat(_zeros(other), 4, other)
    flat.pop("anchor_generator.base_anchors")
    _, report = weights.load_pretrained(variables, flat, model=model)
    _check_accounting(report, flat, variables)
    assert set(report.skipped) == {f"rpn.head.{n}.{p}" for n in ("cls_logits", "bbox_pred") for p in ("weight", "bias")}
    assert "RPN head with another anchor count: file has shape (3, 32, 1, 1), model expects (9, 32, 1, 1)" in (
        report.skipped.values()
    )


def test_any_other_mismatch_raises_naming_key_and_shapes(tiny):
    model, variables = tiny
    flat = sd.to_state_dict(sd.backbone_variables(variables))
    flat["layer2.0.conv1.conv.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    with pytest.raises(
        StateDictError,
        match=r"layer2\.0\.conv1\.conv\.weight .*file has shape \(3, 3, 1, 1\), "
        r"model expects \(16, 32, 1, 1\)",
    ):
        weights.load_pretrained(variables, flat, model=model)


def test_unknown_kind_lists_keys(tiny):
    with pytest.raises(StateDictError, match=r"cannot tell .*3 keys: a\.weight, b\.bias, c"):
        weights.load_pretrained(tiny[1], {"a.weight": np.zeros(1), "b.bias": np.zeros(1), "c": np.zeros(1)})


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_bytes(b"x")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(StateDictError, match=r"needs torch \(pip install torch\), or convert it to \.safetensors"):
        weights.load_pretrained({}, tmp_path / "w.pth")


def test_booby_trapped_pth_runs_nothing(tmp_path):
    pytest.importorskip("torch", reason=TV_REASON)
    marker = tmp_path / "ran"

    class Trap:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv1.weight": Trap()}, f)
    with pytest.raises(StateDictError, match="weights_only"):
        weights.load_pretrained({}, tmp_path / "evil.pth")
    assert not marker.exists()


def test_run_directory_is_a_lucid_detector(tiny, tmp_path):
    from lucid_jax.optim import build_optimizer
    from lucid_jax.train import create_train_state

    model, variables = tiny
    flat = _random_flat(variables, 5, model)
    trained = sd.from_state_dict(variables, flat, model=model)
    state = create_train_state(model, trained, build_optimizer(trained["params"]))
    with Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
        ckpt.save(3, state)
    new, report = weights.load_pretrained(variables, tmp_path / "run", model=model)
    assert report.kind == weights.LUCID_DETECTOR and report.source.endswith("(lucid_jax run)")
    assert report.left_initial == []
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), new, trained)
    assert all(jax.tree_util.tree_leaves(same))


# --- real torchvision files ---------------------------------------------------


def _torchvision():
    torch = pytest.importorskip("torch", reason=TV_REASON)
    torchvision = pytest.importorskip("torchvision", reason=TV_REASON)
    return torch, torchvision


def _perturbed(torch, module, seed):
    """A state dict whose every float tensor differs from its init (BN statistics included)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            v = v + 0.01 * torch.randn(v.shape, generator=g)
            v = v.abs() if "running_var" in k else v
        out[k] = v
    return out


def _torchvision_faster_rcnn(num_classes, seed, builder="fasterrcnn_resnet50_fpn"):
    """A perturbed torchvision ``builder`` (v1 or v2) state dict with ``num_classes``."""
    torch, torchvision = _torchvision()
    torch.manual_seed(0)
    tv = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None, num_classes=num_classes)
    return _perturbed(torch, tv, seed)


def test_torchvision_resnet_into_resnet50_detector():
    torch, torchvision = _torchvision()
    torch.manual_seed(0)
    tv = _perturbed(torch, torchvision.models.resnet50(weights=None), 1)
    model = get_model("faster_rcnn_resnet_50_fpn", num_classes=4)
    variables = _zeros(model)
    new, report = weights.load_pretrained(variables, tv, model=model)
    # 53 convs (stem, 16 blocks x 3, 4 downsamples) x (weight + 4 BN tensors) + fc's 2; FPN, RPN, box head: 30
    assert report.summary() == "torchvision ResNet -> backbone.net: 267 loaded, 0 skipped, 30 left initial"
    _check_accounting(report, tv, variables)
    assert len(report.apart["counters"]) == 53
    np.testing.assert_array_equal(
        _value(new, "backbone.net.layer3.5.conv2.bn.running_var"), tv["layer3.5.bn2.running_var"]
    )
    np.testing.assert_array_equal(_value(new, "backbone.net.stem.0.weight"), tv["conv1.weight"])


@pytest.mark.parametrize("file_classes, skipped", [(4, 0), (91, 4)])
def test_torchvision_faster_rcnn_into_its_architecture(file_classes, skipped):
    flat = _torchvision_faster_rcnn(file_classes, seed=2)
    model = get_model("faster_rcnn_resnet_50_fpn_torchvision", num_classes=4)
    variables = _zeros(model)
    new, report = weights.load_pretrained(variables, flat, model=model)
    _check_accounting(report, flat, variables)
    assert report.kind == weights.TORCHVISION_FASTER_RCNN and report.target == "detector"
    assert len(report.skipped) == skipped
    heads = {f"{n}.{p}" for n in ("cls_score", "bbox_pred") for p in ("weight", "bias")}
    assert set(report.skipped) == {"roi_heads.box_predictor." + k for k in heads if skipped}
    assert set(report.left_initial) == {"backbone.net.fc.weight", "backbone.net.fc.bias", *(heads if skipped else ())}
    np.testing.assert_array_equal(_value(new, "rpn.head.cls_logits.weight"), flat["rpn.head.cls_logits.weight"])
    np.testing.assert_array_equal(
        _value(new, "backbone.fpn.output_convs.3.weight"), flat["backbone.fpn.layer_blocks.3.0.weight"]
    )


def test_torchvision_faster_rcnn_into_lucids_default_skips_the_rpn_head():
    torch, torchvision = _torchvision()
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    model = get_model("faster_rcnn_resnet_50_fpn", num_classes=4)  # 9 anchors per location, not 3
    variables = _zeros(model)
    _, report = weights.load_pretrained(variables, tv.state_dict(), model=model)
    _check_accounting(report, tv.state_dict(), variables)
    assert sorted(report.skipped) == [
        "rpn.head.bbox_pred.bias",
        "rpn.head.bbox_pred.weight",
        "rpn.head.cls_logits.bias",
        "rpn.head.cls_logits.weight",
    ]


@pytest.mark.parametrize("file_classes, skipped", [(4, 0), (91, 4)])
def test_torchvision_v2_into_its_architecture(file_classes, skipped):
    flat = _torchvision_faster_rcnn(file_classes, 3, "fasterrcnn_resnet50_fpn_v2")
    assert weights.detect_kind(flat) == weights.TORCHVISION_FASTER_RCNN_V2
    model = get_model("faster_rcnn_resnet_50_fpn_v2_torchvision", num_classes=4)
    variables = _zeros(model)
    new, report = weights.load_pretrained(variables, flat, model=model)
    _check_accounting(report, flat, variables)
    # body 53 convs x 5 tensors; FPN 8 convs + 8 norms x 4; RPN 2 convs + 2 heads, 2 tensors each;
    # box head 4 convs + 4 norms x 4 and fc1's 2; the predictor's 4
    assert len(report.loaded) == 265 + 8 + 32 + 8 + 4 + 16 + 2 + 4 - skipped
    assert report.summary() == f"torchvision FasterRCNN v2 -> detector: {339 - skipped} loaded, {skipped} skipped, " + (
        f"{2 + skipped} left initial"
    )
    heads = {f"{n}.{p}" for n in ("cls_score", "bbox_pred") for p in ("weight", "bias")}
    assert set(report.skipped) == {"roi_heads.box_predictor." + k for k in heads if skipped}
    assert all(v.startswith("class-count head of another size") for v in report.skipped.values())
    for ours, theirs in [
        ("backbone.fpn.lateral_convs.2.weight", "backbone.fpn.inner_blocks.2.0.weight"),
        ("backbone.fpn.lateral_norms.2.running_var", "backbone.fpn.inner_blocks.2.1.running_var"),
        ("backbone.fpn.output_norms.0.weight", "backbone.fpn.layer_blocks.0.1.weight"),
        ("rpn.head.conv.1.bias", "rpn.head.conv.1.0.bias"),
        ("box_convs.3.weight", "roi_heads.box_head.3.0.weight"),
        ("box_norms.1.running_mean", "roi_heads.box_head.1.1.running_mean"),
        ("fc1.weight", "roi_heads.box_head.5.weight"),
    ]:
        np.testing.assert_array_equal(_value(new, ours), flat[theirs], err_msg=ours)


def test_init_recipe_trains_v2s_batchnorm_and_freezes_v1s():
    """``--init`` with v2 weights trains BatchNorm (v2's recipe) unless --norm-mode is given."""
    from lucid_jax.jobs.config import TrainConfig, apply_init_recipe

    config, recipe = apply_init_recipe(TrainConfig(), weights.TORCHVISION_FASTER_RCNN_V2, given=set())
    assert recipe == {"norm_mode": "batch", "trainable_backbone_layers": 3} and config.norm_mode == "batch"
    _, recipe = apply_init_recipe(TrainConfig(), weights.TORCHVISION_FASTER_RCNN, given=set())
    assert recipe == {"norm_mode": "frozen", "trainable_backbone_layers": 3}
    config, recipe = apply_init_recipe(
        TrainConfig(norm_mode="frozen"), weights.TORCHVISION_FASTER_RCNN_V2, given={"norm_mode"}
    )
    assert recipe == {"trainable_backbone_layers": 3} and config.norm_mode == "frozen"
    # --norm-mode sets every norm of a v2 model: the body's, the FPN's and the box head's
    model = get_model("faster_rcnn_resnet_50_fpn_v2_torchvision", norm_mode="frozen")
    assert (model.backbone.net.norm_mode, model.backbone.norm_mode, model.roi_heads.norm_mode) == ("frozen",) * 3


def test_v2_file_never_loads_as_v1_nor_the_reverse():
    """The v2 fc1 has v1's fc6 shape (1024 x 12544): only the heads' layout tells them apart."""
    v2 = _torchvision_faster_rcnn(91, 4, "fasterrcnn_resnet50_fpn_v2")
    v1 = _torchvision_faster_rcnn(91, seed=4)
    assert weights.detect_kind(v1) == weights.TORCHVISION_FASTER_RCNN
    v1_model = get_model("faster_rcnn_resnet_50_fpn_torchvision")
    with pytest.raises(StateDictError) as error:
        weights.load_pretrained(_zeros(v1_model), v2, model=v1_model)
    assert str(error.value) == (
        "mapping: the torchvision FasterRCNN v2's heads are not this model's: the file alone has "
        "backbone.fpn.lateral_norms.0, backbone.fpn.lateral_norms.1, backbone.fpn.lateral_norms.2 (+15 more); "
        "the model alone has fc2, rpn.head.conv; build faster_rcnn_resnet_50_fpn_v2_torchvision "
        "(or its R101 twin) for these weights"
    )
    v2_model = get_model("faster_rcnn_resnet_50_fpn_v2_torchvision")
    with pytest.raises(StateDictError, match="build faster_rcnn_resnet_50_fpn_torchvision"):
        weights.load_pretrained(_zeros(v2_model), v1, model=v2_model)
    # Nor does our own v2 detector's Lucid-named file load into a v1 model.
    flat, _ = weights.load_pretrained(_zeros(v2_model), v2, model=v2_model)
    with pytest.raises(StateDictError, match="the Lucid detector's heads are not this model's"):
        weights.load_pretrained(_zeros(v1_model), sd.to_state_dict(flat), model=v1_model)


# --- the command line ---------------------------------------------------------------


def _train(*args, timeout=600):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lucid_jax.cli",
            "train",
            "--data",
            "shapes",
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--image-size",
            "64",
            "--shapes-train-examples",
            "4",
            "--eval-every",
            "0",
            "--no-progress",
            "--num-workers",
            "1",
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _checkpoint_flat(out):
    with Checkpointer(out / "checkpoints", read_only=True) as ckpt:
        assert ckpt.latest_step() == 1
        return sd.to_state_dict(ckpt.restore_variables())


def test_cli_init_from_torchvision_resnet101_pth(tmp_path):
    torch, torchvision = _torchvision()
    torch.manual_seed(0)
    tv = _perturbed(torch, torchvision.models.resnet101(weights=None), 3)
    torch.save(tv, tmp_path / "resnet101.pth")
    out = tmp_path / "run"
    stdout = _train(
        "--model",
        "faster_rcnn_resnet_101_fpn",
        "--init",
        tmp_path / "resnet101.pth",
        "--trainable-backbone-layers",
        "0",
        "--out",
        out,
    )
    assert "init: fine-tuning recipe --norm-mode frozen" in stdout
    assert "init: torchvision ResNet -> backbone.net: 522 loaded, 0 skipped, 30 left initial" in stdout
    report = json.loads((out / "init_report.json").read_text())
    assert len(report["loaded"]) == 522 and len(report["apart"]["counters"]) == 104
    saved = _checkpoint_flat(out)
    for key, name in report["loaded"].items():  # after a training step, the backbone is exactly the file's
        np.testing.assert_array_equal(saved[name], tv[key].numpy(), err_msg=name)


@pytest.mark.parametrize("file_classes", [4, 91])
def test_cli_init_from_torchvision_faster_rcnn(tmp_path, file_classes):
    torch, _ = _torchvision()
    flat = _torchvision_faster_rcnn(file_classes, seed=4)
    torch.save(flat, tmp_path / "frcnn.pth")
    out = tmp_path / "run"
    stdout = _train(
        "--model",
        "faster_rcnn_resnet_50_fpn_torchvision",
        "--init",
        tmp_path / "frcnn.pth",
        "--trainable-backbone-layers",
        "0",
        "--out",
        out,
    )
    skipped = 0 if file_classes == 4 else 4  # shapes has 3 classes + background
    assert "init: torchvision FasterRCNN -> detector: " in stdout
    report = json.loads((out / "init_report.json").read_text())
    assert len(report["skipped"]) == skipped and len(report["left_initial"]) == 2 + skipped
    assert f"{len(report['loaded'])} loaded, {skipped} skipped, {2 + skipped} left initial" in stdout
    saved = _checkpoint_flat(out)
    body = {k: n for k, n in report["loaded"].items() if k.startswith("backbone.body.")}
    assert len(body) == 265
    for key, name in body.items():
        np.testing.assert_array_equal(saved[name], flat[key].numpy(), err_msg=name)
    # Run again on the finished run: it resumes from its own checkpoint and says --init is ignored.
    stdout = _train("--model", "faster_rcnn_resnet_50_fpn_torchvision", "--init", tmp_path / "frcnn.pth", "--out", out)
    assert "resuming from the run's own checkpoint; --init is ignored" in stdout
    assert "init: torchvision" not in stdout


def test_cli_init_from_torchvision_v2_and_its_refusal_by_a_v1_model(tmp_path):
    from tests.cli_run import run_cli

    torch, _ = _torchvision()
    flat = _torchvision_faster_rcnn(91, 5, "fasterrcnn_resnet50_fpn_v2")
    torch.save(flat, tmp_path / "v2.pth")
    out = tmp_path / "run"
    model = "faster_rcnn_resnet_50_fpn_v2_torchvision"
    stdout = _train("--model", model, "--init", tmp_path / "v2.pth", "--trainable-backbone-layers", "0", "--out", out)
    assert "init: fine-tuning recipe --norm-mode batch" in stdout
    assert "init: torchvision FasterRCNN v2 -> detector: 335 loaded, 4 skipped, 6 left initial" in stdout
    saved = _checkpoint_flat(out)
    report = json.loads((out / "init_report.json").read_text())
    for key in ("backbone.body.layer3.2.conv2.weight", "backbone.body.conv1.weight"):  # frozen: the file's, exactly
        np.testing.assert_array_equal(saved[report["loaded"][key]], flat[key].numpy(), err_msg=key)
    assert report["loaded"]["roi_heads.box_head.2.1.running_var"] == "box_norms.2.running_var"
    code, _, err = run_cli(
        "train", "--data", "shapes", "--model", "faster_rcnn_resnet_50_fpn_torchvision", "--init", tmp_path / "v2.pth",
        "--steps", "1", "--image-size", "64", "--out", tmp_path / "v1",
    )  # fmt: skip
    assert code == 1 and err.count("\n") == 1, err
    assert "the torchvision FasterRCNN v2's heads are not this model's" in err
    assert "build faster_rcnn_resnet_50_fpn_v2_torchvision" in err
