"""One square canvas against aspect-ratio canvases, on a COCO-like mix of image sizes.

    python benchmarks/bench_canvases.py [--image-size 800:1333] [--model mini|resnet101] [--batch 2]

The images take the resize of ``--image-size SHORT:LONG`` (shorter side to SHORT,
longer at most LONG) in both arrangements:

- **square**: every image padded onto one LONG x LONG canvas (rounded up to the
  backbone's stride), what a single-canvas pipeline must do to hold both
  orientations;
- **grouped**: ``lucid_jax.data.canvases``: landscape SHORT x LONG, portrait LONG x
  SHORT and a square canvas for aspect ratios within the band, each batch on one.

Reported per arrangement: the padded share of the canvas pixels, the share of images
per canvas, the number of compiled step shapes, the compile time and the median
training-step time of each canvas (interleaved rounds, ``--steps`` each), and the
step time per image of the mix: the sum over canvases of (share of images) x (step
time) / batch. The mix is COCO-like (train2017's sizes are dominated by 640 x 480
and 640 x 427 landscapes, then their portraits, then a few squares); ``COCO_LIKE``
below lists it.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

# (height, width) and count: a 100-image COCO-like mix of sizes and orientations.
COCO_LIKE = (
    ((480, 640), 40),
    ((427, 640), 14),
    ((640, 480), 12),
    ((640, 427), 8),
    ((424, 640), 6),
    ((375, 500), 6),
    ((640, 640), 4),
    ((612, 612), 4),
    ((500, 375), 3),
    ((360, 640), 3),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", default="800:1333", help="SHORT:LONG, as lucid-jax train --image-size")
    p.add_argument("--model", default="mini", choices=("mini", "resnet101"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per canvas (interleaved)")
    return p.parse_args(argv)


def mix_sizes() -> np.ndarray:
    """[100, 2] (height, width) of the COCO-like mix."""
    return np.array([size for size, count in COCO_LIKE for _ in range(count)])


def arrangements(text: str, multiple: int):
    """{"square": Canvases with every image on one canvas, "grouped": the aspect-ratio canvases}."""
    from lucid_jax.data.canvases import Canvases, parse_image_size

    grouped = parse_image_size(text, multiple)
    if grouped.square_only:
        raise SystemExit("--image-size must be SHORT:LONG here: a plain S has only the square canvas")
    # An infinite band sends every image to the square canvas, which then must hold
    # the longer side: LONG x LONG.
    square = Canvases(grouped.short, grouped.long, multiple, band=float("inf"))
    return {"square": square, "grouped": grouped}


def canvas_shares(canvases, sizes) -> dict[tuple[int, int], float]:
    """Share of the images on each canvas shape that receives any."""
    ids = np.array([canvases.canvas_index(int(h), int(w)) for h, w in sizes])
    return {canvases.shapes[i]: float(np.mean(ids == i)) for i in sorted(set(ids.tolist()))}


def build_step(model_name: str, batch: int):
    """(step(canvas) -> blocking call, compile(canvas) -> seconds) of one training setup."""
    import jax
    import jax.numpy as jnp

    from lucid_jax.models import faster_rcnn_mini_fpn, faster_rcnn_resnet_101_fpn
    from lucid_jax.optim import build_optimizer
    from lucid_jax.train import create_train_state, make_train_step

    make = faster_rcnn_resnet_101_fpn if model_name == "resnet101" else faster_rcnn_mini_fpn
    model = make(num_classes=21)
    init_image = jnp.zeros((1, 3, 64, 64), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), init_image, jnp.array([[64, 64]], jnp.int32))
    optimizer = build_optimizer(variables["params"], learning_rate=0.01)
    step = make_train_step(model, validate=False)
    compiled, batches, states = {}, {}, {}

    def compile_for(canvas):
        h, w = canvas
        data = C.synthetic_batch(batch, max(h, w))
        data["images"] = data["images"][:, :, :h, :w]
        data["boxes"] = np.minimum(data["boxes"], np.array([w, h, w, h], np.float32))
        data["image_sizes"] = np.tile(np.array([[h, w]], np.int32), (batch, 1))
        batches[canvas] = jax.device_put(data)
        states[canvas] = create_train_state(model, variables, optimizer)
        start = time.perf_counter()
        compiled[canvas] = step.jitted.lower(states[canvas], batches[canvas], jax.random.key(1)).compile()
        return time.perf_counter() - start

    def run(canvas):
        states[canvas], metrics = compiled[canvas](states[canvas], batches[canvas], jax.random.key(1))
        jax.block_until_ready(metrics)

    return run, compile_for


def main(argv=None):
    args = parse_args(argv)
    from lucid_jax.data.canvases import padded_fraction
    from lucid_jax.jobs.config import size_divisibility

    multiple = size_divisibility("faster_rcnn_resnet_101_fpn")
    sizes = mix_sizes()
    setups = arrangements(args.image_size, multiple)
    print(f"# bench_canvases: {args.model}, train step batch {args.batch}, --image-size {args.image_size}")
    print(C.environment_line())
    run, compile_for = build_step(args.model, args.batch)
    shares = {name: canvas_shares(c, sizes) for name, c in setups.items()}
    shapes = sorted({shape for s in shares.values() for shape in s})
    compile_s = {}
    for shape in shapes:
        print(f"compiling the step on {shape[0]}x{shape[1]} ...", flush=True)
        compile_s[shape] = compile_for(shape)
    for shape in shapes:
        run(shape)  # first calls: allocations
    times = C.interleaved({shape: (lambda s=shape: run(s)) for shape in shapes}, args.steps, warmup=0)
    step_s = {shape: statistics.median(t) for shape, t in times.items()}

    rows, summary = [], {}
    for name, canvases in setups.items():
        per_image = sum(share * step_s[shape] / args.batch for shape, share in shares[name].items())
        padded = padded_fraction(sizes, canvases)
        summary[name] = (per_image, padded, len(shares[name]))
        for shape, share in shares[name].items():
            rows.append(
                [
                    name,
                    f"{shape[0]}x{shape[1]}",
                    f"{100 * share:.0f}%",
                    f"{compile_s[shape]:.1f}",
                    f"{step_s[shape]:.3f}",
                    C.spread(times[shape]),
                ]
            )
    print(f"\n## Per canvas (median of {args.steps} interleaved steps, batch {args.batch})")
    C.print_table(rows, ["arrangement", "canvas", "images", "compile s", "step s", "min..max s"])
    print("\n## The COCO-like mix")
    C.print_table(
        [
            [name, f"{100 * padded:.1f}%", str(n), f"{per_image:.3f}", f"{per_image / summary['square'][0]:.2f}x"]
            for name, (per_image, padded, n) in summary.items()
        ],
        ["arrangement", "padded pixels", "compiled shapes", "step s per image", "vs square"],
    )
    return summary


if __name__ == "__main__":
    main()
