"""The training step in float32 against bfloat16 compute (``--compute-dtype``), on this machine.

    python benchmarks/bench_dtype.py [--model faster_rcnn_mini_fpn] [--size 128] [--batch 8] [--rounds 7] [--block 3]

Both sides are the same detector (``lucid_jax.jobs.build_model`` with
``compute_dtype`` float32 or bfloat16: float32 parameters and optimiser state either
way), started from the same weights and trained on the same synthetic batch with the
default AdamW recipe through ``make_train_step``. Before anything is timed, one step
of each is checked finite and their total losses within 5% of each other.

Timings are interleaved in this process (``--rounds`` rounds of ``--block`` steps of
each side, the order alternating), after a warm-up step each; it prints each side's
median step, the median of the per-round ratios bfloat16 / float32 (below 1: bfloat16
is faster) and each side's compile time. On CPU, XLA runs bfloat16 convolutions
through float32 arithmetic with conversions around them, so the figure is the
machine's and XLA's, not a property of the model.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np
from _common import interleaved, median, round_ratios, synthetic_batch

from lucid_jax.jobs import TrainConfig, initial_state
from lucid_jax.jobs.state import build_model, frozen_labels
from lucid_jax.train import make_train_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="faster_rcnn_mini_fpn")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block", type=int, default=3)
    args = parser.parse_args(argv)

    config = TrainConfig(model=args.model, image_size=str(args.size), batch_size=args.batch)
    raw = synthetic_batch(args.batch, args.size)
    batch = {
        "images": np.asarray(raw["images"], np.float32),
        "boxes": np.asarray(raw["boxes"], np.float32),
        "labels": np.asarray(raw["labels"], np.int32),
        "valid": np.asarray(raw["valid"], bool),
    }
    steps, states, compile_s, first_loss = {}, {}, {}, {}
    variables = None
    for dtype in ("float32", "bfloat16"):
        model = build_model(args.model, 21, compute_dtype=dtype)
        if variables is None:
            variables = jax.jit(model.init)(jax.random.key(0), batch["images"][:1])
        state, labels = initial_state(model, config, variables)
        step = make_train_step(model, frozen=frozen_labels(state.params, config))
        start = time.perf_counter()
        state, metrics = step(state, batch, jax.random.key(1))
        jax.block_until_ready(state)
        compile_s[dtype] = time.perf_counter() - start
        first_loss[dtype] = float(metrics["total_loss"])
        assert bool(metrics["finite"]), f"{dtype}: the first step is not finite"
        steps[dtype], states[dtype] = step, state
    gap = abs(first_loss["bfloat16"] - first_loss["float32"]) / first_loss["float32"]
    assert gap < 0.05, f"the first steps' losses differ by {gap:.1%}: {first_loss}"

    def run(dtype):
        def call():
            states[dtype], metrics = steps[dtype](states[dtype], batch, jax.random.key(2))
            jax.block_until_ready(metrics)

        return call

    times = interleaved({d: run(d) for d in steps}, args.rounds, warmup=1, block=args.block)
    ratios = round_ratios(times, "bfloat16", "float32", args.block)
    print(f"{args.model}, {args.size}x{args.size}, batch {args.batch}, {jax.devices()[0].device_kind}")
    for dtype in steps:
        print(
            f"  {dtype:9s} step median {median(times[dtype]):.3f} s, first call (compile) {compile_s[dtype]:.1f} s, "
            f"first loss {first_loss[dtype]:.4f}"
        )
    print(f"  bfloat16 / float32: {median(ratios):.2f} (median of {len(ratios)} per-round ratios)")


if __name__ == "__main__":
    main()
