"""ONNX export of a detector: conversion time, file size, agreement with JAX and CPU
latency of onnxruntime against the jitted serving function, timed interleaved.

Runs in the ONNX environment (see docs/export.md):

    .venv-onnx/bin/python benchmarks/bench_onnx.py --model faster_rcnn_resnet_101_fpn --size 512

Weights are a random init with the classifier scaled up, so that the detections are
real (100 valid, several classes) and their order does not hang on float rounding.
"""

import argparse
import os
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="faster_rcnn_resnet_101_fpn")
    p.add_argument("--size", type=int, default=512, help="square canvas side")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--cls-scale", type=float, default=300.0, help="factor on the cls_score kernel")
    p.add_argument("--pairs", type=int, default=10, help="interleaved timed calls of each side")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = p.parse_args()
    warnings.filterwarnings("ignore", "Explicitly requested dtype float64")

    import onnx
    import onnxruntime as ort

    from lucid_jax.inference import serving_function
    from lucid_jax.models import get_model
    from lucid_jax.onnx_export import OUTPUT_NAMES, export_onnx

    s = args.size
    model = get_model(args.model, num_classes=args.num_classes)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, s, s)), jnp.array([[s, s]], jnp.float32))
    params = dict(variables["params"])
    params["cls_score"] = {**params["cls_score"], "kernel": params["cls_score"]["kernel"] * args.cls_scale}
    variables = {**variables, "params": params}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, s, s, 3), dtype=np.uint8)
    images[:, s // 3 : 2 * s // 3, s // 4 : 3 * s // 4] = (220, 40, 40)
    sizes = np.array([[s, s - 32]], np.int32)
    feed = {"images": images, "image_sizes": sizes}

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "detector.onnx")
        t = time.perf_counter()
        export_onnx(model, variables, path, canvas=(s, s), score_thresh=0.0)
        convert_s = time.perf_counter() - t
        opset = [o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")]
        mib = os.path.getsize(path) / 2**20
        print(f"{args.model} {s}x{s}: conversion {convert_s:.1f} s, {mib:.1f} MiB, opset {opset}")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    out = dict(zip(OUTPUT_NAMES, sess.run(list(OUTPUT_NAMES), feed), strict=True))
    serve = jax.jit(serving_function(model, variables, score_thresh=0.0))
    ref = jax.tree_util.tree_map(np.asarray, jax.block_until_ready(serve(images, sizes)))
    v = ref["valid"]
    print(
        f"valid {int(v.sum())}/{v.size} ({len(np.unique(ref['labels'][v]))} classes): "
        f"valid equal {np.array_equal(out['valid'], v)}, "
        f"labels equal {np.array_equal(out['labels'], ref['labels'])}, "
        f"max |box diff| {np.abs(out['boxes'] - ref['boxes']).max():.3g} px, "
        f"max |score diff| {np.abs(out['scores'] - ref['scores']).max():.3g}"
    )
    t_ort, t_jax = [], []
    for _ in range(args.pairs):
        t = time.perf_counter()
        sess.run(list(OUTPUT_NAMES), feed)
        t_ort.append(time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(serve(images, sizes))
        t_jax.append(time.perf_counter() - t)
    print(
        f"interleaved x{args.pairs}: onnxruntime ({args.threads} threads) median {np.median(t_ort) * 1e3:.0f} ms "
        f"(min {min(t_ort) * 1e3:.0f}), jax jit median {np.median(t_jax) * 1e3:.0f} ms (min {min(t_jax) * 1e3:.0f}), "
        f"ratio {np.median(t_ort) / np.median(t_jax):.2f}"
    )


if __name__ == "__main__":
    main()
