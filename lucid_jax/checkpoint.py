"""Checkpoints of the full training state on orbax-checkpoint, with checksums.

One step directory holds two orbax items: ``state`` (params, batch_stats and
opt_state as a flax state dict, written by ``StandardSave``) and ``meta`` (JSON:
step, the training loop's RNG key data and implementation, metrics and the
caller's metadata). Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and
renames it when complete, so a killed save never shows up as a step.

Orbax does not checksum tensor files, so after orbax has committed a step we add
``lucid_manifest.json`` (size and sha256 of every file in the step directory;
see :mod:`lucid_jax.manifest`).
The manifest is the seal: ``latest_step`` only counts sealed steps, and
``restore`` verifies every file before reading any of them. A step orbax
committed but we never sealed (the process died between the two) is skipped,
and replaced if the same step is saved again.

Several processes (``jax.distributed``): every process calls ``save`` and
``restore`` with the same arguments. Orbax writes each array's shards from the
processes that hold them, a replicated array once from its primary host
(process 0); process 0 then writes the one manifest after a barrier, and every
process verifies it before restoring. The directory must be one filesystem that
all hosts see (a shared disk or a bucket), as orbax assumes.

Retention (orbax preservation policies): the union of the ``keep_last`` newest
steps and, when ``best_metric`` is given, the ``keep_best`` best steps by that
metric. Orbax's legacy ``max_to_keep`` + ``best_fn`` would instead keep only the
N best and may delete the newest step, which a resume needs.
"""

import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

from lucid_jax.distributed import barrier
from lucid_jax.files import StorageError, fault_errno
from lucid_jax.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CheckpointError,
    check_format,
    verify_checkpoint,
    write_manifest,
)

_STATE, _META = "state", "meta"
_LIST_LIMIT = 3  # keys named per kind of problem, so an error stays one line
log = logging.getLogger(__name__)


def _quiet_failed_writes() -> None:
    """Keep the aftermath of a failed orbax write off stderr (installed once, before saving).

    When one tensor file fails (a full disk), orbax closes its event loop while
    tensorstore still completes the other writes: each completion's callback raises
    "Event loop is closed" as an unraisable exception, asyncio logs every task whose
    error nobody retrieved, and Python warns of the coroutines never awaited, hundreds
    of tracebacks for the one fault that :class:`StorageError` reports. Only those are
    dropped: another unraisable exception still reaches the previous hook, and asyncio's
    logger keeps its level for critical records.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_lucid_jax_quiet", False):
        return

    def hook(unraisable) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook._lucid_jax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def _flat_shapes(tree, prefix: str = "") -> dict[str, tuple]:
    """'a/b/c' -> shape for every array leaf of a nested dict (orbax metadata or arrays)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_shapes(value, path + "/"))
        elif value is not None:
            out[path] = tuple(value.shape)
    return out


def check_compatible(saved: Mapping, template: Mapping, where: str) -> None:
    """Raise a one-line CheckpointError if two flat {path: shape} dicts differ.

    Args:
      saved, template: {"params/hidden/kernel": shape} of the checkpoint and the model.
      where: the checkpoint directory, for the message.
    """
    # params first: an optimizer-state key only repeats what the params already say.
    order = lambda key: ({"params": 0, "batch_stats": 1}.get(key.split("/")[0], 2), key)  # noqa: E731
    missing = sorted(set(template) - set(saved), key=order)
    unexpected = sorted(set(saved) - set(template), key=order)
    common = sorted(set(saved) & set(template), key=order)
    shapes = [f"{k} {saved[k]} vs {template[k]}" for k in common if saved[k] != template[k]]

    def part(label, items):
        more = f" (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
        return f"{len(items)} {label}: {', '.join(items[:_LIST_LIMIT])}{more}" if items else ""

    parts = [
        part("missing from the checkpoint", missing),
        part("unexpected in the checkpoint", unexpected),
        part("shape mismatches (checkpoint vs model)", shapes),
    ]
    if any(parts):
        raise CheckpointError(f"checkpoint {where} does not fit the model: " + "; ".join(p for p in parts if p))


def _abstract(leaf):
    """The restore target for one template leaf: shape, dtype and sharding."""
    sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


def _state_tree(state) -> dict:
    """params, batch_stats and opt_state as nested dicts with string keys (step travels in JSON)."""
    tree = serialization.to_state_dict(state)
    tree.pop("step")
    return tree


def _encode_rng(rng) -> dict | None:
    if rng is None:
        return None
    rng = jnp.asarray(rng)
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)  # a legacy uint32 key, of the default implementation
    return {"impl": str(jax.random.key_impl(rng)), "data": np.asarray(jax.random.key_data(rng)).tolist()}


def _decode_rng(encoded: dict | None):
    return (
        None
        if encoded is None
        else jax.random.wrap_key_data(jnp.asarray(encoded["data"], jnp.uint32), impl=encoded["impl"])
    )


class Checkpointer:
    """Save and restore ``TrainState`` + RNG key + metadata under one directory.

    Usage::

        with Checkpointer("runs/x/ckpt", keep_last=3, best_metric="mAP") as ckpt:
            if ckpt.latest_step() is not None:
                state, rng, meta = ckpt.restore(state)
            ...
            ckpt.save(int(state.step), state, rng, metrics={"mAP": 0.41}, metadata={"model": "..."})

    Args:
      directory: root directory; step ``s`` lives in ``directory/s``.
      keep_last: the newest steps kept (at least 1, so a resume is always possible).
      best_metric: a key of the ``metrics`` given to ``save``; the ``keep_best``
        best steps by it are kept as well as the ``keep_last`` newest ones.
      best_mode: "max" or "min": which direction of ``best_metric`` is better.
      keep_best: how many best steps to keep (used only with ``best_metric``).
      read_only: open for restoring only (an evaluation job beside training).
    """

    def __init__(
        self,
        directory,
        *,
        keep_last: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        keep_best: int = 1,
        read_only: bool = False,
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if best_mode not in ("max", "min"):
            raise ValueError(f'best_mode must be "max" or "min", got {best_mode!r}')
        self.directory = epath.Path(directory).absolute()
        self.best_metric = best_metric
        policies = [ocp.checkpoint_managers.LatestN(n=keep_last)]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
            # BestN sorts ascending and keeps the tail; reverse=True keeps the smallest.
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,  # orbax's best_step() and its metrics item need it
            best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=False,  # save() returns once the step is on disk
            read_only=read_only,
            create=not read_only,
        )
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._failed = False

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Finish pending work (deletions) and release orbax's threads.

        After a failed save, orbax's own complaints on closing are not raised: the
        failure was already reported, in one line.
        """
        try:
            self._manager.close()
        except Exception:
            if not self._failed:
                raise

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def is_sealed(self, step: int) -> bool:
        return (self.step_dir(step) / MANIFEST_NAME).exists()

    def all_steps(self) -> list[int]:
        """Sealed (complete) steps, oldest first; tmp and unsealed steps are left out."""
        self._manager.reload()  # another process may have written since
        return sorted(s for s in self._manager.all_steps() if self.is_sealed(s))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best step by ``best_metric`` (the latest one without ``best_metric``)."""
        self._manager.reload()
        return self._manager.best_step() if self.best_metric else self.latest_step()

    def metadata(self, step: int | None = None) -> dict:
        """The ``metadata`` saved with ``step`` (default: the latest complete step)."""
        return self._read_meta(self._checked_step(step))["metadata"]

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with ``step`` (read without verifying the tensor files)."""
        return self._read_meta(step)["metrics"]

    def save(
        self,
        step: int,
        state,
        rng=None,
        *,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Write step ``step`` and wait until it is on disk and sealed.

        Args:
          step: the step number (usually ``int(state.step)``).
          state: a ``TrainState`` (step, params, batch_stats, opt_state).
          rng: the training loop's key (typed or legacy uint32), or None.
          metrics: scalar metrics, e.g. {"mAP": 0.41}; ranks steps for ``best_metric``
            (a step whose metrics lack it, or hold NaN, is not ranked).
          metadata: any JSON-able dict (model name and config, class names, ...).
        """
        step = int(step)
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        # Only steps with a finite best_metric are ranked; the others are kept as newest steps alone.
        ranked = metrics
        if self.best_metric is not None and not np.isfinite((metrics or {}).get(self.best_metric, np.nan)):
            ranked = None
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "rng": _encode_rng(rng),
            "metrics": metrics,
            "metadata": dict(metadata or {}),
        }
        try:
            json.dumps(meta)
        except TypeError as e:
            raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from e
        self._manager.reload()
        if step in self._manager.all_steps():
            if self.is_sealed(step):
                raise CheckpointError(f"checkpoint {self.step_dir(step)} already exists")
            log.warning("replacing %s, left unsealed by an interrupted save", self.step_dir(step))
            self._manager.delete(step)
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(_state_tree(state)), _META: ocp.args.JsonSave(meta)})
        _quiet_failed_writes()
        try:
            if not self._manager.save(step, args=args, metrics=ranked, force=True):
                raise CheckpointError(f"orbax declined to save step {step} in {self.directory}")
            self._manager.wait_until_finished()
            # Every process has written its part before process 0 hashes the files,
            # and no process reads the step before the seal is on disk.
            barrier(f"lucid_jax_checkpoint_written_{step}")
            if jax.process_index() == 0:
                write_manifest(self.step_dir(step))
            barrier(f"lucid_jax_checkpoint_sealed_{step}")
        except Exception as e:
            code = fault_errno(e)
            if code is None:
                raise
            self._failed = True
            self._discard(step)
            latest = self.latest_step()
            last = f"the last complete checkpoint is step {latest}" if latest else "no checkpoint is complete yet"
            raise StorageError(code, self.directory, f"while writing step {step}; {last}") from None

    def _discard(self, step: int) -> None:
        """Remove what a failed save of ``step`` left: orbax's temporary folders, an unsealed step."""
        if jax.process_index() != 0:
            return
        leftovers = [p for p in self.directory.iterdir() if p.name.startswith(f"{step}.orbax-checkpoint-tmp")]
        if self.step_dir(step).exists() and not self.is_sealed(step):
            leftovers.append(self.step_dir(step))
        for path in leftovers:
            shutil.rmtree(os.fspath(path), ignore_errors=True)

    def _checked_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
        if not self.step_dir(step).exists():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; complete steps: {self.all_steps()}"
            )
        verify_checkpoint(self.step_dir(step))
        return step

    def _read_meta(self, step: int) -> dict:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.step_dir(step)}: cannot read {_META}: {e}") from e

    def restore_variables(self, step: int | None = None) -> dict:
        """``{"params", "batch_stats"}`` of a step as NumPy arrays, without a model template.

        For reading a run's weights into another model (``lucid_jax.weights``);
        the step is verified against its manifest first. Each array is read whole
        onto this process's first device, whatever devices the run was saved from.
        """
        step = self._checked_step(step)
        try:
            saved = self._manager.item_metadata(step)[_STATE].tree
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), saved)
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
            )
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.step_dir(step)}: orbax failed to restore {_STATE}: {e}") from e
        tree = restored[_STATE]
        return {c: jax.tree.map(np.asarray, tree.get(c) or {}) for c in ("params", "batch_stats")}

    def restore(self, state_template, step: int | None = None):
        """Restore a step (default: the latest complete one) into ``state_template``.

        Args:
          state_template: a ``TrainState`` with the target structure, shapes and
            shardings (arrays or ``jax.ShapeDtypeStruct``s, e.g. from
            ``jax.eval_shape``); its ``tx`` and ``apply_fn`` are kept.
          step: the step to restore.

        Returns:
          (state, rng, metadata): the restored state; the typed RNG key (None if
          none was saved); the ``metadata`` dict given to ``save``.

        Raises:
          CheckpointError: no checkpoint, a corrupt or unsealed one, or one whose
            tree structure or shapes differ from the template (naming the keys).
        """
        step = self._checked_step(step)
        where = str(self.step_dir(step))
        meta = self._read_meta(step)
        check_format(meta.get("format"), where)
        template_tree = _state_tree(state_template)
        try:
            saved = self._manager.item_metadata(step)[_STATE].tree
        except Exception as e:
            raise CheckpointError(f"checkpoint {where}: cannot read the {_STATE} metadata: {e}") from e
        check_compatible(_flat_shapes(saved), _flat_shapes(template_tree), where)
        target = jax.tree.map(_abstract, template_tree)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
            )
        except Exception as e:
            raise CheckpointError(f"checkpoint {where}: orbax failed to restore {_STATE}: {e}") from e
        old_step = state_template.step  # keep the template's kind of step: array or Python int
        step_value = jnp.asarray(meta["step"], old_step.dtype) if hasattr(old_step, "dtype") else int(meta["step"])
        state = serialization.from_state_dict(state_template, {**restored[_STATE], "step": step_value})
        return state, _decode_rng(meta["rng"]), meta["metadata"]
