"""The detector's input checks: images, image sizes and training targets are refused
by name before anything is computed."""

import jax
import numpy as np
import pytest

from tests.models.conftest import example_targets, random_images


@pytest.mark.parametrize(
    "shape, dtype, error, match",
    [
        ((1, 128, 128, 3), np.float32, ValueError, "looks like NHWC"),
        ((1, 3, 100, 128), np.float32, ValueError, "multiples of 32"),
        ((1, 4, 128, 128), np.float32, ValueError, "3 channels"),
        ((3, 128, 128), np.float32, ValueError, r"\[B, 3, H, W\]"),
        ((1, 3, 128, 128), np.uint8, TypeError, "floating-point"),
    ],
)
def test_bad_images(tiny, shape, dtype, error, match):
    model, variables = tiny
    with pytest.raises(error, match=match):
        model.apply(variables, np.zeros(shape, dtype))


def test_bad_image_sizes(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match="image_sizes"):
        model.apply(variables, random_images(0), np.zeros((1, 3), np.float32))


def _bad(change):
    t = example_targets()
    change(t)
    return t


@pytest.mark.parametrize(
    "targets, match",
    [
        (_bad(lambda t: t.pop("valid")), r'"valid" \[B, M\]'),
        (_bad(lambda t: t.pop("boxes")), r'"boxes" \[B, M, 4\]'),
        ((1, 2, 3), r"targets must be a dict"),
        (_bad(lambda t: t.update(boxes=t["boxes"][..., :3])), r'targets\["boxes"\] must have shape \[B, M, 4\]'),
        (_bad(lambda t: t.update(boxes=t["boxes"][:1])), r'targets\["boxes"\] must have shape \[B, M, 4\] with B = 2'),
        (_bad(lambda t: t.update(boxes=t["boxes"][0])), r'targets\["boxes"\] must have shape \[B, M, 4\]'),
        (
            _bad(lambda t: t.update(labels=t["labels"][:, :3])),
            r'targets\["labels"\] must have shape \[B, M\] = \(2, 4\)',
        ),
        (_bad(lambda t: t.update(labels=t["labels"][:1])), r'targets\["labels"\] must have shape \[B, M\] = \(2, 4\)'),
        (
            _bad(lambda t: t.update(valid=t["valid"][..., None])),
            r'targets\["valid"\] must have shape \[B, M\] = \(2, 4\)',
        ),
    ],
)
def test_bad_targets_fail_at_trace_time(tiny, targets, match):
    model, variables = tiny
    fn = lambda v, x, t: model.apply(
        v,
        x,
        t,
        method="loss",
        rngs={"dropout": jax.random.key(0), "sampling": jax.random.key(1)},
        mutable=["batch_stats"],
    )  # noqa: E731
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(fn, variables, random_images(0, batch=2), targets)
