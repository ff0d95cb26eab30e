"""Training: train state and the jit-compiled train step (the optimiser is in ``optim.py``).

``step(state, batch, rng) -> (state, metrics)`` is one pure function, compiled
once per batch shape with the state's buffers donated. Given a
``jax.sharding.Mesh`` it shards the batch over the mesh's data axis and keeps the
state replicated; XLA inserts the gradient all-reduce, and BatchNorm's batch
statistics are computed over the global batch. On several hosts (a TPU pod, a
GPU cluster), call ``jax.distributed.initialize()`` first (see
``lucid_jax.distributed``), build the mesh with ``data_mesh()`` and give each
host's slice of the batch to ``shard_batch``; the metrics come back replicated,
so every process reads them locally (``host_metrics``).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lucid_jax.distributed import gather, host_value, local_rows
from lucid_jax.inference import compiler_options

TARGET_KEYS = ("boxes", "labels", "valid")


class TrainState(train_state.TrainState):
    """flax's TrainState (step, params, opt_state, tx) plus BatchNorm statistics."""

    batch_stats: Any = None


def create_train_state(
    model, variables, optimizer: optax.GradientTransformation, *, mesh: Mesh | None = None
) -> TrainState:
    """A fresh train state at step 0.

    The state holds copies of ``variables``: the train step donates its state,
    and the caller's arrays stay usable.

    Args:
      model: the detector (its ``apply`` becomes the state's ``apply_fn``).
      variables: {"params": ..., "batch_stats": ...} from ``model.init``.
      optimizer: e.g. from ``build_optimizer``.
      mesh: replicate the state over this mesh (what a sharded step returns).
        Under ``jax.distributed`` every process must pass the same variables
        (the same seed); each one places its copy on its own devices.
    """
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # noqa: E731
    state = TrainState.create(
        apply_fn=model.apply,
        params=copy(variables["params"]),
        tx=optimizer,
        batch_stats=copy(variables.get("batch_stats", {})),
    )
    # An int32 array from the start, so the step's input signature never changes.
    state = state.replace(step=jnp.asarray(0, jnp.int32))
    if mesh is not None:
        state = replicate(state, mesh)
    return state


def replicate(tree, mesh: Mesh):
    """Place every array leaf of ``tree`` replicated on ``mesh``, from this process's copy.

    Under ``jax.distributed`` each process fills its own devices from its own
    values, which must be the same everywhere (the same seed and init). Unlike
    ``jax.device_put`` onto a multi-process sharding, this does not compare every
    leaf across processes, one collective each.
    """
    sharding = NamedSharding(mesh, PartitionSpec())

    def place(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        value = np.asarray(host_value(leaf))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map(place, tree)


# --- the step ---------------------------------------------------------------------


def validate_batch(batch: dict, num_classes: int) -> None:
    """Check a batch's values before any compute; raise ValueError naming the problem.

    Checks: the same batch size everywhere, labels in 1..num_classes-1 and
    x1 <= x2, y1 <= y2 where valid, and no NaN or infinity in images or boxes.
    Only this process's data is read: host arrays as they are, and of a batch
    placed by ``shard_batch`` the rows on this process's devices (a global array
    spanning other hosts is never fetched). Images are named by their row in the
    global batch.
    """
    sizes = {k: np.shape(batch[k])[0] for k in ("images", "boxes", "labels", "valid", "image_sizes") if k in batch}
    for key, size in sizes.items():
        if size != sizes["images"]:
            raise ValueError(f'batch["{key}"] has {size} entries but batch["images"] has {sizes["images"]} images')
    images, _ = local_rows(batch["images"])
    if not np.isfinite(images).all():
        raise ValueError(f"batch images contain {np.size(images) - np.isfinite(images).sum()} NaN or infinite values")
    (boxes, rows), (labels, _), (valid, _) = (local_rows(batch[k]) for k in TARGET_KEYS)
    if not np.isfinite(boxes).all():
        raise ValueError("batch boxes contain NaN or infinite values")
    bad = valid & ((labels < 1) | (labels >= num_classes))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"label {labels[i, j]} of box {j} in image {rows[i]} is outside 1..{num_classes - 1} "
            f"(num_classes={num_classes}, 0 is background)"
        )
    bad = valid & ((boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1]))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"box {j} of image {rows[i]} has x2 < x1 or y2 < y1: {boxes[i, j].tolist()} (boxes are xyxy)")


def host_metrics(metrics: dict) -> dict[str, float]:
    """A step's metrics as Python floats, on any process.

    The sharded step returns them replicated, so each process reads its own
    copy (``lucid_jax.distributed.host_value``); nothing crosses hosts.
    """
    return {k: float(host_value(v)) for k, v in metrics.items()}


_MESSAGE_BYTES = 1024


def _validate_everywhere(batch: dict, num_classes: int) -> None:
    """``validate_batch`` on each process's own rows; every process raises the first problem found.

    A problem seen by one host alone would leave the others waiting in the step's
    collectives, so the verdicts are gathered (one small all-gather per step) and
    all processes raise the same ValueError, prefixed by the process that found it.
    """
    try:
        validate_batch(batch, num_classes)
        problem = ""
    except ValueError as e:
        if jax.process_count() == 1:
            raise
        problem = str(e)
    if jax.process_count() == 1:
        return
    encoded = problem.encode()[:_MESSAGE_BYTES].ljust(_MESSAGE_BYTES, b"\0")
    messages = gather(np.frombuffer(encoded, np.uint8))  # [P, _MESSAGE_BYTES]
    for process, message in enumerate(messages):
        text = message.tobytes().rstrip(b"\0").decode(errors="replace")
        if text:
            raise ValueError(f"process {process}: {text}")


def _is_frozen(label) -> bool:
    return label == "frozen" if isinstance(label, str) else bool(label)


def data_mesh(devices=None, axis: str = "data") -> Mesh:
    """A 1-D mesh over all (global) devices, for data parallelism."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (axis,))


def shard_batch(batch: dict, mesh: Mesh, axis: str = "data") -> dict:
    """Place this process's part of a batch on the mesh, split along the data axis.

    On one host the local batch is the global batch; on a pod each host passes
    its own slice (``jax.make_array_from_process_local_data``).
    """
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def make_train_step(
    model,
    *,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    donate: bool = True,
    validate: bool = True,
    frozen: Any = None,
    channels_last: bool = False,
) -> Callable:
    """Build ``step(state, batch, rng) -> (state, metrics)``, jit-compiled.

    Args:
      model: the detector.
      mesh: shard the batch over ``mesh``'s ``data_axis``, replicate the state.
      donate: donate the incoming state's buffers (do not reuse it afterwards).
      validate: check the batch's values on the host first (``validate_batch``
        on each process's own rows; under ``jax.distributed`` every process
        raises the first problem any of them finds).
      frozen: the labels of ``param_labels`` (or a pytree of bools, True =
        frozen) given to ``build_optimizer``. Frozen parameters are held
        constant in the differentiation, so their gradients (and the backward
        pass through frozen early stages) are never computed; their gradient is
        zero and ``grad_norm`` covers the trainable parameters only.
      channels_last: the batch's images are [B, H, W, 3], as the Loader's are
        (``FasterRCNN.loss``'s ``channels_last``).

    The batch is {"images": [B, 3, H, W] (or [B, H, W, 3]), "boxes": [B, M, 4], "labels": [B, M],
    "valid": [B, M]} plus optional "image_sizes" [B, 2]. Metrics hold every loss,
    "grad_norm" and "finite"; a step whose loss or gradient is not finite leaves
    the state unchanged (and reports finite=False).
    """

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        dropout_key, sampling_key = jax.random.split(rng)
        targets = {k: batch[k] for k in TARGET_KEYS}

        def loss_fn(params):
            if frozen is not None:
                params = jax.tree_util.tree_map(
                    lambda p, f: jax.lax.stop_gradient(p) if _is_frozen(f) else p, params, frozen
                )
            losses, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                batch["images"],
                targets,
                batch.get("image_sizes"),
                method="loss",
                channels_last=channels_last,
                rngs={"dropout": dropout_key, "sampling": sampling_key},
                mutable=["batch_stats"],
            )
            return losses["total_loss"], (losses, updates)

        grads, (losses, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
        finite = jnp.isfinite(losses["total_loss"]) & jnp.isfinite(grad_norm)
        # GroupNorm models have no batch statistics.
        new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
        # Skipping a non-finite update keeps the state (and any checkpoint of it) sound. A
        # conditional picks one whole state; an elementwise select would need both
        # states at once (docs/benchmarks.md: the temporaries it costs).
        new_state = jax.lax.cond(finite, lambda: new_state, lambda: state)
        return new_state, {**losses, "grad_norm": grad_norm, "finite": finite}

    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else (), "compiler_options": compiler_options(mesh)}
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        kwargs.update(
            in_shardings=(replicated, NamedSharding(mesh, PartitionSpec(data_axis)), replicated),
            out_shardings=(replicated, replicated),
        )
    jitted = jax.jit(train_step, **kwargs)

    def step(state: TrainState, batch: dict, rng: jax.Array):
        if validate:
            _validate_everywhere(batch, model.num_classes)
        if mesh is not None:
            # The step returns its state replicated on the mesh; a state placed
            # anywhere else would be a new input signature and a second compile.
            state = replicate(state, mesh)
        return jitted(state, batch, rng)

    step.jitted = jitted  # type: ignore[attr-defined]  # for lowering, export and cost analysis
    return step
