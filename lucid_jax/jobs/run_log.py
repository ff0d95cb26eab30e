"""A training run's log: ``OUT/log.jsonl`` (one JSON object per record) and the same
scalars as TensorBoard event files in ``OUT/tb/``.

Records are of three kinds, each with its ``step``:

- training: the losses, ``grad_norm``, ``lr`` (the heads' learning rate of that
  step), ``finite``, ``seconds`` and ``data_wait_fraction``;
- validation: ``eval`` (AP, AP50, AP75, APs, APm, APl, per_class_AP), ``val_loss``
  (the held-out training losses) and ``eval_seconds``;
- once at the start, the boxes over ``max_boxes`` that training drops.

TensorBoard's tags: ``train/<name>`` for training scalars, ``val/<metric>``,
``val/per_class_AP/<class>`` and ``val/loss/<name>`` for validation. The events are
written with tensorboardX, which needs neither TensorFlow nor torch; read them with
``tensorboard --logdir OUT/tb``.
"""

import contextlib
import json
import math
import os
import threading
from pathlib import Path

from lucid_jax.files import StorageError, fault_errno, write_atomically

TB_FOLDER = "tb"
LOG_NAME = "log.jsonl"
_NOT_SCALARS = ("step", "finite")


def scalars(record: dict) -> dict[str, float]:
    """TensorBoard's {tag: value} of one record (empty for the dropped-boxes note)."""
    if "eval" in record:
        out = {f"val/{k}": v for k, v in record["eval"].items() if k != "per_class_AP"}
        out.update({f"val/per_class_AP/{k}": v for k, v in record["eval"].get("per_class_AP", {}).items()})
        out.update({f"val/loss/{k}": v for k, v in record.get("val_loss", {}).items()})
        if "eval_seconds" in record:
            out["val/seconds"] = record["eval_seconds"]
        return {k: float(v) for k, v in out.items() if isinstance(v, int | float)}
    if "total_loss" not in record:
        return {}
    return {f"train/{k}": float(v) for k, v in record.items() if k not in _NOT_SCALARS and isinstance(v, int | float)}


_THREAD_FAULTS: list[OSError] = []  # file-system faults of the TensorBoard writer's thread


def _catch_writer_thread_faults() -> None:
    """Keep a file-system fault of tensorboardX's writer thread for :meth:`RunLog.write` to
    raise in one line, instead of the thread printing a traceback (installed once)."""
    previous = threading.excepthook
    if getattr(previous, "_lucid_jax_run_log", False):
        return

    def hook(args) -> None:
        writer = type(args.thread).__name__ == "_EventLoggerThread"  # tensorboardX's, and no other
        if writer and isinstance(args.exc_value, OSError) and fault_errno(args.exc_value) is not None:
            _THREAD_FAULTS.append(args.exc_value)
        else:
            previous(args)

    hook._lucid_jax_run_log = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class RunLog:
    """Appends records to ``OUT/log.jsonl`` and ``OUT/tb/`` (on process 0; elsewhere nothing).

    Args:
      out: the run directory.
      enabled: write (process 0); False makes every call a no-op.
      start: the step the run goes on from: TensorBoard drops what earlier event
        files hold past it (``purge_step``), as :func:`truncate_log` does for the log.
    """

    def __init__(self, out: Path, *, enabled: bool = True, start: int = 0):
        self.enabled = enabled
        self.path = out / LOG_NAME
        self._file = open(self.path, "a") if enabled else None
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            purge = {"purge_step": start + 1} if start else {}
            self._writer = SummaryWriter(logdir=str(out / TB_FOLDER), flush_secs=60, **purge)
            _catch_writer_thread_faults()
            _THREAD_FAULTS.clear()  # a new writer, a new thread: an earlier run's fault is not ours

    def write(self, record: dict) -> None:
        """One record: a line of ``log.jsonl`` and its scalars in TensorBoard, both flushed."""
        if not self.enabled:
            return
        assert self._file is not None and self._writer is not None
        try:
            if _THREAD_FAULTS:  # the TensorBoard writer's thread failed on the last record
                raise _THREAD_FAULTS[0]
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            for tag, value in scalars(record).items():
                if math.isfinite(value):
                    self._writer.add_scalar(tag, value, global_step=int(record["step"]))
            self._writer.flush()
        except OSError as e:
            code = fault_errno(e)
            if code is None:
                raise
            where = getattr(e, "filename", None) or self.path
            raise StorageError(code, where, f"while logging step {record['step']}") from None

    def close(self) -> None:
        """Close both; a fault on closing is not raised (every record was flushed when written)."""
        with contextlib.suppress(OSError):
            if self._file is not None:
                self._file.close()
            if self._writer is not None:
                self._writer.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_log(out: str | os.PathLike, step: int) -> int:
    """Make ``OUT/log.jsonl`` follow the checkpoints: drop the records past ``step``.

    A run killed after its last checkpoint logged steps that its resume does again;
    they are dropped (and a line cut short by the kill) before the run goes on, so
    every step appears once. A run that starts from step 0 starts an empty log. The
    file is rewritten whole (:func:`write_atomically`).

    Returns:
      The number of records dropped (0: the file is left untouched).
    """
    path = Path(out) / LOG_NAME
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if step > 0 and record.get("step", 0) <= step:  # a run from step 0 starts its log afresh
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    write_atomically(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def read_log(out: str | os.PathLike) -> list[dict]:
    """The records of ``OUT/log.jsonl``, in order; a line cut short by a kill is skipped."""
    records = []
    for line in (Path(out) / LOG_NAME).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
