"""benchmarks/_common.py: the headline protocol's pieces that need no detector: sizes,
torchvision's size settings, the alternating children and the per-round ratios.
"""

import json
import sys

import pytest

from tests.bench_scripts import BENCHMARKS, load_benchmark


@pytest.fixture(scope="module")
def C():
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import _common beside them
    try:
        yield load_benchmark("_common")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_sizes(C):
    assert C.parse_size("512") == (512, 512)
    assert C.parse_size("800x1344") == (800, 1344)
    assert C.size_text((800, 1344)) == "800x1344" and C.size_text(256) == "256x256"
    for bad in ("", "0", "800x", "x1344", "8x8x8", "-512", "abc"):
        with pytest.raises(ValueError, match="SIZE or HEIGHTxWIDTH"):
            C.parse_size(bad)
    # torchvision's transform keeps an image whose short side is min_size and long side max_size
    assert C.torchvision_sizes((800, 1344)) == {"min_size": 800, "max_size": 1344}
    assert C.torchvision_sizes((1344, 800)) == {"min_size": 800, "max_size": 1344}
    batch = C.synthetic_batch(2, (96, 160), num_boxes=5)
    assert batch["images"].shape == (2, 3, 96, 160)
    boxes = batch["boxes"]
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 2] <= 160).all() and (boxes[..., 3] <= 96).all()


def test_torchvision_keeps_the_canvas_it_is_given(C):
    pytest.importorskip("torchvision")
    import torch
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    for size in ((800, 1344), (512, 512)):
        t = GeneralizedRCNNTransform(**C.torchvision_sizes(size), image_mean=[0, 0, 0], image_std=[1, 1, 1])
        out, _ = t([torch.zeros(3, *size)])
        assert tuple(out.tensors.shape[-2:]) == size


def test_alone_rounds_alternate_and_the_ratio_is_the_median_of_per_round_ratios(C, monkeypatch, capsys):
    calls, argvs = [], []
    times = {"ours": iter([1.0, 3.0, 2.0]), "torchvision": iter([2.0, 2.0, 5.0])}
    rss = {"ours": 100.0, "torchvision": 200.0}

    def fake_child(script, argv, side, timeout=1800):
        calls.append(side)
        argvs.append(argv)
        return {"median_s": next(times[side]), "first_call_s": 0.5, "peak_rss_mib": rss[side]}

    monkeypatch.setattr(C, "run_child", fake_child)
    results = C.alone_rounds("script.py", ["--size", "512"], 3, first_round_extra=["--flops"])
    assert calls == ["ours", "torchvision"] * 3  # A B A B A B
    assert argvs == [["--size", "512", "--flops"]] * 2 + [["--size", "512"]] * 4  # the extra in round 1 only
    out = C.report_alone(results, "title")
    # per-round ratios 0.5, 1.5, 0.4: their median, not the ratio of the medians (2.0 / 2.0)
    assert out["ratios"] == [0.5, 1.5, 0.4] and out["ratio"] == 0.5
    assert out["ours_s"] == 2.0 and out["torchvision_s"] == 2.0
    assert out["peak_rss_mib_ratio"] == 0.5
    printed = capsys.readouterr().out
    assert "ours / torchvision: 0.50x time (median of per-round ratios 0.50, 1.50, 0.40), 0.50x peak RSS" in printed


def test_a_failed_child_stops_the_run(C, monkeypatch):
    monkeypatch.setattr(C, "run_child", lambda *a, **k: None)
    with pytest.raises(SystemExit, match="the 'ours' child failed"):
        C.alone_rounds("script.py", [], 3)


def test_a_child_result_is_read_from_its_last_tagged_line(C, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        "import json, sys\n"
        "print('noise')\n"
        f"print({C.RESULT_TAG!r} + json.dumps({{'side': sys.argv[-1], 'median_s': 1.5}}))\n"
    )
    assert C.run_child(str(script), [], "ours") == {"side": "ours", "median_s": 1.5}
    assert json.loads(json.dumps(C.run_child(str(script), [], "torchvision")))["side"] == "torchvision"


def test_ceiling_share(C, capsys):
    alone = {"gflop": {"ours": 160.0, "torchvision": None}, "ours_s": 0.8, "torchvision_s": 1.0}
    C.print_ceiling_share(alone, {"jax": 250.0, "torch": 320.0})
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:4]}
    assert rows == {"ours": ["160", "200", "62%"], "torchvision": ["-", "-", "-"]}  # 200 / 320, the best


def test_the_documented_commands_parse_and_a_bad_size_is_one_line(C):
    """Every bench_predict.py and bench_train.py command docs/benchmarks.md shows parses as
    written; a bad --size exits 2 with the reason, before anything is built."""
    import re
    import shlex
    import subprocess

    text = (BENCHMARKS.parent / "docs" / "benchmarks.md").read_text()
    commands = re.findall(r"python (benchmarks/bench_(?:predict|train)\.py[^`#\n]*)", text)
    assert len(commands) >= 6
    sys.path.insert(0, str(BENCHMARKS))
    try:
        scripts = {name: load_benchmark(name) for name in ("bench_predict", "bench_train")}
    finally:
        sys.path.remove(str(BENCHMARKS))
    for command in commands:
        path, *argv = shlex.split(command)
        args = scripts[path.split("/")[-1][:-3]].parse_args(argv)
        assert args.size in ((512, 512), (800, 1344)), command
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_predict.py"), "--size", "800x"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("argument --size: expected SIZE or HEIGHTxWIDTH in pixels, e.g. 512 or 800x1344, got '800x'")
    )
