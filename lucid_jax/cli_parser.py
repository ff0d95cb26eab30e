"""The ``lucid-jax`` argument parser: every subcommand and its flags.

The flags of ``demo`` and ``train`` are ``TrainConfig``'s fields, those of ``eval``,
``predict`` and ``export`` the fields of ``EvalOptions``, ``PredictOptions`` and
``ExportOptions`` (``lucid_jax.jobs``): :func:`add_flags` reads each field's help and
argparse keywords from its metadata. The parsed namespace names its subcommand in
``command``; the checks of the values are the command line's (``lucid_jax.cli``).
"""

import argparse
import dataclasses

EXIT_USAGE = 2
BENCHMARKS = {"ops": "bench_ops.py", "predict": "bench_predict.py", "train": "bench_train.py"}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (exit code 2) instead of the usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"lucid-jax: error: {message} (see {self.prog} --help)\n")


def _shown(value) -> str:
    """A default as the help states it: tuples joined by commas, None and empty as "none"."""
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return "none" if shown in (None, "") else str(shown)


def add_flags(parser: argparse.ArgumentParser, cls, *, defaults=None, none_defaults: bool = False, skip=()) -> None:
    """One flag (or positional argument) per field of the dataclass ``cls``.

    A field's metadata (see :func:`lucid_jax.jobs.config.flag`) gives the help, the
    argparse keywords, and optionally ``shown`` (how the help states the default) and
    ``positional``. A field without a default is a required flag; the help of any
    other, switches aside, ends with "(default: ...)".

    Args:
      parser: the subcommand's parser.
      cls: ``TrainConfig`` or one of the jobs' options dataclasses.
      defaults: an instance whose values the help shows (default: the fields' defaults).
      none_defaults: every flag defaults to None, so that the job knows which were given.
      skip: names of fields that get no flag.
    """
    from lucid_jax.jobs import detector_names

    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        meta = dict(field.metadata)
        help_text = meta.pop("help").replace("{models}", ", ".join(detector_names()))
        shown, positional = meta.pop("shown", None), meta.pop("positional", False)
        required = field.default is dataclasses.MISSING
        if not required and meta.get("action") != "store_true":
            value = field.default if defaults is None else getattr(defaults, field.name)
            help_text += f" (default: {shown or _shown(value)})"
        if isinstance(meta.get("choices"), range):
            meta["metavar"] = f"{{{meta['choices'].start}..{meta['choices'].stop - 1}}}"
        help_text = help_text.replace("%", "%%")
        if positional:
            parser.add_argument(field.name, help=help_text, **meta)
            continue
        default = None if none_defaults or required else field.default
        name = "--" + field.name.replace("_", "-")
        parser.add_argument(name, dest=field.name, required=required, default=default, help=help_text, **meta)


def _add_training_flags(p, overrides: dict, *, skip=()) -> None:
    """TrainConfig's flags, defaulting to None so that the run knows which were given;
    the help shows the effective default (TrainConfig's, then ``overrides``)."""
    from lucid_jax.jobs import TrainConfig

    add_flags(p, TrainConfig, defaults=TrainConfig(**overrides), none_defaults=True, skip=skip)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_distributed_flags(p) -> None:
    """The flags passed to ``jax.distributed.initialize`` (all three, or none)."""
    p.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="process 0's address, for several processes (default: none, or the cluster's own)",
    )
    p.add_argument(
        "--num-processes",
        dest="num_processes",
        type=int,
        default=None,
        help="processes in the run (default: 1, or the cluster's own)",
    )
    p.add_argument(
        "--process-id",
        dest="process_id",
        type=int,
        default=None,
        help="this process, 0..N-1 (default: 0, or the cluster's own)",
    )


def _add_job_commands(sub) -> None:
    """demo, train, eval, predict and export: the jobs, with their flags from their dataclasses."""
    from lucid_jax.jobs import DEMO_OVERRIDES, EvalOptions, ExportOptions, PredictOptions

    p = sub.add_parser("demo", help="train on synthetic shapes, report AP on held-out images, draw detections")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    _add_training_flags(p, dict(DEMO_OVERRIDES), skip=("data", "init", "split", "classes", "eval_data"))

    p = sub.add_parser(
        "train",
        help="train a detector; resumes from --out",
        description="Train a detector. Run again with the same --out to resume: flags not given "
        "take the run's stored values, and a changed setting is refused, except --steps, "
        "--num-workers, --log-every, --checkpoint-every and --keep-checkpoints.",
    )
    p.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl, init_report.json)")
    _add_training_flags(p, {})
    _add_distributed_flags(p)

    p = sub.add_parser("eval", help="AP, AP50, AP75 and per-class AP of a trained checkpoint, as JSON")
    add_flags(p, EvalOptions)
    _add_distributed_flags(p)

    p = sub.add_parser("predict", help="detect objects in image files, folders and globs; write detections.json")
    add_flags(p, PredictOptions)

    p = sub.add_parser("export", help="write a run's prediction as one serialized file (jax.export) and its JSON")
    add_flags(p, ExportOptions)


def _add_tool_commands(sub) -> None:
    """plot, bench, seed and launch: a run's curves, benchmarks, the seed example and local
    multi-process runs."""
    p = sub.add_parser("plot", help="draw a run's losses, learning rate and validation AP to OUT/curves.png")
    p.add_argument("out", help="a train --out directory (its log.jsonl)")
    p.add_argument("--png", default=None, help="the picture to write (default: OUT/curves.png)")

    p = sub.add_parser("bench", help="run the side-by-side benchmarks against torchvision")
    p.add_argument(
        "which",
        nargs="*",
        metavar="{ops,predict,train}",
        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    p.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to the scripts (default: none)"
    )

    p = sub.add_parser("seed", help="the seed example on the full ResNet-101 FPN detector, with timings")
    p.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=[224, 512],
        help="square input sizes, multiples of the backbone's largest stride, 32 (default: 224 512)",
    )
    p.add_argument("--num-classes", type=int, default=21, help="classes, background included (default: 21)")
    p.add_argument("--repeats", type=int, default=3, help="timed predict calls per size (default: 3)")

    p = sub.add_parser(
        "launch",
        help="run train or eval as N processes on this machine (CPU devices), for testing",
        description="Start N local processes of `lucid-jax COMMAND ...`, joined by jax.distributed "
        "over loopback, each with its own CPU devices. Example: lucid-jax launch --local 2 -- "
        "train --data shapes --out runs/two",
    )
    p.add_argument("--local", type=int, required=True, metavar="N", help="processes to start")
    p.add_argument(
        "--devices-per-process",
        dest="devices_per_process",
        type=int,
        default=1,
        help="CPU devices in each process (default: 1)",
    )
    p.add_argument("--port", type=int, default=None, help="the coordinator's port (default: a free one)")
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds before every process is stopped (default: none)"
    )
    p.add_argument(
        "command_args", nargs=argparse.REMAINDER, metavar="-- {train,eval} ...", help="the command each process runs"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``lucid-jax`` parser; a parsed namespace's ``command`` names the subcommand.

    Returns:
      The parser, with usage errors on one line and exit code 2.
    """
    parser = _Parser(prog="lucid-jax", description="Faster R-CNN (ResNet FPN) in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_job_commands(sub)
    _add_tool_commands(sub)
    return parser
