"""Shared helpers of ``bench_train.py`` and ``bench_predict.py``.

Both scripts compare lucid_jax's Faster R-CNN ResNet-101 FPN with torchvision's
``FasterRCNN(resnet_fpn_backbone("resnet101"))`` on CPU, in one run:

- timings are interleaved (ours, torchvision, ours, ...) in one process, so that
  load from other processes on a shared machine hits both sides alike, and are
  reported as medians and as the ratio ours / torchvision (below 1: we are faster);
- peak RSS is measured per side in a fresh child process (``--side ours`` or
  ``--side torchvision``), as ``getrusage(RUSAGE_SELF).ru_maxrss`` at its end, so
  neither framework's memory counts against the other (the parent imports both);
- the floating-point ceiling is the best of a few large float32 matmuls.

Per-op profiles (XLA's HLO and torch.profiler) are in ``_profile.py``.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

TV_MISSING = "this benchmark compares against torchvision, which is not installed: pip install -e '.[parity]'"
RESULT_TAG = "BENCH_RESULT "  # a child prints its JSON result on one line behind this tag


# --- synthetic data -----------------------------------------------------------------


def synthetic_batch(batch, size, num_boxes=4, seed=0):
    """A fixed random batch: images in [0, 1] and a few boxes per image.

    Returns:
      {"images": [B, 3, S, S] float32, "boxes": [B, M, 4] float32 xyxy pixels
      (32..256 px wide and high, inside the image), "labels": [B, M] int32 in 1..20,
      "valid": [B, M] bool (all True)}.
    """
    rng = np.random.default_rng(seed)
    images = rng.random((batch, 3, size, size), dtype=np.float32)
    wh = rng.uniform(32, min(256, size // 2), (batch, num_boxes, 2))
    xy = rng.uniform(0, 1, (batch, num_boxes, 2)) * (size - wh)
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    labels = rng.integers(1, 21, (batch, num_boxes)).astype(np.int32)
    valid = np.ones((batch, num_boxes), bool)
    return {"images": images, "boxes": boxes, "labels": labels, "valid": valid}


def torchvision_targets(batch):
    """The same boxes and labels as torchvision's list of target dicts."""
    import torch

    return [
        {"boxes": torch.from_numpy(b[v]), "labels": torch.from_numpy(lab[v]).long()}
        for b, lab, v in zip(batch["boxes"], batch["labels"], batch["valid"])
    ]


# --- models -------------------------------------------------------------------------


def torchvision_model(size, trainable_layers=3, num_classes=21, seed=0):
    """torchvision's FasterRCNN on a ResNet-101 FPN backbone, random weights.

    ``min_size = max_size = size`` makes GeneralizedRCNNTransform keep a size x size
    batch as it is (its default min_size=800 would upsample 512 to 800 and do 2.4x
    the work). Its normalisation and the (identity) resize still run, as in any
    torchvision step. The backbone uses FrozenBatchNorm2d (the default of
    ``resnet_fpn_backbone``) and trains the top ``trainable_layers`` stages.
    """
    import torch
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.resnet import Bottleneck

    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet101", weights=None, trainable_layers=trainable_layers)
    # Zero-init the last BN of every bottleneck, as lucid_jax does (Goyal et al. 2017;
    # torchvision's zero_init_residual). With identity FrozenBatchNorm2d and random
    # convs, 33 plain residual blocks blow activations up and the losses become NaN
    # after a step or two, which would change the work done (NMS, sampling).
    with torch.no_grad():
        for module in backbone.body.modules():
            if isinstance(module, Bottleneck):
                module.bn3.weight.zero_()
    return FasterRCNN(backbone, num_classes=num_classes, min_size=size, max_size=size)


def check_torchvision_size(model, images, size):
    """Raise unless torchvision's transform keeps the batch at size x size."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        image_list, _ = model.transform(list(images))
    model.train(was_training)
    got = tuple(image_list.tensors.shape[-2:])
    if got != (size, size):
        raise RuntimeError(f"torchvision's transform resized {size}x{size} images to {got}")


def ours_model(config="lucid", num_classes=21, **kwargs):
    """lucid_jax's Faster R-CNN ResNet-101 FPN.

    config "lucid" is the seed's model (9 anchors on P2..P5, 1000 training
    proposals, aligned RoIAlign, dropout 0.5); "torchvision" is
    TORCHVISION_FASTER_RCNN (3 anchors on P2..P6, 2000 training proposals, ...),
    which does the same work as torchvision's model.
    """
    from lucid_jax.models import TORCHVISION_FASTER_RCNN, faster_rcnn_resnet_101_fpn

    if config not in ("lucid", "torchvision"):
        raise ValueError(f'config must be "lucid" or "torchvision", got {config!r}')
    extra = dict(TORCHVISION_FASTER_RCNN) if config == "torchvision" else {}
    extra.update(kwargs)
    return faster_rcnn_resnet_101_fpn(num_classes=num_classes, **extra)


# --- timing -------------------------------------------------------------------------


def time_call(fn):
    """Seconds taken by ``fn()`` (which must block until its result is ready)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns, steps, warmup=1):
    """Time each of ``fns`` (name -> blocking callable) ``steps`` times, interleaved.

    Each round runs every function once; the order rotates from round to round so
    that none always follows the same other one. Returns name -> list of seconds.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for i in range(steps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(time_call(fns[name]))
    return times


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    """'min..max' of a list of seconds, as a short string."""
    return f"{min(xs):.2f}..{max(xs):.2f}" if xs else "-"


def peak_rss_mib():
    """Peak resident set size of this process so far, MiB (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit_result(result):
    """A child's last line: its JSON result, for ``run_child``."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(script, argv, side, timeout=1800):
    """Run ``script --side SIDE`` with ``argv`` in a fresh interpreter; its JSON result.

    Returns None (and prints why) if the child fails.
    """
    cmd = [sys.executable, script, *argv, "--side", side]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stdout + proc.stderr)[-3000:]
    print(f"[child {side} failed, rc={proc.returncode}]\n{tail}", file=sys.stderr)
    return None


def xla_cost(compiled):
    """(flops, bytes accessed) from XLA's cost analysis of a compiled executable."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", float("nan"))), float(cost.get("bytes accessed", float("nan")))


# --- floating-point ceiling ----------------------------------------------------------


def matmul_ceiling(n=4096, repeats=5):
    """Achieved GFLOP/s of the best of ``repeats`` float32 n x n matmuls.

    Returns {"jax": GFLOP/s of jnp.dot, "torch": GFLOP/s of torch.mm (None if no
    torch)}: a practical ceiling of the machine's float32 throughput.
    """
    import jax
    import jax.numpy as jnp

    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    dot = jax.jit(jnp.dot)
    ja, jb = jax.device_put(a), jax.device_put(b)
    jax.block_until_ready(dot(ja, jb))
    best_jax = min(time_call(lambda: jax.block_until_ready(dot(ja, jb))) for _ in range(repeats))
    out = {"jax": flops / best_jax / 1e9, "torch": None}
    try:
        import torch
    except ImportError:
        return out
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch.mm(ta, tb)
    best_torch = min(time_call(lambda: torch.mm(ta, tb)) for _ in range(repeats))
    out["torch"] = flops / best_torch / 1e9
    return out


# --- printing -----------------------------------------------------------------------


def print_table(rows, headers):
    """A plain fixed-width table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def environment_line():
    """One line naming the versions and the CPU."""
    import jax

    parts = [f"jax {jax.__version__}", f"backend {jax.default_backend()}", f"{os.cpu_count()} CPUs"]
    try:
        import torch
        import torchvision

        parts += [
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
            f"torchvision {torchvision.__version__}",
        ]
    except ImportError:
        pass
    return ", ".join(parts)
