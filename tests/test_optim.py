"""The optimizer builder on the tiny detector's parameters: the backbone's
learning-rate multiplier, frozen stages (parameter labels), gradient clipping,
AdamW, and the warmup, step and cosine learning-rate schedules.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from lucid_jax.optim import build_optimizer, learning_rate_schedule, param_labels


def _flat(tree):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in flatten_dict(tree).items()}


# A cross-section of the detector's parameters: every label group, real paths. The
# optimizer tests run eagerly on it, as compiling a whole-tree update per
# optimizer costs more than the arithmetic.
_SECTION = (
    "backbone/net/stem/0/kernel",
    "backbone/net/stem/1/scale",
    "backbone/net/layer1/0/conv2/conv/kernel",
    "backbone/net/layer2/0/conv1/conv/kernel",
    "backbone/net/layer4/0/downsample/1/bias",
    "backbone/fpn/lateral_convs.0/kernel",
    "rpn/head/conv/kernel",
    "fc1/kernel",
    "cls_score/bias",
    "bbox_pred/kernel",
)


@pytest.fixture(scope="module")
def section(tiny):
    flat = flatten_dict(tiny[1]["params"])
    return unflatten_dict({tuple(k.split("/")): flat[tuple(k.split("/"))] for k in _SECTION})


def _grads(params, seed=0, scale=1.0):
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        tree, [jnp.asarray(rng.normal(0, scale, np.shape(p)), jnp.float32) for p in leaves]
    )


def _first_update(params, grads, **kwargs):
    tx = build_optimizer(params, **kwargs)
    updates, _ = tx.update(grads, tx.init(params), params)  # eager: cheaper than a compile per optimizer
    return _flat(updates)


def _is_backbone(path):
    return path.startswith("backbone/")


def test_backbone_lr_mult_scales_only_the_backbone(section):
    params, lr, wd = section, 0.02, 1e-4
    grads = _grads(params)
    full = _first_update(params, grads, learning_rate=lr, weight_decay=wd, backbone_lr_mult=1.0)
    tenth = _first_update(params, grads, learning_rate=lr, weight_decay=wd, backbone_lr_mult=0.1)
    flat_p, flat_g = _flat(params), _flat(grads)
    assert any(_is_backbone(k) for k in full) and any(not _is_backbone(k) for k in full)
    for k in full:
        # SGD's first step with L2 weight decay: -lr * (g + wd * p)
        np.testing.assert_allclose(full[k], -lr * (flat_g[k] + wd * flat_p[k]), rtol=1e-5, atol=1e-9, err_msg=k)
        if _is_backbone(k):
            np.testing.assert_allclose(tenth[k], 0.1 * full[k], rtol=1e-6, atol=0, err_msg=k)
        else:
            np.testing.assert_array_equal(tenth[k], full[k], err_msg=k)


def test_param_labels_freeze_stages_from_the_bottom(tiny):
    _, variables = tiny
    for trainable, frozen in [
        (5, ()),
        (3, ("stem", "layer1")),
        (1, ("stem", "layer1", "layer2", "layer3")),
        (0, ("stem", "layer1", "layer2", "layer3", "layer4")),
    ]:
        labels = _flat(param_labels(variables["params"], trainable_backbone_layers=trainable))
        for k, label in labels.items():
            parts = k.split("/")
            if parts[:2] == ["backbone", "net"] and (parts[2] in frozen or parts[2] == "fc"):
                assert label == "frozen", (trainable, k)
            elif parts[0] == "backbone":
                assert label == "backbone", (trainable, k)
            else:
                assert label == "heads", (trainable, k)
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        param_labels(variables["params"], trainable_backbone_layers=6)


def test_clip_grad_norm_caps_the_update(section):
    params, lr = section, 0.02
    grads = _grads(params, seed=1, scale=10.0)
    norm = float(optax.tree.norm(grads))
    assert norm > 20
    kw = dict(learning_rate=lr, weight_decay=0.0)
    free = _first_update(params, grads, **kw)
    clipped = _first_update(params, grads, clip_grad_norm=1.0, **kw)
    loose = _first_update(params, grads, clip_grad_norm=10 * norm, **kw)
    clipped_norm = math.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in clipped.values()))
    np.testing.assert_allclose(clipped_norm, lr * 1.0, rtol=1e-5)
    for k in free:
        np.testing.assert_allclose(clipped[k], free[k] / norm, rtol=1e-5, atol=1e-12, err_msg=k)
        np.testing.assert_array_equal(loose[k], free[k], err_msg=k)


def test_adamw_first_update(section):
    params, lr, wd = section, 1e-3, 0.05
    grads = _grads(params, seed=2)
    up = _first_update(params, grads, optimizer="adamw", learning_rate=lr, weight_decay=wd, backbone_lr_mult=0.5)
    flat_p, flat_g = _flat(params), _flat(grads)
    for k in up:
        step_lr = lr * (0.5 if _is_backbone(k) else 1.0)
        # bias-corrected first step: m / sqrt(v) = sign(g), plus decoupled decay
        expected = -step_lr * (flat_g[k] / (np.abs(flat_g[k]) + 1e-8) + wd * flat_p[k])
        np.testing.assert_allclose(up[k], expected, rtol=1e-5, atol=1e-10, err_msg=k)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(params, optimizer="lamb")


def test_warmup_step_and_cosine_schedules():
    lr = 0.02
    step = learning_rate_schedule(lr, schedule="step", warmup_steps=100, warmup_factor=1e-3, decay_steps=(1000, 1500))
    expected = {
        0: lr * 1e-3,
        50: lr * (1e-3 + (1 - 1e-3) * 0.5),
        100: lr,
        999: lr,
        1000: lr * 0.1,
        1499: lr * 0.1,
        1500: lr * 0.01,
        10**5: lr * 0.01,
    }
    for t, value in expected.items():
        # float32 arithmetic: optax's warmup computes (init - end) * (1 - t / T) + end
        np.testing.assert_allclose(float(step(t)), value, rtol=1e-5, atol=1e-7 * lr, err_msg=f"step schedule at {t}")
    # decay steps at or before the end of warmup: all in force from its end, like any
    # other decay step in force from its own index on
    for decay_steps, factor in (((100,), 0.1), ((50, 80), 0.01), ((80, 100, 300), 0.01)):
        early = learning_rate_schedule(lr, warmup_steps=100, decay_steps=decay_steps)
        np.testing.assert_allclose(
            float(early(99)), lr * (1e-3 + (1 - 1e-3) * 0.99), rtol=1e-5, err_msg=str(decay_steps)
        )
        np.testing.assert_allclose(
            [float(early(t)) for t in (100, 101, 299)], lr * factor, rtol=1e-5, err_msg=str(decay_steps)
        )
        np.testing.assert_allclose(float(early(300)), lr * 0.001 if len(decay_steps) == 3 else lr * factor, rtol=1e-5)
    cosine = learning_rate_schedule(lr, schedule="cosine", total_steps=1100, warmup_steps=100)
    expected = {
        0: lr * 1e-3,
        100: lr,
        350: lr * 0.5 * (1 + math.cos(math.pi * 0.25)),
        600: lr / 2,
        1100: 0.0,
        2000: 0.0,
    }
    for t, value in expected.items():
        np.testing.assert_allclose(
            float(cosine(t)), value, rtol=1e-5, atol=1e-7 * lr, err_msg=f"cosine schedule at {t}"
        )
    constant = learning_rate_schedule(lr, schedule="constant")
    assert float(constant(0)) == float(constant(10**6)) == np.float32(lr)
    with pytest.raises(ValueError, match="schedule"):
        learning_rate_schedule(lr, schedule="linear")


def test_warmup_reaches_the_optimizer(section):
    params, lr = section, 0.02
    grads = _grads(params)
    warm = _first_update(params, grads, learning_rate=lr, weight_decay=0.0, warmup_steps=10, warmup_factor=0.01)
    flat_g = _flat(grads)
    for k in warm:
        np.testing.assert_allclose(warm[k], -lr * 0.01 * flat_g[k], rtol=1e-5, err_msg=k)


def test_backbone_classifier_is_never_optimised_in_detection(tiny):
    for layers in (5, 3, 0):
        labels = flatten_dict(param_labels(tiny[1]["params"], trainable_backbone_layers=layers))
        assert labels[("backbone", "net", "fc", "kernel")] == "frozen"
        assert labels[("backbone", "net", "layer4", "0", "conv1", "conv", "kernel")] == (
            "backbone" if layers else "frozen"
        )
        assert labels[("fc1", "kernel")] == "heads"
