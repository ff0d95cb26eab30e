"""One process of the multi-process tests (tests/test_multihost.py).

    python tests/multihost_worker.py OUT NUM_PROCESSES PROCESS_ID PORT ACTION...

Started by the test as NUM_PROCESSES processes (joined by ``jax.distributed`` on
127.0.0.1:PORT when there are several) with the CPU device count in XLA_FLAGS.
The actions run in order; process 0 writes what the test compares into OUT:

- ``steps``: the sharded train step of the tiny detector on the loader's
  per-process slices, with sampling that takes every candidate and with the
  default sampling (``params_<name>.npz``, ``steps.json``: metrics, the slices
  each process read, a bad batch's error, a checkpoint round trip).
- ``train DIR``: ``lucid-jax train`` (``CLI_TRAIN``) into DIR, uninterrupted.
- ``eval DIR``: ``lucid-jax eval``'s job on DIR's checkpoint (``eval.json``,
  ``eval_results.json``).
- ``killed DIR``: ``lucid-jax train`` into DIR, every process killed (SIGKILL)
  right after the checkpoint of step 2.
- ``crash``: process 1 exits with 3 while process 0 waits for it.
"""

import dataclasses
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax
import numpy as np

from lucid_jax import distributed

NUM_CLASSES = 4
GLOBAL_BATCH = 4
STEPS = 3
SAMPLING = {
    # 256 proposals + 4 ground-truth boxes per image, all of them sampled: the
    # sample no longer depends on the order of near-tied proposals (see test_sharding)
    "every_candidate": {
        "rpn_post_nms_top_n": (256, 300),
        "box_batch_size_per_image": 260,
        "box_positive_fraction": 1.0,
    },
    "default": {},
}
# lucid-jax train's flags for the runs the test kills, resumes and compares.
CLI_TRAIN = [
    "--data",
    "shapes",
    "--shapes-train-examples",
    "16",
    "--image-size",
    "64",
    "--batch-size",
    "4",
    "--steps",
    "4",
    "--checkpoint-every",
    "2",
    "--log-every",
    "1",
    "--eval-every",
    "4",
    "--num-workers",
    "0",
    "--no-progress",
]
EVAL_BATCH = 5  # 64 held-out images: the last global batch of 10 leaves process 1 an empty slice


def _write(out, name, payload):
    if distributed.is_primary():
        with open(os.path.join(out, name), "w") as f:
            json.dump(payload, f)


def _host_tree(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): distributed.host_value(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def steps(out):
    """The sharded step on each process's slices, compared by the test with one process."""
    from lucid_jax.checkpoint import Checkpointer
    from lucid_jax.data import Loader, ShapesDataset, model_inputs
    from lucid_jax.optim import build_optimizer
    from lucid_jax.train import create_train_state, data_mesh, host_metrics, make_train_step, shard_batch
    from tests.models.conftest import random_images, tiny_detector

    count, index = jax.process_count(), jax.process_index()
    dataset = ShapesDataset(num_examples=14, image_size=64, seed=0)
    loader = Loader(
        dataset,
        GLOBAL_BATCH // count,
        max_boxes=4,
        shuffle=True,
        seed=0,
        num_workers=0,
        num_shards=count,
        shard_index=index,
    )
    mesh = data_mesh()
    results = {"process_count": count, "device_count": jax.device_count(), "metrics": {}}
    # what each process read: 3 steps per epoch, 7 steps cross two epochs; then a resume at step 4
    slices = {
        "ids": [[i for i in b["ids"]] for b in loader.iterate(0, 7)],
        "resumed_ids": [[i for i in b["ids"]] for b in loader.iterate(4, 3)],
    }
    results["slices"] = distributed.gather({k: np.array(v) for k, v in slices.items()})
    results["slices"] = {k: v.tolist() for k, v in results["slices"].items()}
    batches = [model_inputs(b, ("images", "boxes", "labels", "valid")) for b in loader.iterate(0, STEPS)]
    # the sampling settings change no parameter: one init serves both models
    variables = jax.jit(tiny_detector(num_classes=NUM_CLASSES).init)(jax.random.key(0), random_images(0, size=64))
    if distributed.is_primary():
        np.savez(os.path.join(out, "params_initial.npz"), **_host_tree(variables["params"]))

    for name, sampling in SAMPLING.items():
        model = tiny_detector(num_classes=NUM_CLASSES, **sampling)
        state = create_train_state(
            model, variables, build_optimizer(variables["params"], learning_rate=0.01), mesh=mesh
        )
        step = make_train_step(model, mesh=mesh, channels_last=True)
        history = []
        for i, batch in enumerate(batches):
            state, metrics = step(state, shard_batch(batch, mesh), jax.random.fold_in(jax.random.key(3), i))
            history.append(host_metrics(metrics))
        results["metrics"][name] = history
        if distributed.is_primary():
            np.savez(os.path.join(out, f"params_{name}.npz"), **_host_tree(state.params))

    # a bad label in the last image of the global batch: one process sees it, every process raises
    bad = {k: np.array(v) for k, v in batches[0].items()}
    if index == count - 1:
        bad["labels"][-1, 0], bad["valid"][-1, 0] = 99, True
    try:
        step(state, shard_batch(bad, mesh), jax.random.key(0))
        results["bad_batch_error"] = None
    except ValueError as e:
        results["bad_batch_error"] = str(e)

    # orbax from every process: save the replicated state, restore it into a fresh template
    with Checkpointer(os.path.join(out, "state_checkpoint")) as ckpt:
        ckpt.save(int(distributed.host_value(state.step)), state, jax.random.key(5))
        template = create_train_state(
            model, variables, build_optimizer(variables["params"], learning_rate=0.01), mesh=mesh
        )
        restored, rng, _ = ckpt.restore(template)
    before, after = _host_tree(state), _host_tree(restored)
    results["checkpoint_round_trip"] = {
        "bit_identical": sorted(before) == sorted(after)
        and all(before[k].tobytes() == after[k].tobytes() for k in before),
        "step": int(distributed.host_value(restored.step)),
        "replicated": all(
            leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == jax.device_count()
            for leaf in jax.tree_util.tree_leaves(restored.params)
        ),
        "rng": np.asarray(jax.random.key_data(rng)).tolist(),
    }
    _write(out, "steps.json", results)


def cli_train(run_dir):
    """lucid-jax train into ``run_dir``, in this process (already joined to the others)."""
    from lucid_jax import cli

    code = cli.main(["train", *CLI_TRAIN, "--out", run_dir])
    if code:
        raise SystemExit(code)


def killed(run_dir):
    """lucid-jax train, killed by SIGKILL on every process once step 2 is checkpointed."""
    from lucid_jax import checkpoint

    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Checkpointer.save = save_then_die
    cli_train(run_dir)


def evaluate(out, run_dir):
    """lucid-jax eval's job on ``run_dir``: eval.json and the COCO results (eval_results.json)."""
    from lucid_jax import jobs

    model, variables, class_names, config = jobs.load_trained(run_dir)
    dataset = jobs.open_dataset(
        "shapes",
        "val",
        shapes_examples=config.shapes_train_examples,
        image_size=config.image_size,
        class_names=class_names,
    )
    config = dataclasses.replace(config, batch_size=EVAL_BATCH)
    metrics = jobs.evaluate(
        model,
        variables,
        dataset,
        config,
        progress=False,
        results=os.path.join(out, "eval_results.json") if distributed.is_primary() else None,
    )
    assert (metrics is None) == (not distributed.is_primary())
    _write(out, "eval.json", metrics)


def main():
    out, num_processes, process_id, port, *actions = sys.argv[1:]
    num_processes, process_id = int(num_processes), int(process_id)
    if num_processes > 1:
        distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    assert jax.process_count() == num_processes
    while actions:
        action = actions.pop(0)
        if action == "steps":
            steps(out)
        elif action == "train":
            cli_train(actions.pop(0))
        elif action == "eval":
            evaluate(out, actions.pop(0))
        elif action == "killed":
            killed(actions.pop(0))
        elif action == "crash":  # process 1 dies at once; process 0 waits for it at a barrier
            if process_id == 1:
                print("process 1 crashed on purpose", file=sys.stderr, flush=True)
                os._exit(3)
            distributed.barrier("never_reached_by_process_1")
        else:
            raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    main()
