"""The state dict: Lucid's names for the detector's variables and back, its buffers,
the errors that name keys and shapes, the backbone alone (the Training Notes flow),
torchvision's ResNet names, and the exported inference weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_jax import state_dict
from lucid_jax.models import resnet_50
from lucid_jax.state_dict import export_inference_weights
from lucid_jax.state_dict_files import StateDictError, load_state_dict_file, save_state_dict_file
from tests.models.conftest import TV_REASON, random_images, tiny_detector
from tests.test_checkpoint import assert_trees_identical, fresh_state, train


def test_state_dict_of_another_architecture_is_refused(tiny):
    model, variables = tiny
    other = tiny_detector(num_classes=5, stem_width=16)
    other_vars = jax.eval_shape(other.init, jax.random.key(0), random_images(0))
    flat = state_dict.to_state_dict(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), other_vars))
    flat["extra.weight"] = np.zeros(3)
    del flat["fc1.bias"]
    with pytest.raises(StateDictError) as err:
        state_dict.from_state_dict(variables, flat)
    msg = str(err.value)
    assert "backbone.net.stem.0.weight: state dict has shape (16, 3, 7, 7), model expects (8, 3, 7, 7)" in msg
    assert "missing keys (1): fc1.bias" in msg and "unexpected keys (1): extra.weight" in msg


def test_non_default_anchors_and_stds_round_trip_their_buffers():
    model = tiny_detector(
        anchor_sizes=((20,), (40,), (80,), (160,)),
        aspect_ratios=(1.0, 2.0),
        round_anchors=True,
        bbox_reg_stds=(0.05, 0.05, 0.1, 0.1),
    )
    variables = jax.jit(model.init)(jax.random.key(0), random_images(0))
    flat = state_dict.to_state_dict(variables, model=model)
    # 20 px anchors at height/width 1 and 2, centred and rounded: w = 20 / sqrt(2) = 14.14, h = 28.28
    expected = np.array([[-10, -10, 10, 10], [-7, -14, 7, 14]], np.float32)
    np.testing.assert_array_equal(flat["anchor_generator.base_anchors"], expected)
    np.testing.assert_array_equal(flat["rpn.anchor_generator.base_anchors"], expected)
    np.testing.assert_array_equal(flat["bbox_reg_stds"], np.float32([0.05, 0.05, 0.1, 0.1]))
    again = state_dict.to_state_dict(state_dict.from_state_dict(variables, flat, model=model), model=model)
    assert set(again) == set(flat)
    for name in flat:
        np.testing.assert_array_equal(again[name], flat[name], err_msg=name)
    # the default configuration has 9 anchors per location (3 octave sizes x 3 ratios): refused by name
    with pytest.raises(StateDictError, match=r"base_anchors: state dict has shape \(2, 4\), model expects \(9, 4\)"):
        state_dict.from_state_dict(variables, flat, model=tiny_detector())


def test_training_notes_flow(tiny):
    """Seed: take model.backbone.net, train it as a classifier, load its state dict back."""
    model, variables = tiny
    net = model.backbone.net
    net_vars = state_dict.backbone_variables(variables)
    x = random_images(4, batch=2, size=64)
    labels = jnp.array([1, 7])

    @jax.jit
    def loss_fn(params):
        logits, updates = net.apply(
            {"params": params, "batch_stats": net_vars["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels]), updates

    (loss0, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(net_vars["params"])
    trained = {"params": jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, net_vars["params"], grads), **updates}
    assert float(loss_fn(trained["params"])[0]) < float(loss0)
    saved = state_dict.to_state_dict(trained)
    assert saved["stem.0.weight"].shape == (8, 3, 7, 7) and "fc.weight" in saved
    loaded = state_dict.load_backbone(variables, saved)
    np.testing.assert_array_equal(
        np.asarray(loaded["params"]["backbone"]["net"]["layer2"]["0"]["conv2"]["conv"]["kernel"]),
        np.asarray(trained["params"]["layer2"]["0"]["conv2"]["conv"]["kernel"]),
    )
    np.testing.assert_array_equal(
        np.asarray(loaded["batch_stats"]["backbone"]["net"]["stem"]["1"]["mean"]),
        np.asarray(trained["batch_stats"]["stem"]["1"]["mean"]),
    )
    # the rest of the detector is untouched
    np.testing.assert_array_equal(
        np.asarray(loaded["params"]["fc1"]["kernel"]), np.asarray(variables["params"]["fc1"]["kernel"])
    )
    classify = jax.jit(net.apply)
    logits = classify(state_dict.backbone_variables(loaded), x)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(classify(trained, x)), rtol=1e-6)


def test_torchvision_resnet50_file_imports_into_our_resnet(tmp_path):
    torch = pytest.importorskip("torch", reason=TV_REASON)
    torchvision = pytest.importorskip("torchvision", reason=TV_REASON)
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = tv(torch.from_numpy(x)).numpy()
    model = resnet_50()
    template = jax.tree_util.tree_map(
        lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(model.init, jax.random.key(0), x)
    )
    flat = state_dict.from_torchvision_resnet(load_state_dict_file(path))
    variables = state_dict.from_state_dict(template, flat, strict=True)
    np.testing.assert_allclose(
        np.asarray(jax.jit(model.apply)(variables, x)), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )
    # and the same weights through .npz
    save_state_dict_file(flat, tmp_path / "r50.npz")
    again = state_dict.from_state_dict(template, load_state_dict_file(tmp_path / "r50.npz"))
    np.testing.assert_array_equal(
        np.asarray(again["params"]["layer3"]["5"]["conv2"]["conv"]["kernel"]),
        np.asarray(variables["params"]["layer3"]["5"]["conv2"]["conv"]["kernel"]),
    )


def test_torchvision_conversions_copy_so_torch_training_afterwards_changes_nothing():
    torch = pytest.importorskip("torch", reason=TV_REASON)
    torchvision = pytest.importorskip("torchvision", reason=TV_REASON)
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    detector = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    for tv, convert, name in [
        (resnet, state_dict.from_torchvision_resnet, "layer1.0.conv1.weight"),
        (detector, state_dict.from_torchvision_faster_rcnn, "backbone.body.layer1.0.conv1.weight"),
    ]:
        flat = convert(tv.state_dict())
        before = {k: v.copy() for k, v in flat.items()}
        with torch.no_grad():  # what an optimizer step does: in place
            for p in tv.parameters():
                p.add_(1.0)
        assert tv.state_dict()[name].abs().min() > 0  # the torch tensors did change
        for k, v in flat.items():
            np.testing.assert_array_equal(v, before[k], err_msg=k)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_export_inference_weights_round_trip(tmp_path, suffix):
    state = train(fresh_state(), jax.random.key(0), 1)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    path = tmp_path / f"weights{suffix}"
    export_inference_weights(variables, path)
    loaded = load_state_dict_file(path)
    expected = state_dict.to_state_dict(variables)
    assert set(loaded) == set(expected) and "hidden.weight" in loaded and "bn.running_var" in loaded
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value)
    restored = state_dict.from_state_dict(variables, loaded)
    assert_trees_identical(restored["params"], variables["params"])


def test_v2_layers_have_lucid_style_names_and_round_trip_exactly(tmp_path):
    """The FPN's norms, the RPN's two convs and the conv box head, through a file and back."""
    model = tiny_detector(
        fpn_norm_mode="batch", rpn_conv_depth=2, box_head_convs=(16, 16), box_head_fcs=1, box_head_norm_mode="batch"
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0), random_images(0))
    rng = np.random.default_rng(3)
    variables = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    flat = state_dict.to_state_dict(variables, model=model)
    new = {
        k
        for k in flat
        if k.startswith(("backbone.fpn.lateral_norms", "backbone.fpn.output_norms", "box_", "rpn.head.conv"))
    }
    assert {k for k in new if k.startswith(("box_", "rpn"))} == {
        *(f"rpn.head.conv.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")),
        *(f"box_convs.{i}.weight" for i in (0, 1)),
        *(f"box_norms.{i}.{p}" for i in (0, 1) for p in ("weight", "bias", "running_mean", "running_var")),
    }
    assert len(new) == 2 * 4 * 4 + 4 + 2 + 8  # 8 FPN norms x 4 tensors
    assert "fc2.weight" not in flat and flat["fc1.weight"].shape == (64, 16 * 7 * 7)
    assert "backbone.fpn.lateral_convs.0.bias" not in flat  # a conv followed by a norm has no bias
    save_state_dict_file(flat, tmp_path / "v2.safetensors")
    back = state_dict.from_state_dict(shapes, load_state_dict_file(tmp_path / "v2.safetensors"), model=model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)
