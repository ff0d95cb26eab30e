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

import json
import math
import os
from pathlib import Path

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


class RunLog:
    """Appends records to ``OUT/log.jsonl`` and ``OUT/tb/`` (on process 0; elsewhere nothing).

    Args:
      out: the run directory.
      enabled: write (process 0); False makes every call a no-op.
    """

    def __init__(self, out: Path, *, enabled: bool = True):
        self.enabled = enabled
        self._file = open(out / LOG_NAME, "a") if enabled else None
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=str(out / TB_FOLDER), flush_secs=60)

    def write(self, record: dict) -> None:
        """One record: a line of ``log.jsonl`` and its scalars in TensorBoard, both flushed."""
        if not self.enabled:
            return
        assert self._file is not None and self._writer is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for tag, value in scalars(record).items():
            if math.isfinite(value):
                self._writer.add_scalar(tag, value, global_step=int(record["step"]))
        self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_log(out: str | os.PathLike) -> list[dict]:
    """The records of ``OUT/log.jsonl``, in order; a line cut short by a kill is skipped."""
    records = []
    for line in (Path(out) / LOG_NAME).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
