"""Throughput, compile time and model FLOPs utilisation on whatever JAX backend is present.

    python benchmarks/accelerator.py [--json FILE]          # the full figures, for a GPU or TPU
    python benchmarks/accelerator.py --small                # a quick end-to-end run on CPU

Three configurations, each compiled once (``jit(...).lower(...).compile()``, then
only the compiled executable is called):

1. **Inference, float32**: ``predict`` of the seed's ResNet-101 FPN
   (``faster_rcnn_resnet_101_fpn(num_classes=91)``) on a batch of 8 canvases of
   800 x 1344 (H x W), with the RPN's objectness and the classifier spread as in
   ``bench_predict.py``, so that post-processing keeps about 100 detections per
   image and NMS does real work (the count kept is printed).
2. **Inference, bfloat16**: the same, computed in bfloat16 (``dtype=jnp.bfloat16``;
   parameters, box arithmetic and scores stay float32).
3. **Training, bfloat16 compute, float32 parameters**: ``make_train_step`` of the
   same model with trained BatchNorm and every stage trainable (the default
   recipe: SGD with momentum), on a batch of 16 canvases of 1024 x 1024 with 4
   ground-truth boxes each.

Each configuration runs once untimed after compiling, then timed calls until
``--seconds`` have passed (at least ``--min-steps``, at most ``--max-steps``).
Printed per configuration: the compile time, the median seconds per call, images
per second, the GFLOP per call from XLA's ``cost_analysis`` of the compiled
executable, the achieved TFLOP/s and the model FLOPs utilisation (MFU): achieved
FLOP/s over the device's dense bfloat16 peak from ``PEAK_BF16_TFLOPS`` (vendor
datasheets). The float32 row is measured against that bfloat16 peak too, so it
says how far float32 is from the fastest mode. On a device not in the table (a
CPU), MFU is against a measured ceiling: the best of a few large matmuls in the
configuration's dtype, and it is labelled so.

XLA counts a multiply-add as 2 FLOPs; the loops of NMS count once per trip, so
the FLOPs are a lower bound, and so is the MFU.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

# Dense bfloat16 matrix peaks, TFLOP/s, from vendor datasheets. Keys are matched
# against ``jax.devices()[0].device_kind``, longest key first.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v2": 45.0,
    "TPU v3": 123.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}

FULL = {
    "name": "full",
    "model": "resnet101",
    "infer_size": (800, 1344),
    "infer_batch": 8,
    "train_size": (1024, 1024),
    "train_batch": 16,
    "num_classes": 91,
}
SMALL = {
    "name": "small",
    "model": "mini",
    "infer_size": (128, 192),
    "infer_batch": 2,
    "train_size": (128, 128),
    "train_batch": 2,
    "num_classes": 5,
}
SETUPS = {"full": FULL, "small": SMALL}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a tiny ResNet at 128 px, for a CPU smoke run")
    p.add_argument("--only", default="infer-f32,infer-bf16,train-bf16", help="comma-separated configurations")
    p.add_argument("--seconds", type=float, default=8.0, help="time each configuration about this long")
    p.add_argument("--min-steps", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def peak_tflops(device_kind: str) -> float | None:
    """The dense bfloat16 peak of a device kind, or None if it is not in the table."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in device_kind.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def measured_ceiling_tflops(dtype, n=2048, repeats=3) -> float:
    """Achieved TFLOP/s of the best of ``repeats`` n x n matmuls in ``dtype``."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    dot = jax.jit(jnp.dot).lower(a, a).compile()
    jax.block_until_ready(dot(a, a))
    best = min(C.time_call(lambda: jax.block_until_ready(dot(a, a))) for _ in range(repeats))
    return 2.0 * n**3 / best / 1e12


def build(setup, dtype):
    """The detector of ``setup`` computing in ``dtype``."""
    from lucid_jax.models import faster_rcnn_mini_fpn, faster_rcnn_resnet_101_fpn

    make = faster_rcnn_resnet_101_fpn if setup["model"] == "resnet101" else faster_rcnn_mini_fpn
    return make(num_classes=setup["num_classes"], dtype=dtype)


@functools.cache
def initial_variables(setup_name):
    """Random initial variables of the setup's model (float32; the same for every dtype).

    Initialised on a 64 x 64 image: parameter shapes do not depend on the size.
    """
    import jax
    import jax.numpy as jnp

    setup = SETUPS[setup_name]
    model = build(setup, jnp.float32)
    image = jnp.zeros((1, 3, 64, 64), jnp.float32)
    return jax.jit(model.init)(jax.random.key(0), image, jnp.array([[64, 64]], jnp.int32))


def synthetic(batch, size, num_boxes=4, seed=0):
    """Images [B, 3, H, W] (standard normal, as normalised images are) and 4 boxes each."""
    rng = np.random.default_rng(seed)
    h, w = size
    images = rng.standard_normal((batch, 3, h, w), dtype=np.float32)
    wh = rng.uniform(32, min(256, min(h, w) // 2), (batch, num_boxes, 2))
    xy = rng.uniform(0, 1, (batch, num_boxes, 2)) * (np.array([w, h]) - wh)
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    return {
        "images": images,
        "boxes": boxes,
        "labels": rng.integers(1, 5, (batch, num_boxes)).astype(np.int32),
        "valid": np.ones((batch, num_boxes), bool),
        "image_sizes": np.tile(np.array([[h, w]], np.int32), (batch, 1)),
    }


def time_compiled(run, args):
    """Median seconds per call of ``run`` (blocking), timed for about ``args.seconds``."""
    run()  # untimed: first-call allocations
    times = []
    start = time.perf_counter()
    while len(times) < args.max_steps and (len(times) < args.min_steps or time.perf_counter() - start < args.seconds):
        times.append(C.time_call(run))
    return statistics.median(times), len(times)


def bench_infer(setup, dtype_name, args):
    import jax
    import jax.numpy as jnp

    from lucid_jax.inference import make_predict_fn

    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype_name]
    model = build(setup, dtype)
    data = synthetic(setup["infer_batch"], setup["infer_size"])
    images = jax.device_put(data["images"])
    sizes = jax.device_put(data["image_sizes"])
    variables = C.spread_heads(initial_variables(setup["name"]))
    start = time.perf_counter()
    compiled = make_predict_fn(model).lower(variables, images, sizes).compile()
    compile_s = time.perf_counter() - start
    out = compiled(variables, images, sizes)
    kept = float(np.asarray(out["valid"]).sum(axis=1).mean())
    seconds, steps = time_compiled(lambda: jax.block_until_ready(compiled(variables, images, sizes)), args)
    flops, _ = C.xla_cost(compiled)
    return {
        "compile_s": compile_s,
        "seconds": seconds,
        "steps": steps,
        "images": setup["infer_batch"],
        "flops": flops,
        "detections_per_image": kept,
        "dtype": dtype,
    }


def bench_train(setup, args):
    import jax
    import jax.numpy as jnp

    from lucid_jax.optim import build_optimizer
    from lucid_jax.train import create_train_state, make_train_step

    model = build(setup, jnp.bfloat16)
    data = synthetic(setup["train_batch"], setup["train_size"])
    batch = jax.device_put(data)
    variables = initial_variables(setup["name"])
    state = create_train_state(model, variables, build_optimizer(variables["params"], learning_rate=0.01))
    step = make_train_step(model, validate=False)
    rng = jax.random.key(1)
    start = time.perf_counter()
    compiled = step.jitted.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, rng)
        jax.block_until_ready(metrics)
        return metrics

    metrics = run()
    if not bool(metrics["finite"]):
        raise RuntimeError(f"the training step is not finite: {jax.tree_util.tree_map(float, metrics)}")
    seconds, steps = time_compiled(run, args)
    flops, _ = C.xla_cost(compiled)
    return {
        "compile_s": compile_s,
        "seconds": seconds,
        "steps": steps,
        "images": setup["train_batch"],
        "flops": flops,
        "loss": float(metrics["total_loss"]),
        "dtype": jnp.bfloat16,
    }


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    setup = SMALL if args.small else FULL
    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind)
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s): {device.device_kind}", flush=True)
    print(f"jax {jax.__version__}; bf16 peak: {f'{peak:.0f} TFLOP/s (datasheet)' if peak else 'not in the table'}")
    configs = {
        "infer-f32": lambda: bench_infer(setup, "f32", args),
        "infer-bf16": lambda: bench_infer(setup, "bf16", args),
        "train-bf16": lambda: bench_train(setup, args),
    }
    shapes = {
        "infer-f32": (setup["infer_batch"], *setup["infer_size"]),
        "infer-bf16": (setup["infer_batch"], *setup["infer_size"]),
        "train-bf16": (setup["train_batch"], *setup["train_size"]),
    }
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(configs))
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {', '.join(configs)}")
    results, rows = {}, []
    ceilings = {}
    for name in wanted:
        b, h, w = shapes[name]
        print(f"[{name}] {setup['model']}, batch {b}, {h}x{w}: compiling ...", flush=True)
        try:
            r = configs[name]()
        except Exception as e:  # report and go on: one run should give every figure it can
            print(f"[{name}] FAILED: {type(e).__name__}: {e}", flush=True)
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            rows.append([name, f"{b}x{h}x{w}", "failed", "", "", "", "", "", ""])
            continue
        dtype = r.pop("dtype")
        achieved = r["flops"] / r["seconds"] / 1e12
        if peak:
            ref, ref_label = peak, "peak"
        else:
            key = jnp.dtype(dtype).name
            if key not in ceilings:
                ceilings[key] = measured_ceiling_tflops(dtype)
            ref, ref_label = ceilings[key], f"measured {key} matmul"
        r.update(
            images_per_s=r["images"] / r["seconds"],
            tflops=achieved,
            mfu=achieved / ref,
            mfu_against=ref_label,
            shape=[b, h, w],
        )
        results[name] = r
        extra = f"{r['detections_per_image']:.0f} dets/img" if "detections_per_image" in r else f"loss {r['loss']:.3f}"
        print(
            f"[{name}] compile {r['compile_s']:.1f} s, {r['seconds'] * 1e3:.1f} ms/call over {r['steps']} calls, "
            f"{r['images_per_s']:.1f} img/s, {r['flops'] / 1e9:.0f} GFLOP/call, {achieved:.1f} TFLOP/s, "
            f"MFU {100 * r['mfu']:.1f}% ({ref_label}), {extra}",
            flush=True,
        )
        rows.append(
            [
                name,
                f"{b}x{h}x{w}",
                f"{r['compile_s']:.1f}",
                f"{r['seconds'] * 1e3:.1f}",
                f"{r['images_per_s']:.1f}",
                f"{r['flops'] / 1e9:.4g}",
                f"{achieved:.3g}",
                f"{100 * r['mfu']:.1f}%",
                extra,
            ]
        )
    print()
    against = "the bf16 peak" if peak else "a measured ceiling"
    print(f"{device.device_kind}, jax {jax.__version__}; MFU against {against}")
    C.print_table(rows, ["config", "BxHxW", "compile s", "ms/call", "img/s", "GFLOP", "TFLOP/s", "MFU", ""])
    if args.json:
        info = {"device_kind": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__}
        with open(args.json, "w") as f:
            json.dump({"device": info, "peak_bf16_tflops": peak, "results": results}, f, indent=1)
    failed = [name for name in wanted if "error" in results[name]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
