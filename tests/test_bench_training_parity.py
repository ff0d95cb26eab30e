"""benchmarks/bench_training_parity.py: the shared training windows, and the --small
run's mechanics (both sides train from equal weights, the results and curves are
written). No accuracy is asserted: six steps learn nothing."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.bench_scripts import load_benchmark
from tests.models.conftest import TV_REASON


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_training_parity")


def test_windows_are_drawn_once_per_seed_and_step_and_carry_their_boxes(bench):
    image = np.zeros((300, 500, 3), np.uint8)
    boxes = np.array([[10, 20, 60, 80], [200, 100, 260, 150], [420, 200, 490, 290]], np.float32)
    for x1, y1, x2, y2 in boxes.astype(int):
        image[y1:y2, x1:x2] = 255
    regions = [(image, boxes, np.array([1, 2, 3], np.int32))]
    first = bench.training_batch(regions, seed=3, step=7, batch=4, size=128)
    again = bench.training_batch(regions, seed=3, step=7, batch=4, size=128)
    other = bench.training_batch(regions, seed=4, step=7, batch=4, size=128)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["images"], other["images"])
    assert first["images"].shape == (4, 3, 128, 128) and first["images"].dtype == np.float32
    windows = first["images"].transpose(0, 2, 3, 1)
    for window, bs, labels, valid in zip(windows, first["boxes"], first["labels"], first["valid"]):
        assert not valid[valid.sum() :].any()  # padding at the end
        for (x1, y1, x2, y2), label in zip(bs[valid].round().astype(int), labels[valid]):
            assert x2 > x1 and y2 > y1 and label in (1, 2, 3)
            assert (window[y1:y2, x1:x2] == 1.0).all()  # flipped or not, the box covers its white pixels
        # every box mostly inside the window is there: the white area outside the boxes is small
        covered = np.zeros(window.shape[:2], bool)
        for x1, y1, x2, y2 in bs[valid].round().astype(int):
            covered[y1:y2, x1:x2] = True
        assert ((window[..., 0] == 1.0) & ~covered).sum() <= 0.5 * (boxes[:, 2:] - boxes[:, :2]).prod(1).sum()


def test_small_run_trains_both_sides_from_equal_weights_and_writes_curves(bench, tmp_path):
    pytest.importorskip("torchvision", reason=TV_REASON)
    out = tmp_path / "parity"
    assert bench.main(["--small", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    runs = result["runs"]
    assert [(r["side"], r["seed"]) for r in runs] == [
        ("torchvision", 0),
        ("lucid_jax", 0),
        ("torchvision", 1),
        ("lucid_jax", 1),
    ]
    losses = [np.array(r["losses"]) for r in runs]
    for tv, ours in (losses[:2], losses[2:]):
        assert tv.shape == ours.shape == (6, 4) and np.isfinite(tv).all() and np.isfinite(ours).all()
        # the same weights on the same batch: only the samplers' draws differ at the first step
        np.testing.assert_allclose(ours[0], tv[0], rtol=0.01, atol=1e-3)
    assert not np.allclose(losses[0][0], losses[2][0], rtol=0.01)  # each seed its own weights and windows
    for run in runs:
        assert (out / f"{run['side']}_seed{run['seed']}.safetensors").stat().st_size > 100_000
        for name in ("in_distribution", "cross_site"):
            assert set(run["held_out"][name]) == {"AP", "AP50", "detections"}
            if run["side"] == "torchvision":  # its weights through our predict: the same detections, near-ties aside
                ours = run["held_out_by_our_predict"][name]["detections"]
                assert abs(ours - run["held_out"][name]["detections"]) <= max(2, 0.02 * ours)
    truth = json.loads((out / "cross_site_ground_truth.json").read_text())
    assert {(im["height"], im["width"]) for im in truth["images"]} == {(112, 112)}
    with Image.open(out / "loss_curves.png") as png:
        assert png.format == "PNG" and png.size[0] > 1000
    assert set(result["summary"]["in_distribution"]) == {"torchvision", "lucid_jax"}


def test_diagnostic_models_train_our_side_alone_from_our_initialisation(bench, tmp_path):
    with pytest.raises(SystemExit):  # no torchvision twin for the mini model
        bench.parse_args(["--small", "--ours-model", "mini"])
    twin = bench.ours_model("twin-mini-counts", 2, "batch")
    assert (twin.rpn.post_nms_top_n, twin.roi_heads.batch_size_per_image) == ((300, 100), 128)
    assert bench.ours_model("mini-no-dropout", 2, "batch").roi_heads.dropout_rate == 0.0
    mini = bench.ours_model("mini", 2, "batch")
    a, b = (bench.own_init(mini, 128, seed) for seed in (0, 0))
    assert all(np.array_equal(x, y) for x, y in zip(*(jax_leaves(v) for v in (a, b))))
    out = tmp_path / "mini"
    assert bench.main(["--small", "--sides", "ours", "--ours-model", "mini", "--out", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["side"], r["seed"]) for r in runs] == [("lucid_jax", 0), ("lucid_jax", 1)]
    assert all(np.isfinite(np.array(r["losses"])).all() and len(r["losses"]) == 6 for r in runs)
    assert runs[0]["losses"][0] != runs[1]["losses"][0]  # each seed its own start and windows


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)
