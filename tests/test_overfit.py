"""The whole training path learns: a tiny detector overfits two synthetic images.

Two 128x128 images with three objects each; AdamW; the jitted train step; then
``predict`` and the evaluator on the same images. It must reach AP50 >= 0.9 within
a step budget that runs in well under three minutes on a 2-core CPU.
"""

import functools
import time

import jax

from lucid_jax.data import Loader, ShapesDataset, model_inputs
from lucid_jax.evaluation import evaluate
from lucid_jax.optim import build_optimizer
from lucid_jax.train import create_train_state, make_train_step
from tests.models.conftest import tiny_detector

MAX_STEPS = 300
EVAL_EVERY = 25


def test_tiny_detector_overfits_two_images():
    dataset = ShapesDataset(num_examples=2, min_objects=3, max_objects=3, seed=0)
    batch = next(Loader(dataset, 2, max_boxes=4, num_workers=0).iterate(0, 1))
    assert batch["valid"].sum() == 6
    inputs = model_inputs(batch)
    model = tiny_detector(num_classes=len(dataset.class_names) + 1)
    variables = jax.jit(functools.partial(model.init, channels_last=True))(jax.random.key(0), inputs["images"])
    optimizer = build_optimizer(
        variables["params"], optimizer="adamw", learning_rate=1e-3, schedule="constant", warmup_steps=20
    )
    state = create_train_state(model, variables, optimizer)
    step = make_train_step(model, channels_last=True)  # the Loader's [B, H, W, 3]
    predict = jax.jit(lambda v, x, s: model.apply(v, x, s, method="predict", channels_last=True))

    start, history = time.perf_counter(), []
    for i in range(1, MAX_STEPS + 1):
        state, metrics = step(state, inputs, jax.random.key(i))
        if i % EVAL_EVERY:
            continue
        dets = predict(
            {"params": state.params, "batch_stats": state.batch_stats}, inputs["images"], inputs["image_sizes"]
        )
        ap50 = evaluate(dets, batch, dataset.class_names)["AP50"]
        history.append(
            (i, round(time.perf_counter() - start, 1), round(float(metrics["total_loss"]), 3), round(ap50, 3))
        )
        if ap50 >= 0.9:
            break
    print("steps, seconds, total_loss, AP50:", history)
    assert history[-1][3] >= 0.9, history
    assert history[-1][2] < history[0][2] or len(history) == 1
    assert bool(metrics["finite"])
