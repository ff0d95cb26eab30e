"""benchmarks/accelerator.py runs end to end on CPU at its small size, and its figures add up."""

import json
import math

import pytest

from tests.bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def accelerator():
    return load_benchmark("accelerator")


def test_device_peaks_are_matched_by_the_longest_key(accelerator):
    assert accelerator.peak_tflops("NVIDIA H200") == 989.0
    assert accelerator.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert accelerator.peak_tflops("TPU v5 lite") == 197.0  # not v5p's 459
    assert accelerator.peak_tflops("TPU v5p") == 459.0
    assert accelerator.peak_tflops("TPU v4") == 275.0
    assert accelerator.peak_tflops("cpu") is None


def test_small_run_reports_every_configuration(accelerator, tmp_path):
    out = tmp_path / "accelerator.json"
    code = accelerator.main(["--small", "--seconds", "0", "--min-steps", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["device"]["backend"] == "cpu" and report["peak_bf16_tflops"] is None
    results = report["results"]
    assert sorted(results) == ["infer-bf16", "infer-f32", "train-bf16"]
    for name, r in results.items():
        assert "error" not in r, (name, r)
        assert r["steps"] >= 1 and r["seconds"] > 0 and r["compile_s"] > 0
        assert r["flops"] > 1e8, (name, r["flops"])  # XLA's count for a real detector, not an empty program
        assert math.isclose(r["images_per_s"], r["images"] / r["seconds"])
        assert math.isclose(r["tflops"], r["flops"] / r["seconds"] / 1e12)
        assert 0 < r["mfu"] < 1.5 and r["mfu_against"].startswith("measured")
    assert results["infer-f32"]["shape"] == [2, 128, 192] and results["train-bf16"]["shape"] == [2, 128, 128]
    # The spread heads keep detections on both dtypes, so NMS does real work.
    assert results["infer-f32"]["detections_per_image"] > 10
    assert results["infer-bf16"]["detections_per_image"] > 10
    # Training moves forward with a finite loss; backward is about twice the forward's FLOPs.
    assert math.isfinite(results["train-bf16"]["loss"])
    per_image_train = results["train-bf16"]["flops"] / 2
    per_image_infer = results["infer-f32"]["flops"] / 2 * (128 * 128) / (128 * 192)
    assert per_image_train > 2 * per_image_infer


def test_unknown_configuration_is_refused(accelerator):
    with pytest.raises(SystemExit, match="unknown configuration"):
        accelerator.main(["--small", "--only", "infer-f64"])
