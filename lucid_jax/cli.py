"""The ``lucid-jax`` command line: it parses arguments, calls a job of
``lucid_jax.jobs`` and prints.

    lucid-jax demo     [--out runs/demo] [--steps 800]
    lucid-jax train    --data {shapes|voc:DIR|coco:ANN.json:IMG_DIR} --out DIR [--init WEIGHTS] [...]
    lucid-jax eval     --data ... --checkpoint DIR [--split val] [--results FILE] [--ground-truth FILE]
    lucid-jax predict  PATH... --checkpoint DIR --out DIR [--batch-size B] [--draw] [--results FILE]
    lucid-jax export   --checkpoint DIR --out FILE [--batch-size B] [--platforms cpu,cuda,tpu]
    lucid-jax plot     OUT [--png FILE]
    lucid-jax bench    [ops] [predict] [train]
    lucid-jax seed     [--size 224 512]
    lucid-jax launch   --local N [--devices-per-process D] -- train ...

``train`` and ``eval`` run as one of several processes with ``--coordinator
HOST:PORT --num-processes N --process-id I`` (``jax.distributed``), or by
themselves in a detected cluster (a TPU pod, SLURM, ``JAX_COORDINATOR_ADDRESS``);
only process 0 prints. ``launch`` starts N such processes on this machine.

Bad input is one line on stderr. This module checks usage (exit code 2) before
anything is loaded; the jobs raise ``JobError`` for data and files (exit code 1).
The parser (``lucid_jax.cli_parser``) makes the flags of ``train`` from
``jobs.TrainConfig``, the one home of every training default, and those of
``eval``, ``predict`` and ``export`` from ``jobs.EvalOptions``, ``PredictOptions``
and ``ExportOptions``.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from lucid_jax.cli_parser import BENCHMARKS, EXIT_USAGE, build_parser


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


def _options(args, cls):
    """The options dataclass ``cls`` (e.g. ``EvalOptions``) of the parsed flags."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


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


def _eval(args) -> int:
    from lucid_jax import jobs

    o = _options(args, jobs.EvalOptions)
    metrics = jobs.evaluate_checkpoint(
        o.checkpoint,
        o.data,
        split=o.split,
        model_name=o.model,
        batch_size=o.batch_size,
        progress=not o.no_progress,
        results=o.results,
        ground_truth=o.ground_truth,
        step=o.step,
        compute_dtype=o.compute_dtype,
        max_detections=o.max_detections,
        tile=o.tile,
        overlap=o.overlap,
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
        "coco_max_dets",
        "tile",
        "overlap",
    )
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}, indent=2))
    return 0


def _predict(args) -> int:
    import jax

    from lucid_jax import jobs

    o = _options(args, jobs.PredictOptions)
    report = jobs.predict_files(
        o.images,
        o.checkpoint,
        o.out,
        model_name=o.model,
        score_thresh=o.score_thresh,
        batch_size=o.batch_size or (1 if jax.default_backend() == "cpu" else 8),
        draw=o.draw,
        draw_max_side=o.draw_max_side,
        tile=o.tile,
        overlap=o.overlap,
        results=o.results,
        num_workers=o.num_workers,
        progress=not o.no_progress,
        step=o.step,
        compute_dtype=o.compute_dtype,
        max_detections=o.max_detections,
    )
    drawn = f"{len(report.results)} PNG(s), " if o.draw else ""
    extra = f" and {o.results}" if o.results else ""
    print(f"{len(report.results)} image(s): wrote {drawn}{Path(o.out) / 'detections.json'}{extra}")
    for path, reason in report.failures:
        print(f"lucid-jax: skipped {path}: {reason}", file=sys.stderr)
    if report.failures:
        print(f"lucid-jax: {len(report.failures)} file(s) could not be read", file=sys.stderr)
        return 1
    return 0


def _export(args) -> int:
    from lucid_jax import jobs

    o = _options(args, jobs.ExportOptions)
    if o.format == "onnx":
        paths = jobs.export_checkpoint_onnx(
            o.checkpoint,
            o.out,
            model_name=o.model,
            batch_size=o.batch_size or 1,
            score_thresh=o.score_thresh,
            step=o.step,
            compute_dtype=o.compute_dtype,
            max_detections=o.max_detections,
        )
        for path in paths:
            print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, ONNX) and {path}.json")
        if len(paths) > 1:
            print(f"wrote {o.out}.json: which canvas serves which image")
        return 0
    meta = jobs.export_checkpoint(
        o.checkpoint,
        o.out,
        model_name=o.model,
        batch_size=o.batch_size,
        platforms=o.platforms,
        score_thresh=o.score_thresh,
        step=o.step,
        compute_dtype=o.compute_dtype,
        max_detections=o.max_detections,
    )
    shapes = [c["canvas"] for c in meta["canvases"]] if "canvases" in meta else [meta["canvas"]]
    print(
        f"wrote {', '.join(meta['files'])} ({meta['bytes'] / 2**20:.1f} MiB; "
        f"canvas {', '.join(f'{h}x{w}' for h, w in shapes)}, batch {meta['batch_size']}, "
        f"{', '.join(meta['platforms'])}) and {o.out}.json in {meta['seconds']} s"
    )
    return 0


def _plot(args) -> int:
    from lucid_jax.jobs.curves import plot_run

    print(f"wrote {plot_run(args.out, args.png)}")
    return 0


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


def _check_args(args) -> str | None:
    """A usage problem in the flags (exit code 2), before anything is loaded."""
    sizes = list(getattr(args, "size", None) or [])
    if sizes:
        from lucid_jax.jobs.config import size_divisibility

        multiple = size_divisibility("faster_rcnn_resnet_101_fpn")
        if any(s <= 0 or s % multiple for s in sizes):
            return f"image sizes must be positive multiples of {multiple}, got {sizes}"
    if args.command in ("train", "demo"):
        from lucid_jax.jobs import JobError, check_config, check_model_name

        try:
            if args.model is not None:
                check_model_name(args.model)
            check_config(_config(args)[0])
        except JobError as e:
            return str(e)
    elif args.command in ("eval", "predict", "export"):
        if args.batch_size is not None and args.batch_size < 1:
            return f"--batch-size must be >= 1, got {args.batch_size}"
        if args.step not in ("latest", "best") and not args.step.isdigit():
            return f"--step must be latest, best or a step number, got {args.step!r}"
        if args.max_detections is not None and args.max_detections < 1:
            return f"--max-detections must be >= 1, got {args.max_detections}"
        if getattr(args, "tile", None) is not None and args.tile < 1:
            return f"--tile must be >= 1 pixel, got {args.tile}"
        if getattr(args, "tile", None) is not None and not 0 <= args.overlap < 1:
            return f"--overlap must be in [0, 1), got {args.overlap}"
        if getattr(args, "draw_max_side", 0) < 0:
            return f"--draw-max-side must be >= 0 (0: no limit), got {args.draw_max_side}"
    unknown = [w for w in getattr(args, "which", None) or [] if w not in BENCHMARKS]
    if unknown:
        return f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}"
    if args.command == "export":
        from lucid_jax.export import PLATFORMS

        if not args.platforms or set(args.platforms) - set(PLATFORMS):
            got = ", ".join(args.platforms) or "none"
            return f"--platforms must be among {', '.join(PLATFORMS)}, got {got}"
    if hasattr(args, "coordinator"):
        from lucid_jax.distributed import check_args

        return check_args(args.coordinator, args.num_processes, args.process_id)
    if args.command == "launch":
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


COMMANDS = {
    "demo": _demo,
    "train": _train,
    "eval": _eval,
    "predict": _predict,
    "export": _export,
    "plot": _plot,
    "bench": _bench,
    "seed": _seed,
    "launch": _launch,
}


def main(argv=None) -> int:
    """Run one ``lucid-jax`` command.

    Args:
      argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
      The exit code: 0, 1 for data and file errors, 2 for usage errors, 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"lucid-jax: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    import absl.logging

    # orbax's informational warnings are not for users, and its errors reach the job,
    # which says them in one line (a full disk: one line, not orbax's thread reports)
    absl.logging.set_verbosity(absl.logging.FATAL)
    from lucid_jax.data import DatasetError
    from lucid_jax.files import describe
    from lucid_jax.jobs import JobError
    from lucid_jax.manifest import CheckpointError
    from lucid_jax.state_dict_files import StateDictError

    try:
        if hasattr(args, "coordinator"):
            _join(args)
        return COMMANDS[args.command](args)
    except OSError as e:
        print(f"lucid-jax: error: {describe(e)}".splitlines()[0], file=sys.stderr)
        return 1
    except (JobError, DatasetError, CheckpointError, StateDictError) as e:
        print(f"lucid-jax: error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lucid-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
