"""Inference of lucid_jax's Faster R-CNN ResNet-101 FPN against torchvision's, on CPU.

    python benchmarks/bench_predict.py [--size 512] [--batch 1] [--steps 5] [--profile] [--no-rss]
    python benchmarks/bench_predict.py --model v2 [--size 512] [--rounds 3]

``--model v2`` compares torchvision's ``fasterrcnn_resnet50_fpn_v2`` (91 classes,
``min_size = max_size = size``) with ours, ``faster_rcnn_resnet_50_fpn_v2_torchvision``,
on the same realistic random weights (every BatchNorm's statistics random, the
residual branches damped, the RPN and the classifier spread): detections are
checked equal first, then each side runs alone in its own process, alternating
ours and torchvision's for ``--rounds`` rounds; the ratio is the median of the
per-round ratios of each child's median call time.

Without ``--model v2``:

Both sides see the same synthetic images (random, in [0, 1]) at size x size, and the
run gives two tables from one interleaved timing:

1. **Same weights, same work** (the figure to quote). torchvision's
   ``FasterRCNN(resnet_fpn_backbone("resnet101"), num_classes=21, min_size=size,
   max_size=size)`` with realistic random weights (non-trivial frozen BN statistics,
   damped residual branches, RPN and classifier spread so that about 100 detections
   pass the 0.05 threshold), and ours built with ``TORCHVISION_FASTER_RCNN`` and
   ``norm_mode="frozen"`` holding those very weights. Before anything is timed, both
   sides' detections are checked equal (count, labels, boxes within 0.5 px); the run
   stops if they are not. Ours gets the images normalised as torchvision's
   transform normalises them.
2. **Default configurations** (labelled as such): our seed model
   (``faster_rcnn_resnet_101_fpn()``: 9 anchors on P2..P5, 300 proposals) with its own
   random weights and the classifier spread alike, against the same torchvision model.

ours: ``lucid_jax.inference.make_predict_fn(model)`` (RPN, box head, softmax, per-class
decode, score threshold 0.05, per-class NMS 0.5, top 100, padded). torchvision: eval
mode under ``torch.inference_mode()``; ``min_size = max_size = size`` keeps the
batch at size x size (the default 800 would upsample it), which the script checks.

Reported: medians over ``--steps`` calls per function, interleaved in this process
(after ``--warmup`` untimed calls), the ratio ours / torchvision as the median of
the per-round ratios (and of the medians), our compile times, peak RSS per side
from a fresh child process (``--side ours|torchvision``: build, first call,
``--child-steps`` more, then ``getrusage(RUSAGE_SELF).ru_maxrss``; the ours child
loads the same weights from a file and never imports torch), GFLOP per call (XLA
cost_analysis; torchvision's FlopCounterMode, matmuls and convolutions only),
achieved GFLOP/s and a float32 matmul ceiling. ``--profile`` adds where our
predict's time goes (jax.profiler trace, per component).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import _profile as P  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="image height and width (multiple of 32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed calls per function (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per function after the first one")
    p.add_argument("--weights-file", default=None, help="internal: the ours child's weights (.npz)")
    p.add_argument("--no-rss", action="store_true", help="skip the per-side child processes")
    p.add_argument("--child-steps", type=int, default=3, help="calls after the first one in each child")
    p.add_argument("--no-ceiling", action="store_true", help="skip the matmul ceiling")
    p.add_argument("--profile", action="store_true", help="also profile where our predict's time goes")
    p.add_argument(
        "--model",
        choices=("r101", "v2"),
        default="r101",
        help="r101: the ResNet-101 FPN tables below; v2: torchvision's v2 ResNet-50 FPN, each side alone",
    )
    p.add_argument("--rounds", type=int, default=3, help="--model v2: rounds of (ours, torchvision) children")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument(
        "--side",
        choices=("both", "ours", "torchvision", "weights", "check"),
        default="both",
        help="internal: 'ours'/'torchvision' run one side alone (for its peak RSS); 'weights' writes the "
        "weights; 'check' compares both sides' detections (--model v2)",
    )
    args = p.parse_args(argv)
    multiple = C.ours_model().backbone.size_divisibility
    if args.size % multiple:
        p.error(f"--size must be a multiple of {multiple} (the backbone's largest stride), got {args.size}")
    return args


def build_ours(model, variables, images):
    """Our jitted predict and seed forward on ``images`` (normalised); blocking callables."""
    import jax

    from lucid_jax.inference import make_predict_fn

    predict = make_predict_fn(model)
    forward = jax.jit(model.apply)
    variables = jax.device_put(variables)  # once, as a loaded model is: no host copy per call
    x = jax.device_put(C.normalised(images))
    box = {}

    def run_predict():
        box["dets"] = jax.block_until_ready(predict(variables, x, None))

    def run_forward():
        box["forward"] = jax.block_until_ready(forward(variables, x))

    return {
        "predict": run_predict,
        "forward": run_forward,
        "box": box,
        "jit_predict": predict,
        "variables": variables,
        "x": x,
    }


def ours_default(seed=0):
    """Our seed model with its own random weights, the classifier spread; (model, variables, init s)."""
    import jax
    import jax.numpy as jnp

    model = C.ours_model()
    start = time.perf_counter()
    # The parameters do not depend on the image size; a 64x64 init compiles faster.
    variables = jax.block_until_ready(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 3, 64, 64))))
    return model, C.spread_heads(variables), time.perf_counter() - start


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


def v2_torchvision(size, seed=0):
    """torchvision's fasterrcnn_resnet50_fpn_v2 (91 classes) with realistic random weights, in eval mode."""
    import torch
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

    torch.manual_seed(seed)
    model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, min_size=size, max_size=size)
    C.realistic_weights(model, seed)
    return model.eval()


def v2_ours(weights_file):
    """Our faster_rcnn_resnet_50_fpn_v2_torchvision with the weights file's (Lucid-named) weights."""
    import jax
    import jax.numpy as jnp

    from lucid_jax import state_dict, state_dict_files
    from lucid_jax.models import get_model

    model = get_model("faster_rcnn_resnet_50_fpn_v2_torchvision")
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 64, 64)))
    template = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), template)
    flat = state_dict_files.load_state_dict_file(weights_file)
    return model, state_dict.from_state_dict(template, flat, strict=False, model=model)


def run_v2_child(args, images):
    """One side of ``--model v2`` alone: build, first call, ``--child-steps`` timed calls."""
    if args.side == "weights":
        from lucid_jax import state_dict, state_dict_files

        flat = state_dict.from_torchvision_faster_rcnn(v2_torchvision(args.size).state_dict())
        state_dict_files.save_state_dict_file(flat, args.weights_file)
        return C.emit_result({"side": "weights"})
    if args.side == "check":
        import torch

        with torch.inference_mode():
            theirs = v2_torchvision(args.size)([torch.from_numpy(img) for img in images])
        model, variables = v2_ours(args.weights_file)
        ours = build_ours(model, variables, images)
        ours["predict"]()
        return C.emit_result(C.check_same_detections(ours["box"]["dets"], theirs))
    if args.side == "ours":
        model, variables = v2_ours(args.weights_file)
        fn = build_ours(model, variables, images)["predict"]
        del variables
    else:
        import torch

        tv = v2_torchvision(args.size)
        batch = [torch.from_numpy(img) for img in images]
        C.check_torchvision_size(tv, batch, args.size)

        def fn():
            with torch.inference_mode():
                tv(batch)

    first = C.time_call(fn)
    times = [C.time_call(fn) for _ in range(args.child_steps)]
    C.emit_result(
        {"side": args.side, "first_call_s": first, "median_s": C.median(times), "peak_rss_mib": C.peak_rss_mib()}
    )


def main_v2(args, images):
    """``--model v2``: detections checked equal, then each side alone, alternating."""
    print(
        f"# bench_predict --model v2: torchvision's Faster R-CNN v2 ResNet-50 FPN, "
        f"{args.batch}x3x{args.size}x{args.size}"
    )
    print(C.environment_line())
    script = os.path.abspath(__file__)
    weights = os.path.join(tempfile.mkdtemp(prefix="bench_predict_v2_"), "weights.npz")
    argv_child = ["--model", "v2", "--size", str(args.size), "--batch", str(args.batch)]
    argv_child += ["--child-steps", str(args.child_steps), "--weights-file", weights]
    if C.run_child(script, argv_child, "weights") is None:
        sys.exit("could not write the shared weights")

    # Checked in a child too: Linux keeps a process's peak RSS across fork and exec, so
    # this process stays small for the measuring children it starts.
    print("checking both sides' detections on the same weights ...", flush=True)
    check = C.run_child(script, argv_child, "check")
    if check is None:
        sys.exit("the two sides' detections differ (see above); nothing is timed")
    print(
        f"same detections on both sides: {check['detections']} per image, boxes within "
        f"{check['max_box_diff']:.2g} px, {check['swapped']} near-tie rank swaps",
        flush=True,
    )

    results = {"ours": [], "torchvision": []}
    for r in range(args.rounds):
        for side in ("ours", "torchvision"):
            print(f"round {r + 1}/{args.rounds}: the '{side}' child ...", flush=True)
            res = C.run_child(script, argv_child, side)
            if res is None:
                sys.exit(f"the {side} child failed")
            results[side].append(res)
    ratios = [o["median_s"] / t["median_s"] for o, t in zip(results["ours"], results["torchvision"])]
    rss = [o["peak_rss_mib"] / t["peak_rss_mib"] for o, t in zip(results["ours"], results["torchvision"])]
    print(f"\n## Each side alone ({args.rounds} rounds, {args.child_steps} timed calls per child, same weights)")
    rows = [
        (
            side,
            f"{C.median([x['median_s'] for x in results[side]]):.3f}",
            ", ".join(f"{x['median_s']:.3f}" for x in results[side]),
            f"{C.median([x['first_call_s'] for x in results[side]]):.1f}",
            f"{C.median([x['peak_rss_mib'] for x in results[side]]):.0f}",
        )
        for side in ("ours", "torchvision")
    ]
    C.print_table(rows, ["side", "median s", "per round s", "first call s", "peak RSS MiB"])
    print(
        f"ours / torchvision: {C.median(ratios):.2f}x time (median of per-round ratios "
        f"{', '.join(f'{x:.2f}' for x in ratios)}), {C.median(rss):.2f}x peak RSS"
    )
    return {"ratio": C.median(ratios), "rss_ratio": C.median(rss), "detections": check["detections"]}


def run_child_side(args, images):
    if args.model == "v2":
        return run_v2_child(args, images)
    if args.side == "weights":
        C.write_same_weights(args.size, args.weights_file)
        return C.emit_result({"side": "weights"})
    if args.side == "ours":
        import jax
        import jax.numpy as jnp

        from lucid_jax import state_dict, state_dict_files

        model = C.ours_model("torchvision", norm_mode="frozen")
        template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 64, 64)))
        template = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), template)
        variables = state_dict.from_state_dict(
            template, state_dict_files.load_state_dict_file(args.weights_file), model=model
        )
        fn = build_ours(model, variables, images)["predict"]
        del variables  # the device copy serves; torchvision's model holds one copy too
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
    if args.side != "ours":  # the ours child never imports torch, whose libraries alone take 600 MiB
        try:
            import torch  # noqa: F401
            import torchvision  # noqa: F401
        except ImportError:
            sys.exit(C.TV_MISSING)
    images = C.synthetic_batch(args.batch, args.size)["images"]
    if args.side != "both":
        return run_child_side(args, images)
    if args.model == "v2":
        return main_v2(args, images)

    print(f"# bench_predict: Faster R-CNN ResNet-101 FPN inference, {args.batch}x3x{args.size}x{args.size}")
    print(C.environment_line())

    children = {}
    if not args.no_rss:  # first, while this process is small: Linux keeps peak RSS across exec
        script = os.path.abspath(__file__)
        weights = os.path.join(tempfile.mkdtemp(prefix="bench_predict_"), "weights.npz")
        argv_child = [
            "--size",
            str(args.size),
            "--batch",
            str(args.batch),
            "--child-steps",
            str(args.child_steps),
            "--weights-file",
            weights,
        ]
        if C.run_child(script, argv_child, "weights") is not None:
            for side in ("ours", "torchvision"):
                print(f"running the '{side}' child for its peak RSS ...", flush=True)
                children[side] = C.run_child(script, argv_child, side)

    print("building torchvision (realistic random weights) and ours with the same weights ...", flush=True)
    tv = build_torchvision(args, images)
    tv_first_s = C.time_call(tv["run"])
    start = time.perf_counter()
    model, variables = C.ours_from_torchvision(tv["model"])
    import_s = time.perf_counter() - start
    same = build_ours(model, variables, images)
    predict_first_s = C.time_call(same["predict"])  # trace + compile + run
    check = C.check_same_detections(same["box"]["dets"], tv["box"]["dets"])
    print(
        f"same detections on both sides: {check['detections']} per image, boxes within "
        f"{check['max_box_diff']:.2g} px, {check['swapped']} near-tie rank swaps",
        flush=True,
    )

    default_model, default_variables, init_s = ours_default()
    default = build_ours(default_model, default_variables, images)
    default_first_s = C.time_call(default["predict"])
    forward_first_s = C.time_call(default["forward"])
    compiled = same["jit_predict"].lower(same["variables"], same["x"], None).compile()
    flops, bytes_accessed = C.xla_cost(compiled)
    compiled_text = compiled.as_text() if args.profile else None
    del compiled

    print(f"timing {args.steps} interleaved calls per function ...", flush=True)
    fns = {
        "ours predict, same weights": same["predict"],
        "ours predict, default config": default["predict"],
        "ours seed forward, default config": default["forward"],
        "torchvision": tv["run"],
    }
    times = C.interleaved(fns, args.steps, warmup=args.warmup)

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        tv["run"]()
    tv_flops = float(counter.get_total_flops())
    ceiling = None if args.no_ceiling else C.matmul_ceiling()
    best_ceiling = max(v for v in ceiling.values() if v) if ceiling else None

    def table(title, names):
        print(f"\n## {title}")
        tv_med = C.median(times["torchvision"])
        rows = []
        for name in names:
            med = C.median(times[name])
            fl = tv_flops if name == "torchvision" else (flops if name == "ours predict, same weights" else None)
            gf = f"{fl / 1e9:.0f}" if fl else "-"
            achieved = f"{fl / med / 1e9:.0f}" if fl else "-"
            share = f"{100 * fl / med / 1e9 / best_ceiling:.0f}%" if fl and best_ceiling else "-"
            per_round = [a / b for a, b in zip(times[name], times["torchvision"])]
            rows.append(
                (
                    name,
                    f"{med:.3f}",
                    C.spread(times[name]),
                    f"{C.median(per_round):.2f}x",
                    f"{med / tv_med:.2f}x",
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
                "vs tv (per round)",
                "vs tv (medians)",
                "GFLOP",
                "GFLOP/s",
                "of ceiling",
            ],
        )

    n_default = [int(v) for v in np.asarray(default["box"]["dets"]["valid"]).sum(-1)]
    table(
        f"Same weights, same work ({args.steps} calls per function, interleaved, after {args.warmup} warm-up; "
        f"{check['detections']} detections per image on both sides, checked equal)",
        ["ours predict, same weights", "torchvision"],
    )
    table(
        f"Default configurations (not the same work: our seed model, 300 proposals, its own weights, "
        f"{n_default} detections per image, against torchvision's defaults, 1000 proposals)",
        ["ours predict, default config", "ours seed forward, default config", "torchvision"],
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
        ("ours: torchvision's weights imported", f"{import_s:.1f} s"),
        ("ours: predict (same weights), first call (trace + compile + run)", f"{predict_first_s:.1f} s"),
        ("ours: init of the default config (jit(model.init) at 64x64)", f"{init_s:.1f} s"),
        ("ours: predict (default config), first call", f"{default_first_s:.1f} s"),
        ("ours: seed forward (default config), first call", f"{forward_first_s:.1f} s"),
        ("torchvision: first call", f"{tv_first_s:.2f} s"),
    ]
    for side in ("ours", "torchvision"):
        res = children.get(side)
        if res:
            rows += [
                (f"{side} child (same weights): peak RSS", f"{res['peak_rss_mib']:.0f} MiB"),
                (f"{side} child: first call", f"{res['first_call_s']:.1f} s"),
                (f"{side} child: median of {len(res['times_s'])} more calls (alone)", f"{res['median_s']:.3f} s"),
            ]
        elif not args.no_rss:
            rows.append((f"{side} child", "failed (see stderr)"))
    C.print_table(rows, ["what", "value"])
    if children.get("ours") and children.get("torchvision"):
        ratio = children["ours"]["peak_rss_mib"] / children["torchvision"]["peak_rss_mib"]
        print(f"peak RSS ours / torchvision: {ratio:.2f}x (each side in its own process; ours includes XLA's compile)")
    ours = same

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
