"""Shared helpers of ``bench_train.py`` and ``bench_predict.py``.

Both scripts compare lucid_jax's Faster R-CNN ResNet-101 FPN with torchvision's
``FasterRCNN(resnet_fpn_backbone("resnet101"))`` on CPU, in one run:

- the headline figures come from each side alone in a fresh child process
  (``--side ours`` or ``--side torchvision``), as a user runs one library: the
  children alternate ours, torchvision, ours, ... for a few rounds
  (:func:`alone_rounds`), each reports its median call time and its peak RSS
  (``getrusage(RUSAGE_SELF).ru_maxrss``), and the ratio ours / torchvision is the
  median of the per-round ratios (below 1: we are faster);
- a second figure, labelled as such, interleaves the two sides in one process
  (ours, torchvision, ours, ...): load from other processes then hits both alike,
  but each side also pays for the pages the other's allocator handed back;
- the floating-point ceiling is the best of a few large float32 matmuls.

Per-op profiles (XLA's HLO and torch.profiler) are in ``_profile.py``.
"""

import argparse
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


def parse_size(text):
    """'512' -> (512, 512); '800x1344' -> (800, 1344): an image's (height, width)."""
    parts = str(text).lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"expected SIZE or HEIGHTxWIDTH in pixels, e.g. 512 or 800x1344, got {text!r}")
    h, w = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    return h, w


def size_arg(text):
    """:func:`parse_size` for argparse: a bad size is a one-line usage error with its reason."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size_text(size):
    """(800, 1344) -> '800x1344'."""
    h, w = hw(size)
    return f"{h}x{w}"


def hw(size):
    """An int S or (H, W) as (H, W)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def synthetic_batch(batch, size, num_boxes=4, seed=0):
    """A fixed random batch: images in [0, 1] and a few boxes per image.

    Args:
      size: S (square) or (H, W).

    Returns:
      {"images": [B, 3, H, W] float32, "boxes": [B, M, 4] float32 xyxy pixels
      (32..256 px wide and high, inside the image), "labels": [B, M] int32 in 1..20,
      "valid": [B, M] bool (all True)}.
    """
    h, w = hw(size)
    rng = np.random.default_rng(seed)
    images = rng.random((batch, 3, h, w), dtype=np.float32)
    wh = rng.uniform(32, min(256, min(h, w) // 2), (batch, num_boxes, 2))
    xy = rng.uniform(0, 1, (batch, num_boxes, 2)) * (np.array([w, h]) - wh)
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


def realistic_weights(model, seed=0, spread=30.0):
    """Give a random torchvision FasterRCNN weights that behave like trained ones, in place.

    - every BN (the body's, and v2's in the FPN and the box head) has non-trivial
      statistics, scale and bias (a trained network's BN
      is far from the identity, and the conversion of all four tensors is exercised);
    - each residual branch is damped (bn3's scale x 0.2), so activations stay bounded
      through 33 random bottlenecks instead of doubling per block;
    - the RPN's objectness and the classifier are spread (x ``spread``, 30), so that
      both keep about 100 confident detections above the 0.05 threshold and
      post-processing and NMS do the work they do on a trained model. Training uses
      a spread of 1 (both still keep 100 detections, less confident): the losses
      then start where a fresh head's do (the classifier's near 3) and SGD stays
      stable.
    """
    import torch
    from torchvision.models.resnet import Bottleneck
    from torchvision.ops.misc import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():  # the body's BN first; v2's FPN and box head BN too
            if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
                c = m.weight.shape[0]
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
        for m in model.backbone.body.modules():
            if isinstance(m, Bottleneck):
                m.bn3.weight.mul_(0.2)
        model.rpn.head.cls_logits.weight.mul_(spread)
        model.roi_heads.box_predictor.cls_score.weight.mul_(spread)
    return model


def torchvision_model(size, trainable_layers=3, num_classes=21, seed=0, spread=30.0):
    """torchvision's FasterRCNN on a ResNet-101 FPN backbone with :func:`realistic_weights`.

    ``min_size = min(H, W)``, ``max_size = max(H, W)`` make GeneralizedRCNNTransform
    keep an H x W batch as it is (its default min_size=800 would upsample 512 to 800
    and do 2.4x the work). Its normalisation and the (identity) resize still run, as in any
    torchvision step. The backbone uses FrozenBatchNorm2d (the default of
    ``resnet_fpn_backbone``) and trains the top ``trainable_layers`` stages.
    """
    import torch
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet101", weights=None, trainable_layers=trainable_layers)
    model = FasterRCNN(backbone, num_classes=num_classes, **torchvision_sizes(size))
    return realistic_weights(model, seed, spread)


def torchvision_sizes(size):
    """torchvision's ``min_size`` and ``max_size`` that leave an H x W image unresized."""
    h, w = hw(size)
    return {"min_size": min(h, w), "max_size": max(h, w)}


def ours_from_torchvision(tv, num_classes=21):
    """Our TORCHVISION_FASTER_RCNN detector (frozen BN) with torchvision's exact weights.

    Returns:
      (model, variables).
    """
    import jax
    import jax.numpy as jnp

    from lucid_jax import state_dict

    model = ours_model("torchvision", num_classes=num_classes, norm_mode="frozen")
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 64, 64), jnp.float32))
    template = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), template)
    flat = state_dict.from_torchvision_faster_rcnn(tv.state_dict())
    return model, state_dict.from_state_dict(template, flat, strict=False, model=model)


def write_same_weights(size, path, spread=30.0):
    """Save the weights both sides share (torchvision's, converted) for the ours child.

    Run in a child of its own (``--side weights``): Linux keeps a process's peak RSS
    across exec, so the measuring children must start before the parent holds models.
    """
    from lucid_jax import state_dict, state_dict_files

    model, variables = ours_from_torchvision(torchvision_model(size, spread=spread))
    state_dict_files.save_state_dict_file(state_dict.to_state_dict(variables, model=model), path)


def spread_heads(variables, gain=30.0):
    """Our own random weights with the RPN's objectness and the classifier spread as
    :func:`realistic_weights` spreads torchvision's."""
    params = dict(variables["params"])
    params["cls_score"] = {**params["cls_score"], "kernel": params["cls_score"]["kernel"] * gain}
    head = dict(params["rpn"]["head"])
    head["cls_logits"] = {**head["cls_logits"], "kernel": head["cls_logits"]["kernel"] * gain}
    params["rpn"] = {**params["rpn"], "head": head}
    return {**variables, "params": params}


def normalised(images):
    """[B, 3, H, W] images in [0, 1], normalised as torchvision's transform does (ImageNet)."""
    from lucid_jax.data import IMAGENET_MEAN, IMAGENET_STD

    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return ((images - mean) / std).astype(np.float32)


def check_same_detections(ours, theirs, box_atol=0.5, min_detections=50):
    """Raise unless both sides keep the same detections: the same count per image (at
    least ``min_detections``), and, rank by rank, the same labels and boxes within
    ``box_atol`` px, allowing 2% of ranks to swap between near-equal scores.

    Args:
      ours: {"boxes": [B, K, 4], "scores", "labels", "valid": [B, K]}.
      theirs: torchvision's list of {"boxes", "scores", "labels"} tensors.

    Returns:
      {"detections": per-image counts, "max_box_diff": px over the matched ranks,
      "swapped": ranks that matched another rank}.
    """
    counts, worst, swapped = [], 0.0, 0
    for i, tv in enumerate(theirs):
        keep = np.asarray(ours["valid"][i])
        ob, ol = np.asarray(ours["boxes"][i])[keep], np.asarray(ours["labels"][i])[keep]
        tb, tl = tv["boxes"].numpy(), tv["labels"].numpy()
        if len(ob) != len(tb) or len(ob) < min_detections:
            raise RuntimeError(
                f"image {i}: ours keeps {len(ob)} detections, torchvision {len(tb)}; "
                f"not the same work (need equal counts, at least {min_detections})"
            )
        diff = np.abs(ob - tb).max(-1)
        same = (diff <= box_atol) & (ol == tl)
        for r in np.nonzero(~same)[0]:  # a near-tie may swap two ranks
            close = (np.abs(ob[r] - tb).max(-1) <= box_atol) & (tl == ol[r])
            if not close.any():
                raise RuntimeError(
                    f"image {i}: our detection {r} ({ob[r].round(1)}, label {ol[r]}) has no "
                    f"torchvision counterpart within {box_atol} px"
                )
            swapped += 1
        if swapped > max(2, 0.02 * len(ob)) * len(theirs):
            raise RuntimeError(f"{swapped} detections differ in rank between the two sides")
        counts.append(len(ob))
        worst = max(worst, float(diff[same].max()) if same.any() else 0.0)
    return {"detections": counts, "max_box_diff": worst, "swapped": swapped}


def check_torchvision_size(model, images, size):
    """Raise unless torchvision's transform keeps the batch at its size (S or (H, W))."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        image_list, _ = model.transform(list(images))
    model.train(was_training)
    got = tuple(image_list.tensors.shape[-2:])
    if got != hw(size):
        raise RuntimeError(f"torchvision's transform resized {size_text(size)} images to {got}")


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


def interleaved(fns, steps, warmup=1, block=1):
    """Time each of ``fns`` (name -> blocking callable) ``steps`` times, interleaved.

    Each round runs every function ``block`` times in a row; the order rotates from
    round to round so that none always follows the same other one. Returns name ->
    list of seconds, ``steps * block`` of them, round after round (a round's calls of
    one function are ``times[name][r * block:(r + 1) * block]``).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for i in range(steps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            times[name] += [time_call(fns[name]) for _ in range(block)]
    return times


def round_ratios(times, a, b, block, pick=None):
    """Per-round ratios a / b of ``interleaved(..., block=block)``'s times.

    Each round's figure per side is the median of its ``block`` calls, or the call
    at index ``pick`` of the block (0: the first one after the other side ran).
    """

    def per_round(xs):
        rounds = [xs[r : r + block] for r in range(0, len(xs), block)]
        return [median(x) if pick is None else x[pick] for x in rounds]

    return [x / y for x, y in zip(per_round(times[a]), per_round(times[b]))]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    """'min..max' of a list of seconds, as a short string."""
    return f"{min(xs):.2f}..{max(xs):.2f}" if xs else "-"


def peak_rss_mib():
    """Peak resident set size of this process so far, MiB (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss():
    """Start a new peak-RSS window: Linux resets VmHWM to the current RSS on "5" in clear_refs.

    Returns False where that is not possible (not Linux, or a kernel before 4.0).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return window_peak_rss_mib() is not None
    except OSError:
        return False


def window_peak_rss_mib():
    """Peak RSS since the last ``reset_peak_rss()`` (VmHWM), MiB; None where /proc has no such line."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


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


def check_in_child(script, argv):
    """Both sides' detections on the same weights, compared in a child (``--side check``); printed.

    In a child, so that this process stays small for the measuring children it
    starts (Linux keeps a process's peak RSS across fork and exec). Exits if they differ.
    """
    print("checking both sides' detections on the same weights ...", flush=True)
    check = run_child(script, argv, "check")
    if check is None:
        sys.exit("the two sides' detections differ (see above); nothing is timed")
    print(
        f"same detections on both sides: {check['detections']} per image, boxes within "
        f"{check['max_box_diff']:.2g} px, {check['swapped']} near-tie rank swaps",
        flush=True,
    )
    return check


def alone_rounds(script, argv, rounds, first_round_extra=(), sides=("ours", "torchvision")):
    """Each side alone in a fresh process, alternating A B A B for ``rounds`` rounds.

    Each child runs ``script ARGV --side SIDE`` (plus ``first_round_extra`` in the
    first round) and prints its JSON result (with at least "median_s",
    "first_call_s" and "peak_rss_mib"). Returns side -> list of results, one per
    round; exits if a child fails.
    """
    results = {side: [] for side in sides}
    for r in range(rounds):
        extra = list(first_round_extra) if r == 0 else []
        for side in sides:
            print(f"round {r + 1}/{rounds}: '{side}' alone in its own process ...", flush=True)
            res = run_child(script, [*argv, *extra], side)
            if res is None:
                sys.exit(f"the '{side}' child failed (see above)")
            results[side].append(res)
        print(f"round {r + 1}: " + ", ".join(f"{side} {results[side][-1]['median_s']:.3f} s" for side in sides))
    return results


def report_alone(results, title, rss_keys=(("peak_rss_mib", "peak RSS"),)):
    """Print :func:`alone_rounds`' table and ratios; returns the figures.

    The ratio ours / torchvision is the median of the per-round ratios of each
    child's median call time; each RSS ratio the median of the per-round ratios.

    Returns:
      {"ours_s", "torchvision_s" (medians over rounds), "ratio", "ratios" (per round),
      and per key of ``rss_keys``: "ours_KEY", "torchvision_KEY", "KEY_ratio"}.
    """
    ours, tv = results["ours"], results["torchvision"]
    ratios = [o["median_s"] / t["median_s"] for o, t in zip(ours, tv)]
    print(f"\n## {title}")
    rows = []
    for side in ("ours", "torchvision"):
        xs = results[side]
        row = [
            side,
            f"{median([x['median_s'] for x in xs]):.3f}",
            ", ".join(f"{x['median_s']:.3f}" for x in xs),
            f"{median([x['first_call_s'] for x in xs]):.1f}",
        ]
        row += [f"{median([x[k] for x in xs]):.0f}" if all(x.get(k) for x in xs) else "-" for k, _ in rss_keys]
        rows.append(row)
    print_table(rows, ["side", "median s", "per round s", "first call s", *(f"{n} MiB" for _, n in rss_keys)])
    out = {
        "ours_s": median([x["median_s"] for x in ours]),
        "torchvision_s": median([x["median_s"] for x in tv]),
        "ratio": median(ratios),
        "ratios": ratios,
    }
    per_round = ", ".join(f"{r:.2f}" for r in ratios)
    line = f"ours / torchvision: {out['ratio']:.2f}x time (median of per-round ratios {per_round})"
    for key, name in rss_keys:
        if all(o.get(key) and t.get(key) for o, t in zip(ours, tv)):
            out[f"{key}_ratio"] = median([o[key] / t[key] for o, t in zip(ours, tv)])
            out[f"ours_{key}"] = median([o[key] for o in ours])
            out[f"torchvision_{key}"] = median([t[key] for t in tv])
            line += f", {out[f'{key}_ratio']:.2f}x {name}"
    print(line, flush=True)
    return out


def print_ceiling_share(alone, ceiling, per="call"):
    """GFLOP per call, GFLOP/s and the share of the best matmul ceiling, per side.

    Args:
      alone: ``report_alone``'s figures with "gflop": side -> GFLOP per call (None if not counted).
      ceiling: ``matmul_ceiling()``'s result, or None.
    """
    best = max(v for v in ceiling.values() if v) if ceiling else None
    rows = []
    for side, fl in alone["gflop"].items():
        rate = fl / alone[f"{side}_s"] if fl else None
        share = f"{100 * rate / best:.0f}%" if rate and best else "-"
        rows.append((side, f"{fl:.0f}" if fl else "-", f"{rate:.0f}" if rate else "-", share))
    print_table(rows, ["side", f"GFLOP/{per}", "GFLOP/s", "of ceiling"])
    print(
        "GFLOP: ours from XLA's cost_analysis of the compiled program (every HLO op, elementwise work "
        "included, so it overstates the matmul work), torchvision from FlopCounterMode (matmuls and "
        "convolutions only)."
    )
    if ceiling:
        tv_part = f", torch.mm {ceiling['torch']:.0f}" if ceiling.get("torch") else ""
        print(f"float32 ceiling (best 4096^3 matmul): jnp.dot {ceiling['jax']:.0f} GFLOP/s{tv_part}")


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
