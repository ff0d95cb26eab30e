"""benchmarks/bench_augment.py: the tiling of annotated photographs into a VOC folder."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_augment")


def test_tiles_cover_the_image_and_move_the_boxes_with_the_pixels(bench):
    assert bench.tile_origins(1000, 400) == [0, 300, 600]
    assert bench.tile_origins(300, 400) == [0]
    image = np.zeros((500, 700, 3), np.uint8)
    boxes = np.array([[10, 20, 60, 80], [380, 100, 420, 140], [650, 450, 700, 500]], np.float32)
    for x1, y1, x2, y2 in boxes.astype(int):
        image[y1:y2, x1:x2] = 255
    tiles = list(bench.cut_tiles(image, boxes, ["a", "b", "c"], (300, 400)))
    assert len(tiles) == 2 * 2 and all(t[0].shape == (300, 400, 3) for t in tiles)
    seen = set()
    for tile, tile_boxes, names in tiles:
        for (x1, y1, x2, y2), name in zip(tile_boxes.astype(int), names):
            assert (tile[y1:y2, x1:x2] == 255).all()  # the box covers white pixels only, in the tile's frame
            seen.add(name)
    assert seen == {"a", "b", "c"}
    # box b (x 380..420) is cut by the first column's right edge at 400: half inside, kept there
    first = tiles[0]
    assert "b" in first[2] and first[1][first[2].index("b")].tolist() == [380, 100, 400, 140]


def test_voc_folder_holds_out_whole_photographs(bench, tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    for name, (h, w) in (("one", (500, 700)), ("two", (400, 400))):
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(source / f"{name}.png")
        bench.write_xml(source / f"{name}.xml", f"{name}.png", h, w, np.array([[9, 9, 49, 49]], np.float32), ["tree"])
    counts = bench.build_voc(source, tmp_path / "voc", ["two"])
    assert counts["cross_site"] == (1, 1)
    val = (tmp_path / "voc" / "ImageSets" / "Main" / "cross_site.txt").read_text().split()
    assert val == ["two"] and Image.open(tmp_path / "voc" / "JPEGImages" / "two.png").size == (400, 400)
    boxes, names = bench.read_voc_boxes(tmp_path / "voc" / "Annotations" / "two.xml")
    assert boxes.tolist() == [[9, 9, 49, 49]] and names == ["tree"]
    train = (tmp_path / "voc" / "ImageSets" / "Main" / "train.txt").read_text().split()
    assert counts["train"][0] == len(train) > 3  # every orientation of tiles from "one"


def test_variants_are_the_baseline_and_one_factor_each(bench):
    assert bench.variant_flags("baseline") == ("baseline", [])
    assert bench.variant_flags("--augment flip,color") == ("--augment flip,color", ["--augment", "flip,color"])
    assert bench.variant_flags("R50=--model faster_rcnn_resnet_50_fpn") == (
        "R50",
        ["--model", "faster_rcnn_resnet_50_fpn"],
    )
    baseline = dict(zip(bench.BASELINE[::2], bench.BASELINE[1::2]))
    for variant in bench.STUDY[1:]:
        _, flags = bench.variant_flags(variant)
        pairs = dict(zip(flags[::2], flags[1::2]))
        assert len(flags) == 2 * len(pairs) and all(f.startswith("--") for f in pairs)
        assert any(baseline.get(f) != v for f, v in pairs.items())  # the variant changes something
    assert "SGD" in [bench.variant_flags(v)[0] for v in bench.STUDY]


def test_a_study_goes_on_from_the_runs_an_earlier_invocation_scored(bench, tmp_path):
    path = tmp_path / "recipes.json"
    assert bench.earlier_runs(path, "--steps 600") == []
    scores = {"cross_site": {"AP": 0.1, "AP50": 0.2}}
    runs = [{"variant": "baseline", "seed": 0, "train_seconds": 1, "held_out": scores}]
    path.write_text(json.dumps({"counts": {}, "baseline": "--steps 600", "runs": runs}))
    assert bench.earlier_runs(path, "--steps 600") == runs
    with pytest.raises(SystemExit, match="another baseline"):
        bench.earlier_runs(path, "--steps 2000")  # mixing baselines would make the table lie
