"""Inference of lucid_jax's Faster R-CNN ResNet-101 FPN against torchvision's, on CPU.

    python benchmarks/bench_predict.py [--size 512] [--batch 1] [--rounds 3] [--steps 5] [--profile]
    python benchmarks/bench_predict.py --size 800x1344          # the COCO canvas
    python benchmarks/bench_predict.py --model v2 [--size 512] [--rounds 3]

Both sides see the same synthetic images (random, in [0, 1]) at ``--size`` (S or
HxW). torchvision's ``FasterRCNN(resnet_fpn_backbone("resnet101"), num_classes=21,
min_size=min(H, W), max_size=max(H, W))``, which keeps the H x W batch as it is
(checked), gets realistic random weights (non-trivial frozen BN statistics, damped
residual branches, RPN and classifier spread so that about 100 detections pass the
0.05 threshold), and ours, built with ``TORCHVISION_FASTER_RCNN`` and
``norm_mode="frozen"``, holds those very weights and gets the images normalised as
torchvision's transform normalises them. Before anything is timed, both sides'
detections are checked equal (count, labels, boxes within 0.5 px); the run stops if
they are not.

1. **Each side alone** (the headline figure). A fresh process per side, alternating
   ours, torchvision, ours, ... for ``--rounds`` rounds; each child builds its side,
   makes a first call, times ``--child-steps`` more and reports their median and its
   peak RSS (the ours child loads the weights from a file and never imports torch).
   The ratio ours / torchvision is the median of the per-round ratios. The first
   round's ours child also times a user's plain
   ``jax.jit(lambda v, x: model.apply(v, x, method="predict"))`` against
   ``make_predict_fn`` (the library's, with its compiler options), alternating.
2. **Interleaved in one process** (a second figure, labelled as such, skipped by
   ``--no-interleaved``): ``--steps`` calls per function, ours and torchvision's
   alternating in this process, and a second table comparing the default
   configurations, which do not do the same work: our seed model
   (``faster_rcnn_resnet_101_fpn()``: 9 anchors on P2..P5, 300 proposals) with its
   own random weights, the classifier spread alike, against the same torchvision model.

ours: ``lucid_jax.inference.make_predict_fn(model)`` (RPN, box head, softmax, per-class
decode, score threshold 0.05, per-class NMS 0.5, top 100, padded). torchvision: eval
mode under ``torch.inference_mode()``.

Also reported: GFLOP per call (ours: XLA's ``cost_analysis`` of the compiled
predict, which counts every HLO op, elementwise work included; torchvision's:
FlopCounterMode, matmuls and convolutions only), the achieved GFLOP/s and its share
of a float32 matmul ceiling (the best of a few 4096^3 products, jnp.dot and
torch.mm), and our compile times. ``--profile`` adds where our predict's time goes
(jax.profiler trace, per component).

``--model v2`` compares torchvision's ``fasterrcnn_resnet50_fpn_v2`` (91 classes)
with ours, ``faster_rcnn_resnet_50_fpn_v2_torchvision``, on the same realistic
random weights (every BatchNorm's statistics random, the residual branches damped,
the RPN and the classifier spread): detections are checked equal first, then each
side runs alone in its own process as above.
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
    p.add_argument("--size", type=C.size_arg, default=(512, 512), help="S or HxW, multiples of 32 (512, 800x1344)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (ours, torchvision) children, each side alone")
    p.add_argument("--child-steps", type=int, default=3, help="timed calls after the first one in each child")
    p.add_argument("--steps", type=int, default=5, help="timed calls per function, interleaved in one process")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per function after the first one")
    p.add_argument("--no-interleaved", action="store_true", help="only the each-side-alone figures")
    p.add_argument("--no-plain-check", action="store_true", help="skip timing a plain jax.jit against ours")
    p.add_argument("--weights-file", default=None, help="internal: the ours child's weights (.npz)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the matmul ceiling")
    p.add_argument("--profile", action="store_true", help="also profile where our predict's time goes")
    p.add_argument(
        "--model",
        choices=("r101", "v2"),
        default="r101",
        help="r101: the ResNet-101 FPN tables below; v2: torchvision's v2 ResNet-50 FPN, each side alone",
    )
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--plain-check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--side",
        choices=("both", "ours", "torchvision", "weights", "check"),
        default="both",
        help="internal: 'ours'/'torchvision' run one side alone; 'weights' writes the weights; "
        "'check' compares both sides' detections",
    )
    args = p.parse_args(argv)
    multiple = C.ours_model().backbone.size_divisibility
    if any(x % multiple for x in args.size):
        p.error(f"--size must be multiples of {multiple} (the backbone's largest stride), got {args.size}")
    if args.rounds < 1 or args.child_steps < 1:
        p.error(f"--rounds and --child-steps must be at least 1, got {args.rounds} and {args.child_steps}")
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
    model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **C.torchvision_sizes(size))
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


def ours_same_weights(weights_file):
    """Our TORCHVISION_FASTER_RCNN detector (frozen BN) with the weights file's weights."""
    import jax
    import jax.numpy as jnp

    from lucid_jax import state_dict, state_dict_files

    model = C.ours_model("torchvision", norm_mode="frozen")
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 64, 64)))
    template = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), template)
    return model, state_dict.from_state_dict(template, state_dict_files.load_state_dict_file(weights_file), model=model)


def plain_jit_check(model, ours, steps):
    """A user's plain ``jax.jit`` of ``model.apply(..., method="predict")`` against ours, alternating.

    Checks the detections equal first. Returns {"plain_s", "library_s", "plain_ratio"}.
    """
    import jax

    plain = jax.jit(lambda v, x: model.apply(v, x, method="predict"))
    box = {}

    def run_plain():
        box["dets"] = jax.block_until_ready(plain(ours["variables"], ours["x"]))

    run_plain()
    for key in ("boxes", "scores", "labels", "valid"):
        a, b = np.asarray(box["dets"][key]), np.asarray(ours["box"]["dets"][key])
        if not np.allclose(a, b, atol=1e-3, rtol=0):
            raise RuntimeError(f"a plain jax.jit's {key} differ from make_predict_fn's")
    times = C.interleaved({"plain": run_plain, "library": ours["predict"]}, steps, warmup=0)
    ratios = [a / b for a, b in zip(times["plain"], times["library"])]
    return {
        "plain_s": C.median(times["plain"]),
        "library_s": C.median(times["library"]),
        "plain_ratio": C.median(ratios),
    }


def run_child_side(args, images):
    """One side alone (or the weights, or the check), in this fresh process; prints the JSON result."""
    v2 = args.model == "v2"
    if args.side == "weights":
        if v2:
            from lucid_jax import state_dict, state_dict_files

            flat = state_dict.from_torchvision_faster_rcnn(v2_torchvision(args.size).state_dict())
            state_dict_files.save_state_dict_file(flat, args.weights_file)
        else:
            C.write_same_weights(args.size, args.weights_file)
        return C.emit_result({"side": "weights"})
    if args.side == "check":
        import torch

        tv = v2_torchvision(args.size) if v2 else build_torchvision(args, images)["model"].eval()
        with torch.inference_mode():
            theirs = tv([torch.from_numpy(img) for img in images])
        del tv
        model, variables = v2_ours(args.weights_file) if v2 else ours_same_weights(args.weights_file)
        ours = build_ours(model, variables, images)
        ours["predict"]()
        return C.emit_result(C.check_same_detections(ours["box"]["dets"], theirs))
    result = {"side": args.side}
    if args.side == "ours":
        model, variables = v2_ours(args.weights_file) if v2 else ours_same_weights(args.weights_file)
        ours = build_ours(model, variables, images)
        del variables  # the device copy serves; torchvision's model holds one copy too
        fn = ours["predict"]
    elif v2:
        import torch

        tv = v2_torchvision(args.size)
        batch = [torch.from_numpy(img) for img in images]
        C.check_torchvision_size(tv, batch, args.size)

        def fn():
            with torch.inference_mode():
                tv(batch)
    else:
        tv = build_torchvision(args, images)
        fn = tv["run"]
    result["first_call_s"] = C.time_call(fn)
    result["times_s"] = [C.time_call(fn) for _ in range(args.child_steps)]
    result["median_s"] = C.median(result["times_s"])
    result["peak_rss_mib"] = C.peak_rss_mib()
    if args.side == "ours":
        compiled = ours["jit_predict"].lower(ours["variables"], ours["x"], None).compile()
        result["gflop"] = C.xla_cost(compiled)[0] / 1e9
        del compiled
        if args.plain_check:
            result.update(plain_jit_check(model, ours, args.child_steps))
    else:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            fn()
        result["gflop"] = float(counter.get_total_flops()) / 1e9
    C.emit_result(result)


def headline(args, label):
    """Weights and the equality check in children, then each side alone; the figures."""
    script = os.path.abspath(__file__)
    weights = os.path.join(tempfile.mkdtemp(prefix="bench_predict_"), "weights.npz")
    argv = ["--model", args.model, "--size", C.size_text(args.size), "--batch", str(args.batch)]
    argv += ["--child-steps", str(args.child_steps), "--weights-file", weights]
    if C.run_child(script, argv, "weights") is None:
        sys.exit("could not write the shared weights")
    check = C.check_in_child(script, argv)
    plain = ["--plain-check"] if args.model == "r101" and not args.no_plain_check else []
    results = C.alone_rounds(script, argv, args.rounds, first_round_extra=plain)
    out = C.report_alone(
        results,
        f"{label}: each side alone in its own process (the headline; {args.rounds} rounds, "
        f"{args.child_steps} timed calls per child after its first; {check['detections']} detections per "
        "image on both sides, checked equal)",
    )
    out["detections"] = check["detections"]
    out["gflop"] = {side: results[side][0]["gflop"] for side in results}
    plain = results["ours"][0]
    if "plain_ratio" in plain:
        out["plain_ratio"] = plain["plain_ratio"]
        print(
            f"a plain jax.jit(lambda v, x: model.apply(v, x, method='predict')) in the first ours child: "
            f"{plain['plain_s']:.3f} s against make_predict_fn's {plain['library_s']:.3f} s, "
            f"{plain['plain_ratio']:.2f}x (median of {args.child_steps} alternating pairs; same detections)"
        )
    return out


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
    shape = f"{args.batch}x3x{C.size_text(args.size)}"
    if args.model == "v2":
        print(f"# bench_predict --model v2: torchvision's Faster R-CNN v2 ResNet-50 FPN, {shape}")
        print(C.environment_line())
        alone = headline(args, "Predict, v2")
        if not args.no_ceiling:
            ceiling = C.matmul_ceiling()
            C.print_ceiling_share(alone, ceiling)
        return alone

    print(f"# bench_predict: Faster R-CNN ResNet-101 FPN inference, {shape}")
    print(C.environment_line())
    alone = headline(args, "Predict, same weights, same work")  # first, while this process is small
    ceiling = None if args.no_ceiling else C.matmul_ceiling()
    C.print_ceiling_share(alone, ceiling)
    if args.no_interleaved and not args.profile:
        return alone

    print("\nbuilding torchvision (realistic random weights) and ours with the same weights ...", flush=True)
    tv = build_torchvision(args, images)
    tv_first_s = C.time_call(tv["run"])
    start = time.perf_counter()
    model, variables = C.ours_from_torchvision(tv["model"])
    import_s = time.perf_counter() - start
    same = build_ours(model, variables, images)
    predict_first_s = C.time_call(same["predict"])  # trace + compile + run
    C.check_same_detections(same["box"]["dets"], tv["box"]["dets"])
    compiled = same["jit_predict"].lower(same["variables"], same["x"], None).compile()
    compiled_text = compiled.as_text() if args.profile else None
    del compiled

    if not args.no_interleaved:
        default_model, default_variables, init_s = ours_default()
        default = build_ours(default_model, default_variables, images)
        default_first_s = C.time_call(default["predict"])
        forward_first_s = C.time_call(default["forward"])
        print(f"timing {args.steps} interleaved calls per function ...", flush=True)
        fns = {
            "ours predict, same weights": same["predict"],
            "ours predict, default config": default["predict"],
            "ours seed forward, default config": default["forward"],
            "torchvision": tv["run"],
        }
        times = C.interleaved(fns, args.steps, warmup=args.warmup)

        def table(title, names):
            print(f"\n## {title}")
            tv_med = C.median(times["torchvision"])
            rows = []
            for name in names:
                med = C.median(times[name])
                per_round = [a / b for a, b in zip(times[name], times["torchvision"])]
                rows.append(
                    (name, f"{med:.3f}", C.spread(times[name]), f"{C.median(per_round):.2f}x", f"{med / tv_med:.2f}x")
                )
            C.print_table(rows, ["function", "median s", "min..max s", "vs tv (per round)", "vs tv (medians)"])

        n_default = [int(v) for v in np.asarray(default["box"]["dets"]["valid"]).sum(-1)]
        table(
            f"Interleaved in one process (a second figure, not the headline: {args.steps} calls per function, "
            f"after {args.warmup} warm-up; same weights, same work)",
            ["ours predict, same weights", "torchvision"],
        )
        table(
            f"Default configurations, interleaved (not the same work: our seed model, 300 proposals, its own "
            f"weights, {n_default} detections per image, against torchvision's defaults, 1000 proposals)",
            ["ours predict, default config", "ours seed forward, default config", "torchvision"],
        )
        print("\n## Compile time")
        rows = [
            ("ours: torchvision's weights imported", f"{import_s:.1f} s"),
            ("ours: predict (same weights), first call (trace + compile + run)", f"{predict_first_s:.1f} s"),
            ("ours: init of the default config (jit(model.init) at 64x64)", f"{init_s:.1f} s"),
            ("ours: predict (default config), first call", f"{default_first_s:.1f} s"),
            ("ours: seed forward (default config), first call", f"{forward_first_s:.1f} s"),
            ("torchvision: first call", f"{tv_first_s:.2f} s"),
        ]
        C.print_table(rows, ["what", "value"])
        alone["interleaved_ratio"] = C.median(
            [a / b for a, b in zip(times["ours predict, same weights"], times["torchvision"])]
        )

    if args.profile:
        op_times, wall = P.trace_op_times(
            same["predict"], args.profile_steps, tempfile.mkdtemp(prefix="bench_predict_trace_")
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
        print("\nLargest single ops:")
        C.print_table(
            [(name, comp, kind, f"{1e3 * s:.1f}") for s, name, comp, d, kind in top[:20]],
            ["hlo op", "component", "kind", "ms/call"],
        )
        P.profile_torch(tv["run"], "torchvision's top ops over one call")
    return alone


if __name__ == "__main__":
    main()
