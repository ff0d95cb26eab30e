"""The state dict: Lucid's names for the detector's variables and back, its buffers,
the errors that name keys and shapes, and the backbone alone (the Training Notes flow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_jax import state_dict
from tests.models.conftest import random_images, tiny_detector


def test_state_dict_of_another_architecture_is_refused(tiny):
    model, variables = tiny
    other = tiny_detector(num_classes=5, stem_width=16)
    other_vars = jax.eval_shape(other.init, jax.random.key(0), random_images(0))
    flat = state_dict.to_state_dict(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), other_vars))
    flat["extra.weight"] = np.zeros(3)
    del flat["fc1.bias"]
    with pytest.raises(state_dict.StateDictError) as err:
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
    with pytest.raises(
        state_dict.StateDictError, match=r"base_anchors: state dict has shape \(2, 4\), model expects \(9, 4\)"
    ):
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
