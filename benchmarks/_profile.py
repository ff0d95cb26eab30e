"""Per-op profiles for ``bench_train.py`` and ``bench_predict.py``.

For our side, the compiled XLA:CPU executable is traced with JAX's profiler and its
HLO text is parsed, so each op's time is attributed to a model component (backbone,
FPN, RPN, RoI heads, ...), a direction (forward or backward) and a kind of op (a
convolution's weight gradient among them); for torchvision's side,
``torch.profiler`` lists the most expensive ops. The timing harness is ``_common.py``.
"""

import os
import time

import numpy as np
from _common import print_table

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
    if fs & {"rpn_loss_terms", "roi_loss_terms", "batch_mean", "smooth_l1"}:
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
        [
            (e.key, e.count, f"{e.self_cpu_time_total / 1e3:.0f}", f"{100 * e.self_cpu_time_total / total:.1f}")
            for e in rows
        ],
        ["op", "calls", "self ms", "%"],
    )
