"""Side-by-side CPU timings of lucid_jax.ops against torchvision.ops, in one run.

    python benchmarks/bench_ops.py [--repeats 7] [--sizes 1000 5000 20000]

Times are medians over ``--repeats`` calls after warm-up (the first jitted call
compiles), taken with ``time.perf_counter`` around ``block_until_ready``. The ratio
is ours / torchvision, so below 1 means lucid_jax is faster. NMS inputs follow the
RPN-like distribution of the project's performance goal: xy ~ U(0, 800),
wh ~ U(16, 256), scores ~ U(0, 1), IoU threshold 0.5, fixed seed.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

TV_MISSING = "bench_ops.py compares against torchvision, which is not installed: pip install -e '.[parity]'"


def _median_ms(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def nms_inputs(n, seed=0):
    """boxes [n, 4] float32 xyxy and scores [n] float32 with the goal's distribution."""
    rng = np.random.default_rng(seed)
    xy = rng.random((n, 2)) * 800
    wh = rng.random((n, 2)) * 240 + 16
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    return boxes, rng.random(n).astype(np.float32)


def bench_nms(n, repeats, threshold=0.5):
    """One table row for NMS on n boxes, with max_output = n."""
    import jax
    import torch
    import torchvision

    from lucid_jax.ops import nms

    boxes, scores = nms_inputs(n)
    run = jax.jit(lambda b, s: nms(b, s, threshold, n))
    b_jax, s_jax = jax.device_put(boxes), jax.device_put(scores)
    b_tv, s_tv = torch.from_numpy(boxes), torch.from_numpy(scores)
    ours_ms = _median_ms(lambda: jax.block_until_ready(run(b_jax, s_jax)), repeats)
    tv_ms = _median_ms(lambda: torchvision.ops.nms(b_tv, s_tv, threshold), repeats)
    keep, keep_valid = jax.device_get(run(b_jax, s_jax))
    ours = keep[keep_valid]
    ref = torchvision.ops.nms(b_tv, s_tv, threshold).numpy()
    agree = ours.shape == ref.shape and bool(np.all(ours == ref))
    return dict(op="nms", case=f"{n} boxes", ours=ours_ms, tv=tv_ms, note=f"kept {len(ref)}, same order: {agree}")


def bench_roi_align(repeats, num_rois=1000, size=200, channels=256, seed=0):
    """One table row for RoIAlign on a [size, size, channels] map; None if not available."""
    import jax
    import torch
    import torchvision

    from lucid_jax.ops import roi_align

    rng = np.random.default_rng(seed)
    features = rng.standard_normal((size, size, channels)).astype(np.float32)  # [H, W, C]
    xy = rng.random((num_rois, 2)) * (size * 4 - 64)  # image pixels; spatial_scale 0.25
    wh = rng.random((num_rois, 2)) * 200 + 8
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)  # [R, 4]
    kwargs = dict(output_size=(7, 7), spatial_scale=0.25, sampling_ratio=2, aligned=True)
    run = jax.jit(lambda f, b: roi_align(f, b, **kwargs))
    f_jax, b_jax = jax.device_put(features), jax.device_put(boxes)
    try:
        out = np.asarray(jax.block_until_ready(run(f_jax, b_jax)))
    except NotImplementedError as err:
        print(f"roi_align: skipped, lucid_jax.ops.roi_align is not implemented yet ({err})")
        return None
    f_tv = torch.from_numpy(features).permute(2, 0, 1)[None].contiguous()  # [1, C, H, W]
    b_tv = torch.from_numpy(np.concatenate([np.zeros((num_rois, 1), np.float32), boxes], axis=1))  # [R, 5]
    ours_ms = _median_ms(lambda: jax.block_until_ready(run(f_jax, b_jax)), repeats)
    tv_ms = _median_ms(lambda: torchvision.ops.roi_align(f_tv, b_tv, **kwargs), repeats)
    ref = torchvision.ops.roi_align(f_tv, b_tv, **kwargs).numpy()  # [R, C, 7, 7]
    if out.shape == (num_rois, 7, 7, channels):  # channels last, as the features
        out = out.transpose(0, 3, 1, 2)
    note = f"max |diff| {np.abs(out - ref).max():.2e}" if out.shape == ref.shape else f"output shape {out.shape}"
    return dict(op="roi_align", case=f"{num_rois} RoIs, {size}x{size}x{channels}", ours=ours_ms, tv=tv_ms, note=note)


def main(argv=None):
    """Run the benchmark and print the table; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per measurement (median reported)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="NMS box counts")
    parser.add_argument("--skip-roi-align", action="store_true", help="time NMS only")
    args = parser.parse_args(argv)
    try:
        import torch
        import torchvision
    except ImportError:
        sys.exit(TV_MISSING)
    import jax

    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), torchvision {torchvision.__version__}, {os.cpu_count()} CPUs"
    )
    rows = [bench_nms(n, args.repeats) for n in args.sizes]
    if not args.skip_roi_align:
        try:
            row = bench_roi_align(args.repeats)
        except Exception as err:  # the NMS half must still report
            print(f"roi_align: failed with {type(err).__name__}: {err}")
            row = None
        if row is not None:
            rows.append(row)
    header = f"{'op':<10} {'case':<26} {'ours ms':>9} {'tv ms':>9} {'ratio':>7}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        r["ratio"] = r["ours"] / r["tv"]
        print(f"{r['op']:<10} {r['case']:<26} {r['ours']:>9.2f} {r['tv']:>9.2f} {r['ratio']:>7.2f}  {r['note']}")
    return rows


if __name__ == "__main__":
    main()
