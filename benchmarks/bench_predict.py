"""Inference of lucid_jax's Faster R-CNN ResNet-101 FPN against torchvision's, on CPU.

    python benchmarks/bench_predict.py [--size 512] [--batch 1] [--steps 5]
                                       [--config lucid|torchvision] [--profile] [--no-rss]

Both sides run the same synthetic images (random, in [0, 1]) at size x size:

- ours: ``faster_rcnn_resnet_101_fpn(num_classes=21)`` (inference-mode BatchNorm),
  ``lucid_jax.train.make_predict_fn(model)``: RPN with 1000
  pre-NMS boxes per level and 300 proposals (the seed's), box head, softmax,
  per-class decode, score threshold 0.05, per-class NMS 0.5, top 100, padded.
  Also the seed's forward ``jax.jit(model.apply)`` (cls_logits [B, 300, 21] and
  bbox_deltas [B, 300, 4], no post-processing). ``--config torchvision`` uses
  TORCHVISION_FASTER_RCNN (3 anchors on P2..P6, 1000 proposals) instead.
- torchvision: ``FasterRCNN(resnet_fpn_backbone("resnet101", weights=None),
  num_classes=21, min_size=size, max_size=size)`` in eval mode under
  ``torch.inference_mode()``: 1000 pre-NMS boxes per level, 1000 proposals, the same
  box post-processing (0.05, 0.5, 100). ``min_size = max_size = size`` is required:
  the default min_size=800 would upsample 512x512 images to 800x800; the script
  checks the transformed batch is size x size.

Reported: medians over ``--steps`` calls per function, interleaved in this process
(after ``--warmup`` untimed calls), the ratios ours / torchvision (median of the
per-round ratios too), our compile times (the first call of each jitted function),
peak RSS per side from a fresh child process (``--side ours|torchvision``: build,
first call, ``--child-steps`` more, then ``getrusage(RUSAGE_SELF).ru_maxrss``),
GFLOP per call (XLA cost_analysis; torchvision's FlopCounterMode, matmuls and
convolutions only), achieved GFLOP/s and a float32 matmul ceiling. ``--profile``
adds where our predict's time goes (jax.profiler trace, per component).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import _profile as P  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="image height and width (multiple of 32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed calls per function (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per function after the first one")
    p.add_argument(
        "--config",
        choices=("lucid", "torchvision"),
        default="lucid",
        help="our model: the seed's (lucid) or TORCHVISION_FASTER_RCNN",
    )
    p.add_argument("--no-rss", action="store_true", help="skip the per-side child processes")
    p.add_argument("--child-steps", type=int, default=3, help="calls after the first one in each child")
    p.add_argument("--no-ceiling", action="store_true", help="skip the matmul ceiling")
    p.add_argument("--profile", action="store_true", help="also profile where our predict's time goes")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument(
        "--side",
        choices=("both", "ours", "torchvision"),
        default="both",
        help="internal: 'ours'/'torchvision' run one side alone (for its peak RSS)",
    )
    args = p.parse_args(argv)
    multiple = C.ours_model(args.config).backbone.size_divisibility
    if args.size % multiple:
        p.error(f"--size must be a multiple of {multiple} (the backbone's largest stride), got {args.size}")
    return args


def build_ours(args, images):
    """Our jitted predict and seed forward on ``images``; dict of blocking callables."""
    import jax
    import jax.numpy as jnp

    from lucid_jax.train import make_predict_fn

    model = C.ours_model(args.config)
    start = time.perf_counter()
    # The parameters do not depend on the image size; a 64x64 init compiles faster.
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 3, 64, 64), jnp.float32))
    jax.block_until_ready(variables)
    init_s = time.perf_counter() - start
    predict = make_predict_fn(model)
    forward = jax.jit(model.apply)
    x = jax.device_put(images)
    box = {}

    def run_predict():
        box["dets"] = jax.block_until_ready(predict(variables, x, None))

    def run_forward():
        box["forward"] = jax.block_until_ready(forward(variables, x))

    return {
        "predict": run_predict,
        "forward": run_forward,
        "box": box,
        "init_s": init_s,
        "jit_predict": predict,
        "variables": variables,
        "x": x,
    }


def build_torchvision(args, images):
    """torchvision's eval forward on the same images; a blocking callable."""
    import torch

    model = C.torchvision_model(args.size)
    batch = [torch.from_numpy(img) for img in images]
    C.check_torchvision_size(model, batch, args.size)
    model.eval()
    box = {}

    def run():
        with torch.inference_mode():
            box["dets"] = model(batch)

    return {"run": run, "box": box, "model": model}


def run_child_side(args, images):
    if args.side == "ours":
        fn = build_ours(args, images)["predict"]
    else:
        fn = build_torchvision(args, images)["run"]
    first = C.time_call(fn)
    times = [C.time_call(fn) for _ in range(args.child_steps)]
    C.emit_result(
        {
            "side": args.side,
            "first_call_s": first,
            "times_s": times,
            "median_s": C.median(times),
            "peak_rss_mib": C.peak_rss_mib(),
        }
    )


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        sys.exit(C.TV_MISSING)
    images = C.synthetic_batch(args.batch, args.size)["images"]
    if args.side != "both":
        return run_child_side(args, images)

    print(
        f"# bench_predict: Faster R-CNN ResNet-101 FPN inference, {args.batch}x3x{args.size}x{args.size}, "
        f"our config '{args.config}'"
    )
    print(C.environment_line())

    children = {}
    if not args.no_rss:
        script = os.path.abspath(__file__)
        argv_child = [
            "--size",
            str(args.size),
            "--batch",
            str(args.batch),
            "--config",
            args.config,
            "--child-steps",
            str(args.child_steps),
        ]
        for side in ("ours", "torchvision"):
            print(f"running the '{side}' child for its peak RSS ...", flush=True)
            children[side] = C.run_child(script, argv_child, side)

    print("building ours ...", flush=True)
    ours = build_ours(args, images)
    predict_first_s = C.time_call(ours["predict"])  # trace + compile + run
    forward_first_s = C.time_call(ours["forward"])
    compiled = ours["jit_predict"].lower(ours["variables"], ours["x"], None).compile()
    flops, bytes_accessed = C.xla_cost(compiled)
    compiled_text = compiled.as_text() if args.profile else None
    del compiled

    print("building torchvision ...", flush=True)
    tv = build_torchvision(args, images)
    tv_first_s = C.time_call(tv["run"])

    print(f"timing {args.steps} interleaved calls per function ...", flush=True)
    fns = {"ours predict": ours["predict"], "ours forward": ours["forward"], "torchvision": tv["run"]}
    times = C.interleaved(fns, args.steps, warmup=args.warmup)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        tv["run"]()
    tv_flops = float(counter.get_total_flops())
    ceiling = None if args.no_ceiling else C.matmul_ceiling()
    best_ceiling = max(v for v in ceiling.values() if v) if ceiling else None

    tv_med = C.median(times["torchvision"])
    print(
        f"\n## Inference time ({args.steps} calls per function, interleaved in one process, "
        f"after {args.warmup} warm-up)"
    )
    rows = []
    for name in fns:
        med = C.median(times[name])
        fl = tv_flops if name == "torchvision" else (flops if name == "ours predict" else None)
        gf = f"{fl / 1e9:.0f}" if fl else "-"
        achieved = f"{fl / med / 1e9:.0f}" if fl else "-"
        share = f"{100 * fl / med / 1e9 / best_ceiling:.0f}%" if fl and best_ceiling else "-"
        per_round = [a / b for a, b in zip(times[name], times["torchvision"])]
        rows.append(
            (
                name,
                f"{med:.3f}",
                C.spread(times[name]),
                f"{med / tv_med:.2f}x",
                f"{C.median(per_round):.2f}x",
                gf,
                achieved,
                share,
            )
        )
    C.print_table(
        rows,
        [
            "function",
            "median s",
            "min..max s",
            "vs tv (medians)",
            "vs tv (per round)",
            "GFLOP",
            "GFLOP/s",
            "of ceiling",
        ],
    )
    print(
        "GFLOP: ours from XLA cost_analysis of predict (every HLO op), torchvision from FlopCounterMode "
        "(matmuls and convolutions only)."
    )
    print(f"our predict's bytes accessed (XLA): {bytes_accessed / 2**30:.2f} GiB")
    if ceiling:
        tv_part = f", torch.mm {ceiling['torch']:.0f}" if ceiling.get("torch") else ""
        print(f"float32 ceiling (best 4096^3 matmul): jnp.dot {ceiling['jax']:.0f} GFLOP/s{tv_part}")

    print("\n## Compile time and memory")
    rows = [
        ("ours: init (jit(model.init) at 64x64)", f"{ours['init_s']:.1f} s"),
        ("ours: predict, first call (trace + compile + run)", f"{predict_first_s:.1f} s"),
        ("ours: seed forward, first call (trace + compile + run)", f"{forward_first_s:.1f} s"),
        ("torchvision: first call", f"{tv_first_s:.2f} s"),
    ]
    for side in ("ours", "torchvision"):
        res = children.get(side)
        if res:
            rows += [
                (f"{side} child: peak RSS", f"{res['peak_rss_mib']:.0f} MiB"),
                (f"{side} child: first call", f"{res['first_call_s']:.1f} s"),
                (f"{side} child: median of {len(res['times_s'])} more calls (alone)", f"{res['median_s']:.3f} s"),
            ]
        elif not args.no_rss:
            rows.append((f"{side} child", "failed (see stderr)"))
    C.print_table(rows, ["what", "value"])
    if children.get("ours") and children.get("torchvision"):
        print(
            f"peak RSS ours / torchvision: "
            f"{children['ours']['peak_rss_mib'] / children['torchvision']['peak_rss_mib']:.2f}x "
            "(each side in its own process; ours includes XLA's compile)"
        )

    import numpy as np

    dets = ours["box"]["dets"]
    n_ours = int(np.sum(np.asarray(dets["valid"])))
    n_tv = sum(len(d["boxes"]) for d in tv["box"]["dets"])
    print(f"\ndetections kept (random weights): ours {n_ours}, torchvision {n_tv}")

    if args.profile:
        op_times, wall = P.trace_op_times(
            ours["predict"], args.profile_steps, tempfile.mkdtemp(prefix="bench_predict_trace_")
        )
        rows, kinds, top = P.op_breakdown(compiled_text, op_times)
        busy = sum(op_times.values())
        print(
            f"\n## Profile of our predict (jax.profiler, {args.profile_steps} call(s), wall {wall:.3f} s/call, "
            f"op busy time {busy:.3f} s/call)"
        )
        C.print_table(
            [(c, f"{1e3 * s:.0f}", f"{100 * s / busy:.1f}", n) for c, d, s, n in rows],
            ["component", "ms/call", "%", "ops"],
        )
        print()
        C.print_table(
            [(k, f"{1e3 * s:.0f}", f"{100 * s / busy:.1f}") for k, s in sorted(kinds.items(), key=lambda kv: -kv[1])],
            ["kind", "ms/call", "%"],
        )
        P.profile_torch(tv["run"], "torchvision's top ops over one call")
    return {name: C.median(t) for name, t in times.items()}


if __name__ == "__main__":
    main()
