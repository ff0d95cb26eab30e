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
        {"boxes": torch.from_numpy(b[v]), "labels": torch.from_numpy(l[v]).long()}
        for b, l, v in zip(batch["boxes"], batch["labels"], batch["valid"])
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
            return json.loads(line[len(RESULT_TAG):])
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

        parts += [f"torch {torch.__version__} ({torch.get_num_threads()} threads)", f"torchvision {torchvision.__version__}"]
    except ImportError:
        pass
    return ", ".join(parts)


# --- per-op profile of a compiled XLA:CPU executable ---------------------------------


def _parse_stack_tables(lines):
    """FileNames/FunctionNames/FileLocations/StackFrames of an HLO module's text.

    Returns frame id -> list of function names, innermost first.
    """
    import re

    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    for line in lines:
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if line.startswith(("%", "ENTRY", "ROOT")):
            break
        if not line[:1].isdigit():
            continue
        if section == "FileNames":
            i, name = line.split(" ", 1)
            files[int(i)] = name.strip('"')
        elif section == "FunctionNames":
            i, name = line.split(" ", 1)
            funcs[int(i)] = name.strip('"')
        elif section == "FileLocations":
            m = re.match(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+)", line)
            if m:
                locs[int(m[1])] = funcs.get(int(m[3]), "?")
        elif section == "StackFrames":
            m = re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", line)
            if m:
                # The printed parent id is one more than the parent's own id (0: none).
                frames[int(m[1])] = (int(m[2]), int(m[3]) - 1)

    chains = {}

    def chain(fid):
        out, seen = [], set()
        while fid in frames and fid not in seen:
            seen.add(fid)
            loc, parent = frames[fid]
            out.append(locs.get(loc, "?"))
            fid = parent
        return out

    for fid in frames:
        chains[fid] = chain(fid)
    return chains


def parse_hlo(text):
    """Instructions of a compiled HLO module's text.

    Returns name -> {"op": op_name metadata or "", "funcs": Python function chain
    (innermost first) or [], "calls": called computation or None, "operands": [names],
    "computation": the computation it belongs to}; and computation -> root name.
    """
    import re

    lines = text.splitlines()
    chains = _parse_stack_tables(lines)
    instrs, roots = {}, {}
    comp = None
    head = re.compile(r"^(?:ENTRY )?%(\S+) \(")
    inst = re.compile(r"^\s+(ROOT )?%(\S+) = (.*)$")
    for line in lines:
        m = head.match(line)
        if m:
            comp = m[1]
            continue
        m = inst.match(line)
        if not m:
            continue
        is_root, name, rest = m[1], m[2], m[3]
        op = re.search(r'op_name="([^"]*)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        body = rest.split("metadata=")[0]
        paren = body.find("(")
        operands = re.findall(r"%([\w.\-]+)", body[paren:]) if paren >= 0 else []
        window = re.search(r"window=\{size=([\dx]+)", rest) if " convolution(" in rest else None
        instrs[name] = {
            "window": int(np.prod([int(v) for v in window[1].split("x")])) if window else 0,
            "op": op[1] if op else "",
            "funcs": chains.get(int(frame[1]), []) if frame else [],
            "calls": calls[1] if calls else None,
            "operands": [o for o in operands if not calls or o != calls[1]],
            "computation": comp,
        }
        if is_root:
            roots[comp] = name
    return instrs, roots


def _has(info):
    return bool(info[0] or info[1])


def _described(instrs, by_comp, name, depth=0, own=True):
    """(op_name, funcs) of an instruction.

    A fusion without metadata of its own takes that of its instructions (a backward
    one if any, since fusions that mix both are backward work), else that of its
    operands, a backward one first (weight-gradient convolutions often carry none:
    they read a forward activation and a backward gradient). ``own=False`` skips
    the instruction's own metadata (used for weight-gradient convolutions fused
    into the gradient norm, whose own metadata names the norm).
    """
    info = instrs.get(name)
    if info is None:
        return "", []
    if own and (info["op"] or info["funcs"]):
        return info["op"], info["funcs"]
    if info["calls"] and own:
        inner = [(instrs[n]["op"], instrs[n]["funcs"]) for n in by_comp.get(info["calls"], ())]
        inner = [d for d in inner if _has(d)]
        for d in inner:
            if "transpose(jvp(" in d[0]:
                return d
        if inner:
            return inner[-1]
    if depth < 3:
        found = [_described(instrs, by_comp, operand, depth + 1) for operand in info["operands"]]
        found = [f for f in found if _has(f)]
        for d in found:
            if "transpose(jvp(" in d[0]:
                return d
        if found:
            return found[0]
    return "", []


def _is_weight_grad(instrs, by_comp, name):
    """Whether an op is (or fuses) a convolution whose window is larger than any
    kernel of the model (7x7): XLA's form of a weight gradient, which slides the
    output gradient over the input activation."""
    info = instrs.get(name, {})
    names = [name] + list(by_comp.get(info.get("calls"), ()))
    return any(instrs[n].get("window", 0) > 49 for n in names if n in instrs)


def _component(op, funcs):
    """The detector component an instruction belongs to."""
    import re

    fs = set(funcs)
    rules = (
        ("rpn_targets", "RPN targets (anchor IoU, match, sample)"),
        ("roi_targets", "RoI targets (IoU, match, sample)"),
        ("select_proposals", "RPN proposals (top-k, decode, NMS)"),
        ("postprocess_detections", "detections (softmax, decode, NMS)"),
        ("multiscale_roi_align", "RoIAlign (MultiScale)"),
        ("RoIBoxHead.__call__", "box head (fc1, fc2, predictors)"),
        ("RPNHead.__call__", "RPN head (3x3 conv, 1x1 convs)"),
        ("grid_anchors", "anchors"),
        ("FPN.__call__", "FPN"),
    )
    for fn, label in rules:
        if fn in fs:
            return label
    if "ResNet.features" in fs:
        m = re.search(r"net\.features/(stem|layer\d)", op)
        return f"ResNet {m[1]}" if m else "ResNet max-pool"
    if fs & {"rpn_loss_terms", "roi_loss_terms", "combine", "smooth_l1"}:
        return "losses"
    if "check_images" in fs:
        return "input NCHW->NHWC"
    if fs & {"global_norm", "TrainState.apply_gradients", "apply_updates"} or "train_step" in op:
        return "optimizer, grad norm, finite check"
    return "other"


def _op_kind(name, wgrad=False):
    if wgrad:
        return "conv weight gradient"
    base = name.rsplit(".", 1)[0]
    if "ynn_fusion" in base or "xnn_fusion" in base or base.startswith(("convolution", "dot", "onednn")):
        return "conv / matmul"
    if "transpose" in base or base in ("copy", "copy_fusion") or base.endswith("copy_fusion"):
        return "transpose / copy"
    if base.startswith(("while", "sort", "scatter", "wrapped_scatter", "gather", "conditional", "call")):
        return "loops, sort, scatter"
    return "elementwise / reduce"


def trace_op_times(run, steps, logdir):
    """Run ``run()`` ``steps`` times under jax.profiler; per-HLO-op busy time.

    Only the outermost op events of each XLA thread are summed (ops inside a while
    loop are part of the loop's event). Returns (hlo_op -> seconds per step, wall
    seconds per step).
    """
    import collections
    import glob

    import jax
    from jax._src.lib import _profile_data

    jax.profiler.start_trace(logdir)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    path = max(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    data = _profile_data.ProfileData.from_file(path)
    busy = collections.Counter()
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            events = sorted(
                ((e.start_ns, e.duration_ns, dict(e.stats).get("hlo_op")) for e in line.events), key=lambda t: t[0]
            )
            end = -1.0
            for start_ns, dur, op in events:
                if op is None:
                    continue
                if start_ns >= end:  # not nested in the previous outermost op
                    busy[op] += dur
                    end = start_ns + dur
    return {op: ns / 1e9 / steps for op, ns in busy.items()}, wall


def op_breakdown(hlo_text, op_times):
    """Group per-op times by (component, fwd/bwd) and by op kind.

    Returns (rows [(component, direction, seconds, count)], kinds {kind: seconds},
    top [(seconds, op, component, direction, kind)]).
    """
    import collections

    instrs, _ = parse_hlo(hlo_text)
    by_comp = collections.defaultdict(list)
    for iname, info in instrs.items():
        by_comp[info["computation"]].append(iname)
    groups = collections.defaultdict(lambda: [0.0, 0])
    kinds = collections.Counter()
    top = []
    for name, sec in op_times.items():
        wgrad = _is_weight_grad(instrs, by_comp, name)
        op, funcs = _described(instrs, by_comp, name, own=not wgrad)
        component = _component(op, funcs)
        direction = "bwd" if wgrad or "transpose(jvp(" in op else ("fwd" if "jvp(" in op else "")
        if component.startswith(("RPN proposals", "RPN targets", "RoI targets", "anchors")):
            direction = ""  # no gradient flows through these
        kind = _op_kind(name, wgrad)
        groups[(component, direction)][0] += sec
        groups[(component, direction)][1] += 1
        kinds[kind] += sec
        top.append((sec, name, component, direction, kind))
    rows = sorted(((c, d, s, n) for (c, d), (s, n) in groups.items()), key=lambda r: -r[2])
    return rows, dict(kinds), sorted(top, reverse=True)


def profile_torch(run, title, top=12):
    """Print the most expensive torch ops of one ``run()`` (torch.profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n## {title} (torch.profiler, self CPU time summed over threads, total {total / 1e6:.2f} s)")
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    print_table(
        [(e.key, e.count, f"{e.self_cpu_time_total / 1e3:.0f}", f"{100 * e.self_cpu_time_total / total:.1f}")
         for e in rows],
        ["op", "calls", "self ms", "%"],
    )
