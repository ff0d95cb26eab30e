"""One training step of lucid_jax's Faster R-CNN ResNet-101 FPN against torchvision's, on CPU.

    python benchmarks/bench_train.py [--size 512] [--batch 2] [--rounds 3] [--child-steps 3]
                                     [--compare same|default] [--profile] [--no-interleaved]

Both sides train the same synthetic batch (random images in [0, 1], ``--boxes``
random boxes per image, labels 1..20) at size x size. Two comparisons:

- ``--compare same`` (default; the figure to quote): torchvision's fine-tuning
  recipe on both sides with the same weights. torchvision's
  ``FasterRCNN(resnet_fpn_backbone("resnet101", trainable_layers=N), num_classes=21,
  min_size=size, max_size=size)`` with realistic random weights (non-trivial frozen
  BN statistics, damped residual branches; the RPN and the classifier at a fresh
  head's scale, so that the losses start near a fresh head's and SGD stays stable),
  and ours built
  with ``TORCHVISION_FASTER_RCNN`` and ``norm_mode="frozen"`` holding those very
  weights, fed the images normalised as torchvision's transform does. Before
  anything is timed, both sides predict on the batch and their detections are
  checked equal (the run stops if not). Both train the top N stages (default 3)
  with SGD (lr 0.01, momentum 0.9, weight decay 1e-4).
- ``--compare default`` (labelled as such; not the same work): our default model
  (``faster_rcnn_resnet_101_fpn()``, BatchNorm with batch statistics, every stage
  trained, its own random weights) against torchvision with every stage trainable.

ours: the jitted ``make_train_step(frozen=...)`` (frozen parameters get no gradient
work), SGD from ``build_optimizer(trainable_backbone_layers=N, ...)``. torchvision:
train mode, loss = sum of the loss dict, backward, ``torch.optim.SGD`` over the
parameters that require grad. ``min_size = max_size = size`` keeps the batch at size x
size (the default 800 would upsample it), which the script checks.

What it reports:

- **each side alone** (the headline): a fresh process per side, alternating ours,
  torchvision, ours, ... for ``--rounds`` rounds. Each child builds its side, takes a
  first step (ours: trace and compile), times ``--child-steps`` more and reports
  their median, its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``, our compile
  included) and the peak over the timed steps alone (Linux's VmHWM, reset after the
  first step), and its minor page faults and kernel time per timed step
  (``ru_minflt``, ``ru_stime``). The ours child never imports torch. The ratios
  ours / torchvision are the medians of the per-round ratios;
- a second figure, labelled as such (skipped by ``--no-interleaved``): step times
  taken in this process with the two sides interleaved (after ``--warmup``
  untimed steps each): ``--interleaved-rounds`` rounds, each running ``--block``
  consecutive steps of one side and then of the other (the order alternates from
  round to round). It prints each side's median, the ratio of the medians ours /
  torchvision (below 1: we are faster) and the median of the per-round ratios (each
  side's median step within the round), the most robust figure on a loaded machine.
  With ``--block`` above 1 it also prints the ratio of the first steps of the
  blocks alone. In each round the side that goes second starts right after the
  other side's block; the side that goes first starts after its own block of the
  round before (after the other side's warm-up in round 0). ``--block 1`` runs one
  step per side per round. Consecutive steps are what a training run does; a step
  right after the other side's pays for the pages the other side's allocator
  handed back (see docs/benchmarks.md);
- our compile time: trace + lower, XLA compile, and the first call;
- FLOPs per step: ours from XLA's ``cost_analysis()`` of the compiled step (every
  HLO op, elementwise work included), torchvision's from
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions only),
  the achieved GFLOP/s each side alone, and its share of a float32 ceiling
  measured as the best of a few 4096x4096 matmuls (jnp.dot and torch.mm);
- with ``--profile``: where our step's time goes, from a jax.profiler trace of
  ``--profile-steps`` steps, per detector component (forward / backward) and per
  op kind, plus torchvision's top ops from torch.profiler.
"""

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import _profile as P  # noqa: E402

# The RPN's and the classifier's scale in training (see _common.realistic_weights).
TRAIN_SPREAD = 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=C.size_arg, default=(512, 512), help="S or HxW, multiples of 32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (ours, torchvision) children, each side alone")
    p.add_argument("--child-steps", type=int, default=3, help="timed steps after the first one in each child")
    p.add_argument("--no-interleaved", action="store_true", help="only the each-side-alone figures")
    p.add_argument("--interleaved-rounds", type=int, default=5, help="interleaved rounds of --block steps per side")
    p.add_argument(
        "--block",
        type=int,
        default=3,
        help="consecutive steps per side in a round (1: strict alternation, each step after the other side's)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side after the first call")
    p.add_argument("--trainable-layers", type=int, default=3, help="trainable backbone stages, both sides")
    p.add_argument("--boxes", type=int, default=4, help="ground-truth boxes per image")
    p.add_argument(
        "--compare",
        choices=("same", "default"),
        default="same",
        help="same: torchvision's recipe with the same weights; default: the default configurations",
    )
    p.add_argument("--weights-file", default=None, help="internal: the ours child's weights (.npz)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--no-ceiling", action="store_true", help="skip the matmul ceiling")
    p.add_argument("--profile", action="store_true", help="also profile where our step's time goes")
    p.add_argument("--profile-steps", type=int, default=1)
    p.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--side",
        choices=("both", "ours", "torchvision", "weights", "check"),
        default="both",
        help="internal: 'ours'/'torchvision' run one side alone; 'weights' writes the weights",
    )
    args = p.parse_args(argv)
    if min(args.rounds, args.block, args.child_steps, args.interleaved_rounds) < 1:
        p.error("--rounds, --child-steps, --interleaved-rounds and --block must be at least 1")
    if args.compare == "default":
        args.trainable_layers = 5
    multiple = C.ours_model().backbone.size_divisibility
    if any(x % multiple for x in args.size):
        p.error(f"--size must be multiples of {multiple} (the backbone's largest stride), got {args.size}")
    return args


def child_argv(args):
    """The arguments a child needs to build the same step."""
    return [
        "--size",
        C.size_text(args.size),
        "--batch",
        str(args.batch),
        "--boxes",
        str(args.boxes),
        "--trainable-layers",
        str(args.trainable_layers),
        "--compare",
        args.compare,
        "--lr",
        str(args.lr),
        "--child-steps",
        str(args.child_steps),
    ]


# --- the two steps ------------------------------------------------------------------


def build_ours(args, batch, model, variables):
    """Our jitted train step on ``batch`` (images normalised as torchvision's), ready to call.

    Returns a dict with "run" (one blocking step), "box" (the current "state" and
    last "metrics"), "step", "batch" (on device) and "model".
    """
    import jax

    from lucid_jax.optim import build_optimizer, param_labels
    from lucid_jax.train import create_train_state, make_train_step

    frozen_bn = args.compare == "same"
    tx = build_optimizer(
        variables["params"],
        learning_rate=args.lr,
        momentum=0.9,
        weight_decay=1e-4,
        trainable_backbone_layers=args.trainable_layers,
        freeze_batchnorm=frozen_bn,
    )
    # the same labels freeze parameters in the optimizer and skip their gradients in the step
    frozen = param_labels(
        variables["params"], trainable_backbone_layers=args.trainable_layers, freeze_batchnorm=frozen_bn
    )
    box = {"state": create_train_state(model, variables, tx), "i": 0}
    step = make_train_step(model, frozen=frozen)
    jbatch = {k: jax.device_put(C.normalised(v) if k == "images" else v) for k, v in batch.items()}
    keys = [jax.random.key(i) for i in range(1000)]

    def run():
        box["state"], metrics = step(box["state"], jbatch, keys[box["i"] % len(keys)])
        box["i"] += 1
        jax.block_until_ready((box["state"], metrics))
        box["metrics"] = metrics

    return {"run": run, "box": box, "step": step, "batch": jbatch, "model": model}


def ours_weights(args, tv_model=None):
    """(model, variables, seconds): torchvision's weights imported (same), a weights file
    (the ours child), or our default model's own random init (default)."""
    import jax
    import jax.numpy as jnp

    from lucid_jax import state_dict, state_dict_files

    start = time.perf_counter()
    if args.compare == "default":
        model = C.ours_model()
        variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 3, 64, 64), jnp.float32))
        variables = C.spread_heads(jax.block_until_ready(variables), TRAIN_SPREAD)
    elif tv_model is not None:
        model, variables = C.ours_from_torchvision(tv_model)
    else:
        model = C.ours_model("torchvision", norm_mode="frozen")
        template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 64, 64), jnp.float32))
        template = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), template)
        flat = state_dict_files.load_state_dict_file(args.weights_file)
        variables = state_dict.from_state_dict(template, flat, model=model)
    return model, variables, time.perf_counter() - start


def check_same_predictions(model, variables, tv_model, images):
    """Both sides' detections on the batch, checked equal before training (see _common)."""
    import torch

    from lucid_jax.inference import make_predict_fn

    ours = make_predict_fn(model)(variables, C.normalised(images), None)
    tv_model.eval()
    with torch.inference_mode():
        theirs = tv_model([torch.from_numpy(x) for x in images])
    tv_model.train()
    return C.check_same_detections(ours, theirs)


def build_torchvision(args, batch):
    """torchvision's training step on the same batch; returns a dict with "run"."""
    import torch

    model = C.torchvision_model(args.size, trainable_layers=args.trainable_layers, spread=TRAIN_SPREAD)
    images = [torch.from_numpy(x) for x in batch["images"]]
    C.check_torchvision_size(model, images, args.size)
    targets = C.torchvision_targets(batch)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    box = {}

    def run():
        optimizer.zero_grad(set_to_none=True)
        losses = model(images, targets)
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        box["metrics"] = {k: float(v.detach()) for k, v in losses.items()}

    return {"run": run, "box": box, "model": model, "params": params}


def torchvision_flops(tv):
    """FLOPs of one torchvision step (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        tv["run"]()
    return float(counter.get_total_flops())


# --- modes --------------------------------------------------------------------------


def run_child_side(args):
    """One side alone: build, first step, a few steps; print the JSON result."""
    if args.side == "weights":
        C.write_same_weights(args.size, args.weights_file, spread=TRAIN_SPREAD)
        return C.emit_result({"side": "weights"})
    batch = C.synthetic_batch(args.batch, args.size, args.boxes)
    if args.side == "check":
        tv = build_torchvision(args, batch)
        model, variables, _ = ours_weights(args, tv["model"])
        return C.emit_result(check_same_predictions(model, variables, tv["model"], batch["images"]))
    if args.side == "ours":
        model, variables, _ = ours_weights(args)
        side = build_ours(args, batch, model, variables)
        del variables  # the train state holds the weights now, as torchvision's model holds its own
    else:
        side = build_torchvision(args, batch)
    first = C.time_call(side["run"])
    windowed = C.reset_peak_rss()  # from here on: the steps' own peak, compile and first call excluded
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = [C.time_call(side["run"]) for _ in range(args.child_steps)]
    after = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "side": args.side,
        "first_call_s": first,
        "times_s": times,
        "median_s": C.median(times),
        "peak_rss_mib": C.peak_rss_mib(),
        "steps_peak_rss_mib": C.window_peak_rss_mib() if windowed else None,
        # first touches of fresh pages, and the kernel's time (all threads) for them and the rest
        "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / args.child_steps,
        "system_s_per_step": (after.ru_stime - before.ru_stime) / args.child_steps,
    }
    if args.flops:  # after the memory figures: our cost analysis compiles the step again
        if args.side == "ours":
            state = side["box"]["state"]
            compiled = side["step"].jitted.lower(state, side["batch"], jax_key(0)).compile()
            result["gflop"] = C.xla_cost(compiled)[0] / 1e9
        else:
            result["gflop"] = torchvision_flops(side) / 1e9
    C.emit_result(result)


def jax_key(seed):
    import jax

    return jax.random.key(seed)


def headline(args, what):
    """Each side alone in its own process, alternating, for ``--rounds`` rounds; the figures."""
    argv = child_argv(args)
    script = os.path.abspath(__file__)
    if args.compare == "same":
        weights = os.path.join(tempfile.mkdtemp(prefix="bench_train_"), "weights.npz")
        argv += ["--weights-file", weights]
        if C.run_child(script, argv, "weights") is None:
            sys.exit("could not write the shared weights")
        C.check_in_child(script, argv)
    results = C.alone_rounds(script, argv, args.rounds, first_round_extra=["--flops"])
    out = C.report_alone(
        results,
        f"Step time, {what}: each side alone in its own process (the headline; {args.rounds} rounds, "
        f"{args.child_steps} timed steps per child after its first)",
        rss_keys=(("peak_rss_mib", "peak RSS"), ("steps_peak_rss_mib", "steps' peak RSS")),
    )
    out["gflop"] = {side: results[side][0].get("gflop") for side in results}
    faults = {side: C.median([r["minor_faults_per_step"] for r in results[side]]) for side in results}
    system = {side: C.median([r["system_s_per_step"] for r in results[side]]) for side in results}
    print(
        "minor page faults per step (kernel time per step, all threads): "
        + ", ".join(f"{side} {faults[side]:,.0f} ({system[side]:.2f} s)" for side in results)
    )
    return out


def profile_ours(ours, compiled_text, steps):
    """Print where our step's time goes."""
    op_times, wall = P.trace_op_times(ours["run"], steps, tempfile.mkdtemp(prefix="bench_train_trace_"))
    rows, kinds, top = P.op_breakdown(compiled_text, op_times)
    busy = sum(op_times.values())
    print(
        f"\n## Profile of our step (jax.profiler, {steps} step(s), wall {wall:.2f} s/step, "
        f"op busy time {busy:.2f} s/step; ops on the two threads overlap, so busy > wall)"
    )
    print("\nBy component (fwd = forward, bwd = backward; % of op busy time):")
    C.print_table(
        [(c, d or "-", f"{1e3 * s:.0f}", f"{100 * s / busy:.1f}", n) for c, d, s, n in rows],
        ["component", "pass", "ms/step", "%", "ops"],
    )
    print("\nBy op kind:")
    C.print_table(
        [(k, f"{1e3 * s:.0f}", f"{100 * s / busy:.1f}") for k, s in sorted(kinds.items(), key=lambda kv: -kv[1])],
        ["kind", "ms/step", "%"],
    )
    print("\nLargest single ops:")
    C.print_table(
        [(name, comp, d or "-", kind, f"{1e3 * s:.0f}") for s, name, comp, d, kind in top[:40]],
        ["hlo op", "component", "pass", "kind", "ms/step"],
    )


def main(argv=None):
    args = parse_args(argv)
    if args.side != "ours":  # the ours child never imports torch, whose libraries alone take 600 MiB
        try:
            import torch  # noqa: F401
            import torchvision  # noqa: F401
        except ImportError:
            sys.exit(C.TV_MISSING)
    if args.side != "both":
        return run_child_side(args)

    what = "same weights, same work" if args.compare == "same" else "default configurations, not the same work"
    print(
        f"# bench_train: Faster R-CNN ResNet-101 FPN training step, {args.batch}x3x{C.size_text(args.size)}, "
        f"trainable backbone layers {args.trainable_layers}, "
        + ("same weights, torchvision's recipe" if args.compare == "same" else what)
    )
    print(C.environment_line())
    alone = headline(args, what)  # first, while this process is small: Linux keeps peak RSS across exec
    ceiling = None if args.no_ceiling else C.matmul_ceiling()
    C.print_ceiling_share(alone, ceiling, per="step")
    if args.no_interleaved and not args.profile:
        return alone

    import jax

    batch = C.synthetic_batch(args.batch, args.size, args.boxes)
    print("building torchvision's step ...", flush=True)
    tv = build_torchvision(args, batch)
    model, variables, import_s = ours_weights(args, tv["model"])
    check = None
    if args.compare == "same":
        check = check_same_predictions(model, variables, tv["model"], batch["images"])
        print(
            f"same detections on both sides before training: {check['detections']} per image, boxes within "
            f"{check['max_box_diff']:.2g} px, {check['swapped']} near-tie rank swaps",
            flush=True,
        )
    tv_first_s = C.time_call(tv["run"])

    print("building our step ...", flush=True)
    ours = build_ours(args, batch, model, variables)
    del variables
    state, jbatch = ours["box"]["state"], ours["batch"]
    rng = jax.random.key(0)
    start = time.perf_counter()
    lowered = ours["step"].jitted.lower(state, jbatch, rng)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    first_s = C.time_call(ours["run"])  # the jitted call reuses the executable compiled above
    flops, bytes_accessed = C.xla_cost(compiled)
    compiled_text = compiled.as_text() if args.profile else None
    del lowered, compiled, state

    if args.no_interleaved:  # --profile alone
        profile_ours(ours, compiled_text, args.profile_steps)
        P.profile_torch(tv["run"], "torchvision's top ops over one step")
        return alone
    rounds = args.interleaved_rounds
    print(f"timing {rounds} interleaved rounds of {args.block} steps per side ...", flush=True)
    times = C.interleaved({"ours": ours["run"], "torchvision": tv["run"]}, rounds, warmup=args.warmup, block=args.block)
    ours_med, tv_med = C.median(times["ours"]), C.median(times["torchvision"])
    round_ratios = C.round_ratios(times, "ours", "torchvision", args.block)
    first_ratios = C.round_ratios(times, "ours", "torchvision", args.block, pick=0)
    print(
        f"\n## Step time, {what}, interleaved in one process (a second figure, not the headline: {rounds} rounds "
        f"of {args.block} steps per side, after {args.warmup} warm-up)"
    )
    rows = [(name, f"{C.median(times[name]):.2f}", C.spread(times[name])) for name in ("ours", "torchvision")]
    C.print_table(rows, ["side", "median s", "min..max s"])
    print(
        f"ratio ours / torchvision, interleaved: {ours_med / tv_med:.2f}x (medians), "
        f"{C.median(round_ratios):.2f}x (median of per-round ratios: "
        f"{', '.join(f'{r:.2f}' for r in round_ratios)})"
    )
    if args.block > 1:
        print(
            f"the first step of each block only (the round's second side starts after the other side's block, "
            f"its first side after its own): "
            f"{C.median(first_ratios):.2f}x (per round: {', '.join(f'{r:.2f}' for r in first_ratios)}); "
            f"the steps within a block: ours {', '.join(f'{x:.2f}' for x in times['ours'])}, "
            f"torchvision {', '.join(f'{x:.2f}' for x in times['torchvision'])}"
        )
    print(
        f"our step's bytes accessed (XLA): {bytes_accessed / 2**30:.1f} GiB; "
        f"arithmetic intensity {flops / bytes_accessed:.1f} FLOP/byte"
    )
    print("\n## Compile time")
    rows = [
        ("ours: weights (imported from torchvision, or init at 64x64)", f"{import_s:.1f} s"),
        ("ours: trace + lower the step", f"{lower_s:.1f} s"),
        ("ours: XLA compile", f"{compile_s:.1f} s"),
        ("ours: first call after compile", f"{first_s:.1f} s"),
        ("torchvision: first step", f"{tv_first_s:.1f} s"),
    ]
    C.print_table(rows, ["what", "value"])

    m_ours = {k: float(v) for k, v in ours["box"]["metrics"].items()}
    print("\nlast losses, ours: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(m_ours.items())))
    print("last losses, torchvision: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(tv["box"]["metrics"].items())))

    if args.profile:
        profile_ours(ours, compiled_text, args.profile_steps)
        P.profile_torch(tv["run"], "torchvision's top ops over one step")
    alone["interleaved_ratio"] = C.median(round_ratios)
    return alone


if __name__ == "__main__":
    main()
