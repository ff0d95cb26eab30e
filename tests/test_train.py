"""The training step on the tiny detector: one compile per shape, export for
CPU/GPU/TPU, BatchNorm statistics, fine-tuning with frozen stages and AdamW, mixed
precision, batch validation and the skipping of non-finite steps. The optimizer
builder's own tests are in test_optim.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from lucid_jax.compile_count import count_compiles
from lucid_jax.inference import CPU_COMPILER_OPTIONS, compiler_options
from lucid_jax.optim import build_optimizer, param_labels
from lucid_jax.train import create_train_state, make_train_step, validate_batch
from tests.models.conftest import random_images, tiny_detector

NUM_CLASSES = 5


class _CountingModel:
    """The detector, counting how often the train step traces ``apply``."""

    def __init__(self, model):
        self.model = model
        self.num_classes = model.num_classes
        self.traces = 0

    def apply(self, *args, **kwargs):
        self.traces += 1
        return self.model.apply(*args, **kwargs)


def make_batch(seed, batch=2, m=4):
    """Random images and 1..m random boxes per image, padded to m (with garbage labels)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 80, (batch, m, 2))
    wh = rng.uniform(16, 48, (batch, m, 2))
    valid = np.arange(m)[None, :] < rng.integers(1, m + 1, (batch, 1))
    labels = np.where(valid, rng.integers(1, NUM_CLASSES, (batch, m)), -1).astype(np.int32)
    return {
        "images": random_images(seed, batch=batch),
        "boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
        "labels": labels,
        "valid": valid,
    }


def _flat(tree):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in flatten_dict(tree).items()}


def _bits_equal(a, b):
    """Bit-identical pytrees (NaN and inf included)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb)
    )


@pytest.fixture(scope="module")
def trainer(tiny):
    """(counting model, step, initial state): one compiled SGD step shared by the tests,
    always called with the same shapes."""
    model, variables = tiny
    counted = _CountingModel(model)
    step = make_train_step(counted, donate=False)
    state = create_train_state(model, variables, build_optimizer(variables["params"], learning_rate=0.01))
    return counted, step, state


@pytest.fixture(scope="module")
def first_step(trainer):
    """The shared step from the initial state on batch 0, key 1."""
    _, step, state = trainer
    new_state, metrics = step(state, make_batch(0), jax.random.key(1))
    return new_state, jax.device_get(metrics)


# --- compile once, export -------------------------------------------------------------


def test_compiles_once_for_same_shapes(trainer):
    counted, step, state = trainer
    traces = counted.traces
    seen = []
    with count_compiles(step.jitted) as compiles:
        for i in range(5):
            batch = make_batch(100 + i)
            seen.append(batch["valid"].sum(1).tolist())
            state, metrics = step(state, batch, jax.random.key(i))
            assert bool(metrics["finite"])
        jax.block_until_ready(state)
    assert len({str(s) for s in seen}) > 1  # the valid patterns did change
    # one compile, with its one trace, in all: here, unless an earlier test already ran the step
    assert compiles.count == (0 if traces else 1)
    assert counted.traces == traces + compiles.count
    assert int(state.step) == 5


def test_export_for_cpu_cuda_tpu(trainer):
    _, step, state = trainer
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))  # noqa: E731
    args = jax.tree_util.tree_map(spec, (state, make_batch(0), jax.random.key(0)))
    exported = jax.export.export(step.jitted, platforms=("cpu", "cuda", "tpu"))(*args)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    out_state, metrics = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
    assert jax.tree_util.tree_structure(out_state) == jax.tree_util.tree_structure(state)
    assert metrics["total_loss"].shape == () and metrics["finite"].dtype == jnp.bool_
    text = exported.mlir_module()
    assert "callback" not in text  # no host callbacks anywhere in the step


def test_the_cpu_step_is_scheduled_for_memory_and_computes_the_same_bits(trainer):
    """XLA:CPU's memory-minimising order: fewer temporaries than its default, same result."""
    _, step, state = trainer
    assert jax.default_backend() != "cpu" or compiler_options() == CPU_COMPILER_OPTIONS
    args = (state, make_batch(0), jax.random.key(1))
    lowered = step.jitted.lower(*args)
    ours = lowered.compile()
    default = lowered.compile(compiler_options={"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"})
    temp = ours.memory_analysis().temp_size_in_bytes
    assert temp < 0.9 * default.memory_analysis().temp_size_in_bytes  # 32.8 against 40.9 MB here
    assert _bits_equal(ours(*args), default(*args))


# --- BatchNorm -----------------------------------------------------------------------


def test_batchnorm_statistics_follow_the_batch(trainer, first_step):
    torch = pytest.importorskip("torch")
    _, _, state = trainer
    new_state, _ = first_step
    old, new = _flat(state.batch_stats), _flat(new_state.batch_stats)
    unchanged = [k for k in old if np.array_equal(old[k], new[k]) and not k.startswith("backbone/net/fc")]
    assert not unchanged, f"BatchNorm statistics did not move: {unchanged}"
    # the stem's statistics against a float64 conv of the global batch (momentum 0.1 as torch)
    kernel = np.asarray(state.params["backbone"]["net"]["stem"]["0"]["kernel"], np.float64)  # [7, 7, 3, C]
    x = torch.from_numpy(make_batch(0)["images"].astype(np.float64))
    y = torch.nn.functional.conv2d(x, torch.from_numpy(kernel.transpose(3, 2, 0, 1)), stride=2, padding=3).numpy()
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3))
    np.testing.assert_allclose(
        new["backbone/net/stem/1/mean"], 0.9 * old["backbone/net/stem/1/mean"] + 0.1 * mean, rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        new["backbone/net/stem/1/var"], 0.9 * old["backbone/net/stem/1/var"] + 0.1 * var, rtol=1e-4
    )


# --- fine-tuning: frozen BN, frozen stages, AdamW, several real steps ---------------------------


@pytest.fixture(scope="module")
def fine_tuned(tiny):
    """Four AdamW steps of the frozen-BN detector with torchvision's fine-tuning
    freezes (stem and layer1, every BN affine), on one fixed batch and key."""
    _, variables = tiny
    model = tiny_detector(num_classes=NUM_CLASSES, norm_mode="frozen")
    tx = build_optimizer(
        variables["params"], optimizer="adamw", learning_rate=1e-3, trainable_backbone_layers=3, freeze_batchnorm=True
    )
    state0 = create_train_state(model, variables, tx)
    step = make_train_step(model, donate=False)
    state, losses = state0, []
    for _ in range(4):
        state, metrics = step(state, make_batch(3), jax.random.key(7))
        assert bool(metrics["finite"])
        losses.append(float(metrics["total_loss"]))
    return state0, state, losses


def test_frozen_batchnorm_statistics_do_not_move(fine_tuned):
    state0, state, _ = fine_tuned
    assert _bits_equal(state0.batch_stats, state.batch_stats)


def test_frozen_stages_and_batchnorm_affine_do_not_move(fine_tuned):
    state0, state, _ = fine_tuned
    before, after = _flat(state0.params), _flat(state.params)
    bn = {k.rsplit("/", 1)[0] for k in before if k.endswith("/scale")}
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    for k in before:
        parts = k.split("/")
        if parts[:2] == ["backbone", "net"] and parts[2] in ("stem", "layer1"):
            assert k not in moved, f"{k} belongs to a frozen stage but changed"
        if k.rsplit("/", 1)[0] in bn:
            assert k not in moved, f"{k} is a BatchNorm affine parameter but changed"
    for k in (
        "backbone/net/layer2/0/downsample/0/kernel",
        "backbone/net/layer2/0/conv1/conv/kernel",
        "backbone/fpn/lateral_convs.0/kernel",
        "rpn/head/conv/kernel",
        "fc1/kernel",
        "cls_score/bias",
    ):
        assert k in moved, f"{k} is trainable but did not change"


def test_adamw_training_lowers_the_loss(fine_tuned):
    _, _, losses = fine_tuned
    assert losses[-1] < losses[0] - 0.01, losses


# --- mixed precision -------------------------------------------------------------------


def test_bfloat16_step_matches_float32(tiny, trainer, first_step):
    model, variables = tiny
    _, _, state = trainer
    _, metrics32 = first_step
    bf16 = tiny_detector(num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
    new_state, metrics = make_train_step(bf16, donate=False)(state, make_batch(0), jax.random.key(1))
    assert bool(metrics["finite"])
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(new_state.params))
    assert float(metrics["total_loss"]) != float(metrics32["total_loss"])  # it did compute in bfloat16
    for name in ("total_loss", "rpn_cls_loss", "roi_cls_loss"):
        np.testing.assert_allclose(float(metrics[name]), float(metrics32[name]), rtol=0.02, err_msg=name)


# --- bad input -------------------------------------------------------------------------


def _bad(change):
    batch = make_batch(0)
    batch["labels"][~batch["valid"]] = 1
    batch["valid"][:] = True
    change(batch)
    return batch


def _set(key, index, value):
    def change(batch):
        batch[key][index] = value

    return change


@pytest.mark.parametrize(
    "batch, match",
    [
        (_bad(_set("labels", (1, 2), NUM_CLASSES)), r"label 5 of box 2 in image 1 is outside 1\.\.4"),
        (_bad(_set("labels", (0, 1), -1)), r"label -1 of box 1 in image 0 is outside 1\.\.4"),
        (_bad(_set("labels", (0, 0), 0)), r"label 0 of box 0 in image 0 .*0 is background"),
        (_bad(_set("boxes", (1, 3, 2), 0.0)), r"box 3 of image 1 has x2 < x1"),
        (_bad(_set("boxes", (0, 0, 1), 1e3)), r"box 0 of image 0 has x2 < x1 or y2 < y1"),
        (_bad(_set("images", (1, 0, 5, 5), np.nan)), r"images contain 1 NaN"),
        (_bad(_set("images", (0, 2, 0, 0), np.inf)), r"images contain 1 NaN or infinite"),
        (_bad(_set("boxes", (0, 1, 0), np.nan)), r"boxes contain NaN"),
        (_bad(lambda b: b.update(boxes=b["boxes"][:1])), r'batch\["boxes"\] has 1 entries but batch\["images"\] has 2'),
        (_bad(lambda b: b.update(labels=np.concatenate([b["labels"]] * 2))), r'batch\["labels"\] has 4 entries'),
        (
            _bad(lambda b: b.update(image_sizes=np.full((3, 2), 128.0, np.float32))),
            r'batch\["image_sizes"\] has 3 entries',
        ),
    ],
)
def test_bad_batches_are_refused_before_compute(tiny, trainer, batch, match):
    counted, step, state = trainer
    traces = counted.traces
    with pytest.raises(ValueError, match=match):
        step(state, batch, jax.random.key(0))
    assert counted.traces == traces
    # a donating step refuses it too, before it could consume the state
    donating = make_train_step(tiny[0])
    with pytest.raises(ValueError, match=match):
        donating(state, batch, jax.random.key(0))
    assert not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state.params))


def test_garbage_in_padding_is_accepted(trainer):
    _, step, state = trainer
    batch = make_batch(5)
    batch["valid"][:, -1] = False
    batch["labels"][:, -1] = [99, -7]
    batch["boxes"][:, -1] = [[50, 50, 10, 10], [0, 0, -5, 0]]
    validate_batch(batch, NUM_CLASSES)
    _, metrics = step(state, batch, jax.random.key(0))
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["total_loss"]))


def test_jittered_images_that_lose_every_box_train_with_finite_losses(trainer):
    from lucid_jax.data import collate
    from lucid_jax.data.jitter import jitter_preprocess

    _, step, state = trainer
    shape = make_batch(0)["images"].shape  # the shared step's shapes: no recompile
    example = {
        "image": np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8),
        "boxes": np.array([[85, 85, 99, 99]], np.float32),  # a small box in the corner
        "labels": np.array([2]),
    }
    empty = []
    for seed in range(200):  # the jitters that crop the box away
        out = jitter_preprocess(example, np.random.default_rng(seed), canvas=shape[-1])
        if len(out["boxes"]) == 0:
            empty.append(out)
        if len(empty) == shape[0]:
            break
    batch = collate(empty, max_boxes=make_batch(0)["boxes"].shape[1])
    assert not batch["valid"].any()  # all-negative images, every one
    inputs = {k: batch[k] for k in ("images", "boxes", "labels", "valid")}
    inputs["images"] = inputs["images"].transpose(0, 3, 1, 2)  # the shared step takes [B, 3, H, W]
    new_state, metrics = step(state, inputs, jax.random.key(3))
    assert bool(metrics["finite"])
    assert all(np.isfinite(float(v)) for k, v in metrics.items() if k.endswith("loss"))
    assert float(metrics["rpn_reg_loss"]) == 0.0 and float(metrics["roi_reg_loss"]) == 0.0  # nothing to regress
    assert float(metrics["rpn_cls_loss"]) > 0 and float(metrics["roi_cls_loss"]) > 0  # background is still learned
    assert not _bits_equal(new_state.params, state.params)  # and the step was taken


# --- non-finite steps ----------------------------------------------------------------


def test_non_finite_step_keeps_the_state(trainer):
    _, step, state = trainer
    params = jax.tree_util.tree_map(lambda a: a, state.params)
    params["cls_score"]["bias"] = params["cls_score"]["bias"].at[0].set(jnp.inf)
    poisoned = state.replace(params=params)
    new_state, metrics = step(poisoned, make_batch(0), jax.random.key(1))
    assert not bool(metrics["finite"])
    assert not np.isfinite(float(metrics["roi_cls_loss"]))
    assert _bits_equal(new_state.params, poisoned.params)
    assert _bits_equal(new_state.opt_state, poisoned.opt_state)
    assert _bits_equal(new_state.batch_stats, poisoned.batch_stats)
    assert int(new_state.step) == int(poisoned.step)


def test_frozen_parameters_get_no_gradient_work(tiny):
    """With ``frozen=`` the step holds frozen params constant: same update, no grads for them."""
    model, variables = tiny
    labels = param_labels(variables["params"], trainable_backbone_layers=3)
    optimizer = build_optimizer(variables["params"], learning_rate=0.01, trainable_backbone_layers=3)
    batch, rng = make_batch(3), jax.random.key(7)
    plain = make_train_step(model, donate=False)
    skipping = make_train_step(model, donate=False, frozen=labels)
    state = create_train_state(model, variables, optimizer)
    a, ma = plain(state, batch, rng)
    b, mb = skipping(state, batch, rng)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(ma["total_loss"]), float(mb["total_loss"]), rtol=1e-6)
    assert float(mb["grad_norm"]) < float(ma["grad_norm"])  # frozen stages no longer count
    # the compiled step really has less work: fewer convolutions in the backward pass
    count = lambda step: step.jitted.lower(state, batch, rng).as_text().count("stablehlo.convolution")  # noqa: E731
    assert count(skipping) < count(plain)
