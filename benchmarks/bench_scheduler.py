"""XLA:CPU's two schedulers on our training step: temporaries, step time and results.

    python benchmarks/bench_scheduler.py [--recipe torchvision|default] [--size 512] [--batch 2]
                                         [--rounds 6] [--model faster_rcnn_resnet_101_fpn]

The step is lowered once and compiled twice: with ``lucid_jax.inference.CPU_COMPILER_OPTIONS``
(the memory-minimising scheduler, what ``make_train_step`` uses on CPU) and with XLA's
default (``CPU_SCHEDULER_TYPE_DEFAULT``, which orders for concurrency). It prints each
executable's temporaries (``memory_analysis()``), checks that both compute the same
bits, then times them alternating in this process, ``--rounds`` calls each, from the
same state (no donation), and prints the medians and the median of per-round ratios.

``--recipe torchvision`` is torchvision's fine-tuning recipe (``TORCHVISION_FASTER_RCNN``,
frozen BN, 3 trainable stages), ``default`` the default model with every stage trained.
Weights are the model's own random init: the schedulers do not depend on them.
"""

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

DEFAULT_SCHEDULER = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=("torchvision", "default"), default="torchvision")
    p.add_argument("--model", default="faster_rcnn_resnet_101_fpn", help="a registered model name")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    return p.parse_args(argv)


def build(args):
    """(lowered step, its arguments) for the recipe, no donation."""
    import jax
    import jax.numpy as jnp

    from lucid_jax.models import TORCHVISION_FASTER_RCNN, get_model
    from lucid_jax.optim import build_optimizer, param_labels
    from lucid_jax.train import create_train_state, make_train_step

    fine_tune = args.recipe == "torchvision"
    extra = {**TORCHVISION_FASTER_RCNN, "norm_mode": "frozen"} if fine_tune else {}
    model = get_model(args.model, num_classes=21, **extra)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 3, 64, 64), jnp.float32))
    layers = 3 if fine_tune else 5
    options = {"trainable_backbone_layers": layers, "freeze_batchnorm": fine_tune}
    tx = build_optimizer(variables["params"], learning_rate=0.01, momentum=0.9, weight_decay=1e-4, **options)
    frozen = param_labels(variables["params"], **options)
    state = create_train_state(model, variables, tx)
    step = make_train_step(model, frozen=frozen, donate=False, validate=False)
    batch = C.synthetic_batch(args.batch, args.size)
    batch = {k: jax.device_put(C.normalised(v) if k == "images" else v) for k, v in batch.items()}
    call_args = (state, batch, jax.random.key(1))
    return step.jitted.lower(*call_args), call_args


def same_bits(a, b):
    import jax

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def main(argv=None):
    args = parse_args(argv)
    import jax

    from lucid_jax.inference import CPU_COMPILER_OPTIONS

    print(f"# bench_scheduler: {args.model}, {args.recipe} recipe, train step {args.batch}x3x{args.size}x{args.size}")
    print(C.environment_line())
    lowered, call_args = build(args)
    executables = {
        "memory-minimising": lowered.compile(),
        "default": lowered.compile(compiler_options=DEFAULT_SCHEDULER),
    }
    outputs = {name: jax.block_until_ready(e(*call_args)) for name, e in executables.items()}
    if not same_bits(*outputs.values()):
        raise RuntimeError("the two schedulers' steps computed different bits")
    print(f"same bits from both; our default on CPU: {CPU_COMPILER_OPTIONS}")
    times = {name: [] for name in executables}
    for _ in range(args.rounds):
        for name, e in executables.items():
            times[name].append(C.time_call(lambda e=e: jax.block_until_ready(e(*call_args))))
    rows = []
    for name, e in executables.items():
        temp = e.memory_analysis().temp_size_in_bytes / 2**20
        rows.append((name, f"{temp:.0f}", f"{statistics.median(times[name]):.3f}", C.spread(times[name])))
    C.print_table(rows, ["scheduler", "temporaries MiB", "median s", "min..max s"])
    ratios = [m / d for m, d in zip(times["memory-minimising"], times["default"])]
    ratio = statistics.median(ratios)
    print(f"memory-minimising / default: {ratio:.2f}x (median of per-round ratios)")
    return {"rows": rows, "ratio": ratio}


if __name__ == "__main__":
    main()
