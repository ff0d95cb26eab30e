"""The ``lucid-jax`` command line.

    lucid-jax seed [--size 224 512] [--num-classes 21]

``seed`` runs the seed document's example with the full ResNet-101 FPN detector:
build, init, apply, and print the output shapes, the parameter count, the compile
time and the steady-state time of ``predict``.
"""

import argparse
import sys
import time


def _seed(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import lucid_jax
    from lucid_jax.models import faster_rcnn_resnet_101_fpn

    model = faster_rcnn_resnet_101_fpn(num_classes=args.num_classes)
    variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 3, 224, 224), jnp.float32))
    print(f"faster_rcnn_resnet_101_fpn(num_classes={args.num_classes}): "
          f"{lucid_jax.count_params(variables['params']):,} parameters")
    forward = jax.jit(model.apply)
    predict = jax.jit(lambda v, x: model.apply(v, x, method="predict"))
    for size in args.size:
        x = jax.random.normal(jax.random.key(0), (1, 3, size, size))
        cls_logits, bbox_deltas = forward(variables, x)
        print(f"{size}x{size}: cls_logits {tuple(cls_logits.shape)}, bbox_deltas {tuple(bbox_deltas.shape)}")
        start = time.perf_counter()
        jax.block_until_ready(predict(variables, x))
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            dets = jax.block_until_ready(predict(variables, x))
            times.append(time.perf_counter() - start)
        print(f"  predict: first call (compile + run) {compile_s:.1f} s, steady state {np.median(times):.3f} s "
              f"(median of {args.repeats}); boxes {tuple(dets['boxes'].shape)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lucid-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    seed = sub.add_parser("seed", help="run the seed example with the full ResNet-101 FPN detector")
    seed.add_argument("--size", type=int, nargs="+", default=[224, 512], help="square input sizes (multiples of 32)")
    seed.add_argument("--num-classes", type=int, default=21)
    seed.add_argument("--repeats", type=int, default=3, help="timed predict calls per size")
    seed.set_defaults(func=_seed)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "size", None) and any(s % 32 for s in args.size):
        print(f"lucid-jax: error: --size must be multiples of 32, got {args.size}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
