"""The ``lucid-jax`` command line: it parses arguments, calls a job of
``lucid_jax.jobs`` and prints.

    lucid-jax demo     [--out runs/demo] [--steps 800]
    lucid-jax train    --data {shapes|voc:DIR|coco:ANN.json:IMG_DIR} --out DIR [--init WEIGHTS] [...]
    lucid-jax eval     --data ... --checkpoint DIR [--split val] [--results FILE] [--ground-truth FILE]
    lucid-jax predict  PATH... --checkpoint DIR --out DIR [--batch-size B] [--draw] [--results FILE]
    lucid-jax export   --checkpoint DIR --out FILE [--batch-size B] [--platforms cpu,cuda,tpu]
    lucid-jax bench    [ops] [predict] [train]
    lucid-jax seed     [--size 224 512]
    lucid-jax launch   --local N [--devices-per-process D] -- train ...

``train`` and ``eval`` run as one of several processes with ``--coordinator
HOST:PORT --num-processes N --process-id I`` (``jax.distributed``), or by
themselves in a detected cluster (a TPU pod, SLURM, ``JAX_COORDINATOR_ADDRESS``);
only process 0 prints. ``launch`` starts N such processes on this machine.

Bad input is one line on stderr: usage errors exit with 2, data and file errors
with 1. Every default of ``train`` comes from ``jobs.TrainConfig``.
"""

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

EXIT_USAGE = 2


def _given(args) -> dict:
    """The TrainConfig fields the user set on the command line (flags default to None)."""
    from lucid_jax.jobs import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in fields and v is not None}


def _config(args, overrides=None):
    """(TrainConfig, names given): TrainConfig's defaults, then ``overrides``, then the flags."""
    from lucid_jax.jobs import TrainConfig

    given = _given(args)
    return TrainConfig(**{**(overrides or {}), **given}), set(given)


def _demo(args) -> int:
    from lucid_jax import jobs

    config, given = _config(args, jobs.DEMO_OVERRIDES)
    print(json.dumps(jobs.demo(config, args.out, given=given, progress=not args.no_progress), indent=2))
    return 0


def _train(args) -> int:
    from lucid_jax import jobs

    config, given = _config(args)
    last = jobs.train(config, args.out, given=given, progress=not args.no_progress)
    if _is_primary():
        print(json.dumps(last))
    return 0


def _is_primary() -> bool:
    from lucid_jax.distributed import is_primary

    return is_primary()


def _writable_file(path, flag: str) -> Path | None:
    """Check an output file's path before any work: its folder exists and it is not a folder."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: folder {path.parent} not found")
    return path


def _eval(args) -> int:
    from lucid_jax import jobs

    results = _writable_file(args.results, "--results")
    ground_truth = _writable_file(args.ground_truth, "--ground-truth")
    model, variables, class_names, config = jobs.load_trained(args.checkpoint, args.model)
    dataset = jobs.open_dataset(
        args.data,
        args.split,
        shapes_examples=config.shapes_train_examples,
        image_size=config.image_size,
        class_names=class_names,
    )
    unknown = sorted(set(dataset.class_names) - set(class_names))
    if unknown:
        raise jobs.JobError(f"the data has classes the checkpoint was not trained on: {', '.join(unknown)}")
    if list(dataset.class_names) != list(class_names):
        raise jobs.JobError(
            f"the data's classes {list(dataset.class_names)} differ from the checkpoint's {class_names}"
        )
    if args.batch_size:
        config = dataclasses.replace(config, batch_size=args.batch_size)
    metrics = jobs.evaluate(
        model, variables, dataset, config, progress=not args.no_progress, results=results, ground_truth=ground_truth
    )
    if metrics is None:  # another process scores and prints
        return 0
    keys = (
        "AP",
        "AP50",
        "AP75",
        "voc_AP50_all",
        "voc_AP50_11pt",
        "per_class_AP",
        "num_ground_truth",
        "num_images",
        "num_detections",
    )
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}, indent=2))
    return 0


def _predict(args) -> int:
    import jax

    from lucid_jax import jobs

    report = jobs.predict_files(
        args.images,
        args.checkpoint,
        args.out,
        model_name=args.model,
        score_thresh=args.score_thresh,
        batch_size=args.batch_size or (1 if jax.default_backend() == "cpu" else 8),
        draw=args.draw,
        results=_writable_file(args.results, "--results"),
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    drawn = f"{len(report.results)} PNG(s), " if args.draw else ""
    extra = f" and {args.results}" if args.results else ""
    print(f"{len(report.results)} image(s): wrote {drawn}{Path(args.out) / 'detections.json'}{extra}")
    for path, reason in report.failures:
        print(f"lucid-jax: skipped {path}: {reason}", file=sys.stderr)
    if report.failures:
        print(f"lucid-jax: {len(report.failures)} file(s) could not be read", file=sys.stderr)
        return 1
    return 0


def _export(args) -> int:
    from lucid_jax import jobs

    platforms = tuple(p for p in args.platforms.replace(" ", "").split(",") if p)
    if args.format == "onnx":
        paths = jobs.export_checkpoint_onnx(
            args.checkpoint,
            args.out,
            model_name=args.model,
            batch_size=args.batch_size or 1,
            score_thresh=args.score_thresh,
        )
        for path in paths:
            print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, ONNX) and {path}.json")
        if len(paths) > 1:
            print(f"wrote {args.out}.json: which canvas serves which image")
        return 0
    meta = jobs.export_checkpoint(
        args.checkpoint,
        args.out,
        model_name=args.model,
        batch_size=args.batch_size,
        platforms=platforms,
        score_thresh=args.score_thresh,
    )
    shapes = [c["canvas"] for c in meta["canvases"]] if "canvases" in meta else [meta["canvas"]]
    print(
        f"wrote {', '.join(meta['files'])} ({meta['bytes'] / 2**20:.1f} MiB; "
        f"canvas {', '.join(f'{h}x{w}' for h, w in shapes)}, batch {meta['batch_size']}, "
        f"{', '.join(meta['platforms'])}) and {args.out}.json in {meta['seconds']} s"
    )
    return 0


BENCHMARKS = {"ops": "bench_ops.py", "predict": "bench_predict.py", "train": "bench_train.py"}


def _bench(args) -> int:
    """Run the named benchmark scripts (all of them when none is named)."""
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    scripts = BENCHMARKS
    names = args.which or list(scripts)
    if not root.is_dir():
        raise FileNotFoundError(f"the benchmarks are in the source checkout ({root} not found); run from a clone")
    code = 0
    for name in names:
        print(f"== {scripts[name]}", flush=True)
        code |= subprocess.call([sys.executable, str(root / scripts[name]), *args.extra])
    return code


def _launch(args) -> int:
    from lucid_jax.distributed import launch_local

    return launch_local(
        args.local,
        args.command_args,
        devices_per_process=args.devices_per_process,
        port=args.port,
        timeout=args.timeout,
    )


def _seed(args) -> int:
    from lucid_jax import jobs

    jobs.seed_example(args.size, num_classes=args.num_classes, repeats=args.repeats)
    return 0


def _add_training_flags(p, overrides: dict, *, skip=()) -> None:
    """One flag per TrainConfig field, defaulting to None so that the run knows
    which flags were given; the help shows the effective default."""
    from lucid_jax.jobs import TrainConfig, detector_names

    defaults = TrainConfig(**overrides)
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        meta = dict(field.metadata)
        help_text = meta.pop("help")
        if meta.get("choices") == "models":  # checked later, so that a typo is one line naming the known ones
            del meta["choices"]
            help_text += f": {', '.join(detector_names())}"
        value = getattr(defaults, field.name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        shown = "none" if shown in (None, "") else shown
        if isinstance(meta.get("choices"), range):
            meta["metavar"] = f"{{{meta['choices'].start}..{meta['choices'].stop - 1}}}"
        p.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            default=None,
            help=f"{help_text} (default: {shown})".replace("%", "%%"),
            **meta,
        )
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


def _detector_names() -> list[str]:
    from lucid_jax.jobs import detector_names

    return detector_names()


def _demo_overrides() -> dict:
    from lucid_jax.jobs import DEMO_OVERRIDES

    return dict(DEMO_OVERRIDES)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (exit code 2) instead of the usage block."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"lucid-jax: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lucid-jax", description="Faster R-CNN (ResNet FPN) in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train on synthetic shapes, report AP on held-out images, draw detections")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    _add_training_flags(p, _demo_overrides(), skip=("data", "init", "split", "classes"))
    p.set_defaults(func=_demo)

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
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="AP, AP50, AP75 and per-class AP of a trained checkpoint, as JSON")
    p.add_argument("--data", required=True, help="shapes | voc:DIR | coco:ANNOTATIONS.json:IMAGE_DIR")
    p.add_argument("--checkpoint", required=True, help="a train --out directory")
    p.add_argument(
        "--split",
        default="val",
        help="shapes: val (held out); VOC: ImageSets/Main/<split>.txt, or all to score every image (default: val)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="the architecture expected in the checkpoint, one of "
        f"{', '.join(_detector_names())} (default: the checkpoint's)",
    )
    p.add_argument(
        "--batch-size",
        dest="batch_size",
        type=int,
        default=None,
        help="images per predict call; the metrics do not depend on it (default: the run's)",
    )
    p.add_argument(
        "--results",
        default=None,
        help="write the detections as a COCO results file: the annotation "
        "file's own image and category ids and [x, y, w, h] in original pixels (default: none)",
    )
    p.add_argument(
        "--ground-truth",
        dest="ground_truth",
        default=None,
        help="write the matching COCO ground "
        "truth (for VOC and shapes; VOC difficult objects as iscrowd 1) (default: none)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_distributed_flags(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="detect objects in image files, folders and globs; write detections.json")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--checkpoint", required=True, help="a train --out directory")
    p.add_argument("--out", required=True, help="folder for detections.json (and the drawings)")
    p.add_argument(
        "--model", default=None, help="the architecture expected in the checkpoint (default: the checkpoint's)"
    )
    p.add_argument(
        "--batch-size",
        dest="batch_size",
        type=int,
        default=None,
        help="images per predict call (default: 1 on a CPU, where larger batches measured slower; 8 on a GPU or TPU)",
    )
    p.add_argument(
        "--score-thresh",
        dest="score_thresh",
        type=float,
        default=None,
        help="keep detections scoring at least this (default: 0.05 with --results, COCO's convention; else 0.5)",
    )
    p.add_argument("--draw", action="store_true", help="also draw each image's detections to OUT/<name>_detections.png")
    p.add_argument(
        "--results",
        default=None,
        help="also write a COCO results file: image ids from numeric file "
        "names (else 1-based positions), category ids = labels, [x, y, w, h] in the file's pixels "
        "(default: none)",
    )
    p.add_argument("--num-workers", dest="num_workers", type=int, default=4, help="image decoding threads (default: 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="write a run's prediction as one serialized file (jax.export) and its JSON")
    p.add_argument("--checkpoint", required=True, help="a train --out directory")
    p.add_argument("--out", required=True, help="the artifact's file name; its description goes to OUT.json")
    p.add_argument(
        "--model", default=None, help="the architecture expected in the checkpoint (default: the checkpoint's)"
    )
    p.add_argument(
        "--batch-size",
        dest="batch_size",
        type=int,
        default=None,
        help="a fixed batch size (default: a symbolic batch dimension: any batch size)",
    )
    p.add_argument("--platforms", default="cpu,cuda,tpu", help="lower for these platforms (default: cpu,cuda,tpu)")
    p.add_argument(
        "--score-thresh",
        dest="score_thresh",
        type=float,
        default=None,
        help="the artifact's detection threshold (default: the model's, 0.05)",
    )
    p.add_argument(
        "--format",
        choices=("jax", "onnx"),
        default="jax",
        help="jax: a serialized jax.export program; onnx: an ONNX model (default: jax)",
    )
    p.set_defaults(func=_export)

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
    p.set_defaults(func=_bench)

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
    p.set_defaults(func=_seed)

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
    p.set_defaults(func=_launch)
    return parser


def _check_args(args) -> str | None:
    """A usage problem in the flags (exit code 2), before anything is loaded."""
    sizes = list(getattr(args, "size", None) or [])
    if sizes:
        from lucid_jax.jobs.config import size_divisibility

        multiple = size_divisibility("faster_rcnn_resnet_101_fpn")
        if any(s <= 0 or s % multiple for s in sizes):
            return f"image sizes must be positive multiples of {multiple}, got {sizes}"
    if args.func in (_train, _demo):
        from lucid_jax.jobs import JobError, check_config, check_model_name

        try:
            if args.model is not None:
                check_model_name(args.model)
            check_config(_config(args)[0])
        except JobError as e:
            return str(e)
    unknown = [w for w in getattr(args, "which", None) or [] if w not in BENCHMARKS]
    if unknown:
        return f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}"
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        return f"--batch-size must be >= 1, got {batch_size}"
    if args.func is _export:
        from lucid_jax.export import PLATFORMS

        platforms = [p for p in args.platforms.replace(" ", "").split(",") if p]
        if not platforms or set(platforms) - set(PLATFORMS):
            return f"--platforms must be among {', '.join(PLATFORMS)}, got {', '.join(platforms) or 'none'}"
    if hasattr(args, "coordinator"):
        from lucid_jax.distributed import check_args

        return check_args(args.coordinator, args.num_processes, args.process_id)
    if args.func is _launch:
        return _check_launch(args)
    return None


def _check_launch(args) -> str | None:
    if args.command_args[:1] == ["--"]:
        args.command_args = args.command_args[1:]
    if args.local < 1 or args.devices_per_process < 1:
        return f"--local and --devices-per-process must be >= 1, got {args.local} and {args.devices_per_process}"
    if args.command_args[:1] not in (["train"], ["eval"]):
        return "launch runs train or eval: lucid-jax launch --local N -- train ..."
    if {"--coordinator", "--num-processes", "--process-id"} & set(args.command_args):
        return "launch sets --coordinator, --num-processes and --process-id itself; leave them out"
    if args.timeout is not None and not args.timeout > 0:
        return f"--timeout must be > 0, got {args.timeout}"
    return None


def _join(args) -> None:
    """Join the run's other processes (``jax.distributed``) before any other JAX call."""
    from lucid_jax.distributed import initialize
    from lucid_jax.jobs import JobError

    try:
        initialize(args.coordinator, args.num_processes, args.process_id)
    except (RuntimeError, ValueError) as e:
        raise JobError(f"could not join the other processes: {e}") from None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"lucid-jax: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax's informational warnings are not for users
    from lucid_jax.checkpoint import CheckpointError
    from lucid_jax.data import DatasetError
    from lucid_jax.jobs import JobError
    from lucid_jax.state_dict import StateDictError

    try:
        if hasattr(args, "coordinator"):
            _join(args)
        return args.func(args)
    except (JobError, DatasetError, CheckpointError, StateDictError, OSError) as e:
        print(f"lucid-jax: error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lucid-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
