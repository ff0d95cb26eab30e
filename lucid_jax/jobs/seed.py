"""The seed example: the full ResNet-101 FPN detector's output shapes, parameter count
and predict timings, as the document the project started from shows them."""

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lucid_jax import count_params
from lucid_jax.inference import make_predict_fn
from lucid_jax.models import faster_rcnn_resnet_101_fpn


def seed_example(sizes: Sequence[int] = (224, 512), *, num_classes: int = 21, repeats: int = 3, echo=print) -> None:
    """Print the parameter count, then per square size the forward's shapes and predict's timings."""
    model = faster_rcnn_resnet_101_fpn(num_classes=num_classes)
    variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 3, 224, 224), jnp.float32))
    echo(f"faster_rcnn_resnet_101_fpn(num_classes={num_classes}): {count_params(variables['params']):,} parameters")
    forward = jax.jit(model.apply)
    predict = make_predict_fn(model)
    for size in sizes:
        x = jax.random.normal(jax.random.key(0), (1, 3, size, size))
        cls_logits, bbox_deltas = forward(variables, x)
        echo(f"{size}x{size}: cls_logits {tuple(cls_logits.shape)}, bbox_deltas {tuple(bbox_deltas.shape)}")
        start = time.perf_counter()
        jax.block_until_ready(predict(variables, x, None))
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dets = jax.block_until_ready(predict(variables, x, None))
            times.append(time.perf_counter() - start)
        echo(
            f"  predict: first call (compile + run) {compile_s:.1f} s, steady state {np.median(times):.3f} s "
            f"(median of {repeats}); boxes {tuple(dets['boxes'].shape)}"
        )
