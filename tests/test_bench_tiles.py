"""benchmarks/bench_tiles.py: whole-image against tiled prediction, each mode in its own
measured process, on photographs of your own, with the tests' trained run (the mechanics,
no figures)."""

import json

import numpy as np
import pytest
from PIL import Image

from lucid_jax.data import ShapesDataset
from lucid_jax.data.shapes import CLASS_NAMES
from tests.bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_tiles")


def test_whole_and_tiled_are_scored_timed_and_measured(bench, trained, tmp_path):
    augment = load_benchmark("bench_augment")
    source = tmp_path / "photos"
    source.mkdir()
    for i, name in enumerate(("one", "two")):
        ex = ShapesDataset(num_examples=1, seed=40 + i, image_size=(256, 320), max_objects=12)[0]
        Image.fromarray(ex["image"]).save(source / f"{name}.png")
        names = [CLASS_NAMES[label - 1] for label in ex["labels"]]  # the classes the trained run knows
        augment.write_xml(source / f"{name}.xml", f"{name}.png", 256, 320, ex["boxes"], names)
    argv = [
        "--images",
        str(source),
        "--held-out",
        "two",
        "--work",
        str(tmp_path / "work"),
        "--checkpoint",
        str(trained),
    ]
    report = bench.main([*argv, "--tile", "128", "--overlap", "0.25", "--repeats", "1"])
    assert [row["mode"] for row in report["eval"]] == ["whole image", "whole image, --max-detections 1000", "tiled"]
    for row in report["eval"]:
        assert 0.0 <= row["AP50"] <= 1.0 and isinstance(row["detections"], int)
        assert len(row["seconds"]) == 1 and row["seconds"][0] > 0 and row["peak_mib"][0] > 100  # jax alone holds more
    assert tuple(report["counts"]["cross_site"]) == (1, len(ex["boxes"]))
    assert json.loads((tmp_path / "work" / "tiles.json").read_text())["eval"] == report["eval"]


def test_the_big_photograph_mirrors_its_source_to_size(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "BIG", (50, 70))
    image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    bench.big_photograph(image, tmp_path / "big.png")  # PNG here: lossless, so pixels compare
    big = np.asarray(Image.open(tmp_path / "big.png"))
    assert big.shape == (50, 70, 3)
    np.testing.assert_array_equal(big[:20, :30], image)
    np.testing.assert_array_equal(big[20:40, :30], image[::-1])  # mirrored, so the seam matches
    np.testing.assert_array_equal(big[:20, 30:60], image[:, ::-1])
