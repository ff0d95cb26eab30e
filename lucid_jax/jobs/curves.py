"""A run's curves as one picture: ``lucid-jax plot OUT`` draws ``OUT/log.jsonl`` to
``OUT/curves.png`` (``train`` draws it too, when the run ends).

Four panels against the step: the training losses (with the held-out loss, dashed),
the learning rate, the validation AP and AP50, and the gradient norm. A step logged
twice (a run resumed from an earlier checkpoint repeats its last steps) is drawn
once, from its latest record. Drawn off-screen with ``matplotlib.figure.Figure``.
"""

import os
from pathlib import Path

from matplotlib.figure import Figure

from lucid_jax.files import atomic_path
from lucid_jax.jobs.config import JobError
from lucid_jax.jobs.run_log import LOG_NAME, read_log

CURVES_NAME = "curves.png"
_LOSSES = ("total_loss", "rpn_cls_loss", "rpn_reg_loss", "roi_cls_loss", "roi_reg_loss")


def _by_step(records: list[dict]) -> list[dict]:
    """The latest record of each step, in step order."""
    latest = {int(r["step"]): r for r in records}
    return [latest[s] for s in sorted(latest)]


def run_curves(out: str | os.PathLike) -> dict:
    """The series a run's picture draws: {"train": records, "eval": records} by step.

    Raises:
      JobError: no ``log.jsonl`` in ``out``.
    """
    path = Path(out) / LOG_NAME
    if not path.is_file():
        raise JobError(f"no {LOG_NAME} in {out}: give the --out of a train run")
    records = read_log(out)
    return {
        "train": _by_step([r for r in records if "total_loss" in r]),
        "eval": _by_step([r for r in records if "eval" in r]),
    }


def plot_run(out: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Draw a run's curves.

    Args:
      out: the run directory (its ``log.jsonl``).
      path: the PNG to write (default: ``OUT/curves.png``).

    Returns:
      The PNG's path.

    Raises:
      JobError: no ``log.jsonl`` in ``out``.
    """
    series = run_curves(out)
    train, val = series["train"], series["eval"]
    path = Path(out) / CURVES_NAME if path is None else Path(path)
    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    (losses, lr), (ap, grad) = fig.subplots(2, 2)
    steps = [r["step"] for r in train]

    for name in _LOSSES:
        if train and name in train[0]:
            width = 2.0 if name == "total_loss" else 1.0
            losses.plot(steps, [r[name] for r in train], label=name.removesuffix("_loss"), linewidth=width)
    if val and val[0].get("val_loss"):
        losses.plot(
            [r["step"] for r in val],
            [r["val_loss"]["total_loss"] for r in val],
            "k--o",
            markersize=4,
            label="held-out total",
        )
    losses.set(title="training losses", xlabel="step", ylabel="loss")
    if any(v > 0 for r in train for v in (r.get(n, 0) for n in _LOSSES)):
        losses.set_yscale("log")
    losses.legend(fontsize="small", loc="best")

    lr.plot(steps, [r.get("lr", float("nan")) for r in train], color="tab:purple")
    lr.set(title="learning rate (heads)", xlabel="step", ylabel="learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    if val:
        v_steps = [r["step"] for r in val]
        for key, style in (("AP50", "-o"), ("AP", "-s")):
            ap.plot(v_steps, [r["eval"][key] for r in val], style, markersize=4, label=key)
        ap.legend(fontsize="small", loc="upper left")
    else:
        ap.text(0.5, 0.5, "no validation\n(--eval-every 0 or no held-out data)", ha="center", va="center")
    ap.set(title="validation", xlabel="step", ylabel="COCO AP", ylim=(0, 1))
    if steps:
        for axes in (losses, lr, ap, grad):
            axes.set_xlim(0, max(steps[-1], 1) * 1.03)  # room for the last step's markers

    grad.plot(steps, [r.get("grad_norm", float("nan")) for r in train], color="tab:gray")
    grad.set(title="gradient norm", xlabel="step", ylabel="global L2 norm")
    for axes in (losses, lr, ap, grad):
        axes.grid(alpha=0.3)
    fig.suptitle(f"{Path(out).resolve().name}: {len(steps)} logged steps, {len(val)} validations")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
