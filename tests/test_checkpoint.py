"""Checkpoints: bit-identical round trips, retention, resume, corruption, mismatch."""

import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lucid_jax import checkpoint, manifest
from lucid_jax.checkpoint import Checkpointer
from lucid_jax.manifest import MANIFEST_NAME, CheckpointError
from lucid_jax.train import create_train_state


class TinyMLP(nn.Module):
    """Dense -> BatchNorm -> ReLU -> Dropout -> Dense: params, batch_stats and an RNG."""

    hidden: int = 8
    extra_layer: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.hidden, name="hidden")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
        if self.extra_layer:
            x = nn.Dense(self.hidden, name="extra")(x)
        return nn.Dense(2, name="out")(x)


X = jax.random.normal(jax.random.key(10), (16, 4))
Y = jax.random.normal(jax.random.key(11), (16, 2))


def fresh_state(seed: int = 0, **model_kwargs):
    model = TinyMLP(**model_kwargs)
    variables = model.init(jax.random.key(seed), X)
    return create_train_state(model, variables, optax.sgd(0.1, momentum=0.9))


@jax.jit
def train_step(state, rng):
    # fold_in(rng, step) makes the dropout mask a function of the step alone, so a
    # resumed run draws the same masks as an uninterrupted one.
    dropout_key = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        out, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            X,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        return jnp.mean((out - Y) ** 2), updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])


def train(state, rng, steps: int):
    for _ in range(steps):
        state = train_step(state, rng)
    return state


def assert_trees_identical(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def saved_once(directory, steps: int = 2):
    """A Checkpointer holding one step after ``steps`` training steps."""
    rng = jax.random.key(42)
    state = train(fresh_state(), rng, steps)
    ckpt = Checkpointer(directory)
    ckpt.save(int(state.step), state, rng, metadata={"model": "tiny_mlp", "class_names": ["a", "b"]})
    return ckpt, state, rng


def test_round_trip_is_bit_identical(tmp_path):
    ckpt, state, rng = saved_once(tmp_path / "ckpt")
    momentum = jax.tree.leaves(state.opt_state)
    assert any(np.abs(np.asarray(m)).sum() > 0 for m in momentum), "momentum should be non-trivial"
    with Checkpointer(tmp_path / "ckpt") as reader:
        restored, restored_rng, metadata = reader.restore(fresh_state(seed=7))
    ckpt.close()
    assert_trees_identical(restored.params, state.params)
    assert_trees_identical(restored.batch_stats, state.batch_stats)
    assert_trees_identical(restored.opt_state, state.opt_state)
    assert int(restored.step) == int(state.step) == 2
    assert jax.dtypes.issubdtype(restored_rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored_rng), jax.random.key_data(rng))
    assert metadata == {"model": "tiny_mlp", "class_names": ["a", "b"]}


def test_legacy_uint32_key_restores_as_typed_key(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, fresh_state(), jax.random.PRNGKey(3))
        _, rng, _ = ckpt.restore(fresh_state())
    np.testing.assert_array_equal(jax.random.key_data(rng), np.asarray(jax.random.PRNGKey(3)))


def test_resume_is_bit_identical_to_uninterrupted_training(tmp_path):
    rng = jax.random.key(5)
    straight = train(fresh_state(), rng, 6)

    first_half = train(fresh_state(), rng, 3)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(int(first_half.step), first_half, rng)
    del first_half
    with Checkpointer(tmp_path) as ckpt:  # as a new process would: new manager, unrelated template
        resumed, resumed_rng, _ = ckpt.restore(fresh_state(seed=123))
    resumed = train(resumed, resumed_rng, 3)

    assert int(resumed.step) == int(straight.step) == 6
    assert_trees_identical(resumed.params, straight.params)
    assert_trees_identical(resumed.batch_stats, straight.batch_stats)
    assert_trees_identical(resumed.opt_state, straight.opt_state)


def test_keep_last_n_deletes_older_steps(tmp_path):
    state = fresh_state()
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, state)
        assert ckpt.all_steps() == [4, 5]
        assert ckpt.latest_step() == 5
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]


@pytest.mark.parametrize(
    "mode, values, best", [("max", [0.5, 0.9, 0.1, 0.2, 0.3], 2), ("min", [0.1, 0.9, 0.5, 0.4, 0.3], 1)]
)
def test_best_by_metric_is_kept_beside_the_latest(tmp_path, mode, values, best):
    state = fresh_state()
    with Checkpointer(tmp_path, keep_last=2, best_metric="mAP", best_mode=mode) as ckpt:
        for step, value in enumerate(values, start=1):
            ckpt.save(step, state, metrics={"mAP": value})
        assert ckpt.all_steps() == sorted({best, 4, 5})
        assert ckpt.best_step() == best
        assert ckpt.latest_step() == 5
        assert ckpt.metrics(best) == {"mAP": values[best - 1]}
        # steps without the metric (or with NaN) are kept as newest, never ranked
        ckpt.save(6, state, metrics={"loss": 1.0})
        ckpt.save(7, state, metrics={"mAP": float("nan")})
        assert ckpt.all_steps() == [best, 6, 7]
        assert ckpt.best_step() == best
        assert ckpt.metrics(6) == {"loss": 1.0}


def _data_files(step_dir):
    """Tensor data files (tensorstore/OCDBT chunks live in directories named d)."""
    files = [
        os.path.join(root, f)
        for root, _, fs in os.walk(step_dir / "state")
        for f in fs
        if os.path.basename(root) == "d"
    ]
    assert files, "expected tensor data files under state/"
    return sorted(files, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_bytes(path):
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 2, min(len(data), len(data) // 2 + 4)):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
    "damage, message", [(_truncate, "truncated"), (_flip_bytes, "sha256 mismatch"), (os.remove, "is missing")]
)
def test_corruption_is_detected(tmp_path, damage, message):
    ckpt, _, _ = saved_once(tmp_path)
    ckpt.close()
    damage(_data_files(tmp_path / "2")[-1])
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError, match=message) as info:
        ckpt.restore(fresh_state())
    assert str(tmp_path / "2") in str(info.value)


def test_deleted_metadata_file_and_manifest_are_detected(tmp_path):
    ckpt, _, _ = saved_once(tmp_path)
    os.remove(tmp_path / "2" / "state" / "_METADATA")
    with pytest.raises(CheckpointError, match="state/_METADATA is missing"):
        ckpt.restore(fresh_state())
    os.remove(tmp_path / "2" / MANIFEST_NAME)
    with pytest.raises(CheckpointError, match="no lucid_manifest.json"):
        ckpt.restore(fresh_state(), step=2)
    assert ckpt.latest_step() is None  # an unsealed step is never picked for a resume
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.restore(fresh_state())
    ckpt.close()


def test_newer_format_is_refused_on_restore(tmp_path, monkeypatch):
    # A checkpoint from a newer lucid_jax: both its manifest and its meta say format 2.
    monkeypatch.setattr(manifest, "FORMAT_VERSION", 2)
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 2)
    ckpt, _, _ = saved_once(tmp_path)
    ckpt.close()
    monkeypatch.undo()
    with Checkpointer(tmp_path) as ckpt:
        for restore in (lambda: ckpt.restore(fresh_state()), ckpt.restore_variables):
            with pytest.raises(CheckpointError, match=r"format version 2, newer than version 1") as info:
                restore()
            assert str(tmp_path / "2") in str(info.value) and "\n" not in str(info.value)


def test_meta_format_is_checked_too(tmp_path, monkeypatch):
    # Sealed by today's manifest, but the meta item claims a newer format.
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 2)
    ckpt, _, _ = saved_once(tmp_path)
    ckpt.close()
    monkeypatch.undo()
    with (
        Checkpointer(tmp_path) as ckpt,
        pytest.raises(CheckpointError, match=r"format version 2, newer than version 1"),
    ):
        ckpt.restore(fresh_state())


def test_unfinished_and_unsealed_steps_are_ignored(tmp_path):
    ckpt, state, rng = saved_once(tmp_path)
    shutil.copytree(tmp_path / "2", tmp_path / "7.orbax-checkpoint-tmp")  # orbax's in-progress name
    shutil.copytree(tmp_path / "2", tmp_path / "8")
    os.remove(tmp_path / "8" / MANIFEST_NAME)  # committed by orbax, killed before it was sealed
    ckpt.close()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        restored, _, _ = ckpt.restore(fresh_state())
        assert int(restored.step) == 2
        ckpt.save(8, state, rng)  # the unsealed leftover is replaced
        assert ckpt.latest_step() == 8


def test_commit_is_atomic_when_killed_before_rename(tmp_path, monkeypatch):
    """Orbax renames tmp -> final last; a kill before it leaves no visible step."""
    async_path = pytest.importorskip("orbax.checkpoint._src.path.async_path")
    if not hasattr(async_path, "rename"):
        pytest.skip("orbax internals changed")
    ckpt, state, rng = saved_once(tmp_path)

    async def killed(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill during commit")

    monkeypatch.setattr(async_path, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(3, state, rng)
    monkeypatch.undo()
    assert not (tmp_path / "3").exists()
    with Checkpointer(tmp_path, read_only=True) as reader:
        assert reader.latest_step() == 2


@pytest.mark.parametrize(
    "model_kwargs, message",
    [({"hidden": 16}, "shape mismatches"), ({"extra_layer": True}, "missing from the checkpoint")],
)
def test_architecture_mismatch_names_the_keys(tmp_path, model_kwargs, message):
    ckpt, _, _ = saved_once(tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        ckpt.restore(fresh_state(**model_kwargs))
    ckpt.close()
    text = str(info.value)
    assert "\n" not in text and str(tmp_path / "2") in text
    assert (
        "params/hidden/bias (8,) vs (16,)" in text
        if "hidden" in model_kwargs
        else "params/extra/bias, params/extra/kernel" in text
    )
