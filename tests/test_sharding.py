"""Data parallelism on 8 simulated CPU devices: the sharded train step gives the
unsharded step's result.

XLA's device count is fixed when JAX starts, so the check runs in a fresh Python
process with ``--xla_force_host_platform_device_count=8``.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lucid_jax.compile_count import count_compiles
from lucid_jax.optim import build_optimizer
from lucid_jax.train import create_train_state, data_mesh, make_train_step, shard_batch
from tests.models.conftest import random_images, tiny_detector
from tests.test_train import make_batch

assert jax.device_count() == 8, jax.devices()
# Every RoI candidate (256 proposals + 4 gts) is sampled, see the test's docstring.
model = tiny_detector(
    num_classes=5, rpn_post_nms_top_n=(256, 300), box_batch_size_per_image=260, box_positive_fraction=1.0
)
variables = jax.jit(model.init)(jax.random.key(0), random_images(0))
state = create_train_state(model, variables, build_optimizer(variables["params"], learning_rate=0.01))
batch = make_batch(21, batch=8)
rng = jax.random.key(3)

plain_state, plain = make_train_step(model, donate=False)(state, batch, rng)

mesh = data_mesh()
placed = shard_batch(batch, mesh)
# the state as it comes (on one device): jit replicates it by its in_shardings
sharded_step = make_train_step(model, mesh=mesh, donate=False)
with count_compiles(sharded_step.jitted) as compiles:
    sharded_state, sharded = sharded_step(state, placed, rng)
    # a second step reuses the compiled program: the state it returned is already in place
    jax.block_until_ready(sharded_step(sharded_state, shard_batch(make_batch(22, batch=8), mesh), jax.random.key(4)))

images = placed["images"]
leaves = jax.tree_util.tree_leaves(sharded_state.params) + jax.tree_util.tree_leaves(sharded_state.batch_stats)

def max_diff(a, b):
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)

print("RESULT " + json.dumps({
    "params_diff": max_diff(plain_state.params, sharded_state.params),
    "batch_stats_diff": max_diff(plain_state.batch_stats, sharded_state.batch_stats),
    "param_change": max_diff(plain_state.params, state.params),
    "loss_diff": {k: abs(float(plain[k]) - float(sharded[k])) for k in plain},
    "finite": [bool(plain["finite"]), bool(sharded["finite"])],
    "batch_split_on_data": isinstance(images.sharding, NamedSharding) and images.sharding.spec == PartitionSpec("data"),
    "batch_devices": len(images.sharding.device_set),
    "shard_shapes": sorted({tuple(s.data.shape) for s in images.addressable_shards}),
    "targets_sharded": all(
        len(placed[k].sharding.device_set) == 8 and placed[k].sharding.spec == PartitionSpec("data") for k in placed
    ),
    "state_replicated": all(
        leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8 for leaf in leaves
    ),
    "step": int(sharded_state.step),
    "compiles": compiles.count,
}))
"""


def test_sharded_step_matches_unsharded():
    """One SGD step on 8 images, unsharded and with ``mesh=data_mesh()``.

    BatchNorm's statistics are all-reduced across the devices in another order
    than on one device, so features differ by float rounding (~1e-7). Proposals
    whose scores are that close swap places, and the RoI sampler, whose random
    priorities go by position, then draws a few different RoIs: with the default
    512-of-1000 sampling that alone moves the params by ~1e-5. The RoI head
    therefore takes every candidate here (positive_fraction 1, batch size >=
    candidates), which makes the sample independent of the order; the RPN's
    anchor sampling stays random (per image keys) and is order-free anyway.
    """
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", WORKER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = [out for out in proc.stdout.splitlines() if out.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    print(
        f"sharded vs unsharded: params max |diff| = {result['params_diff']:.3g}, "
        f"batch_stats {result['batch_stats_diff']:.3g}"
    )
    print(result)

    # the batch really was split over the 8 devices, one image each, and the state replicated
    assert result["batch_split_on_data"] and result["batch_devices"] == 8
    assert result["shard_shapes"] == [[1, 3, 128, 128]]
    assert result["targets_sharded"] and result["state_replicated"]
    # the same update as on one device
    assert result["finite"] == [True, True] and result["step"] == 1
    assert result["compiles"] == 1
    assert result["param_change"] > 1e-4  # the step did move the params
    assert result["params_diff"] <= 1e-5, result
    assert result["batch_stats_diff"] <= 1e-5, result
    assert max(result["loss_diff"].values()) <= 1e-5, result
