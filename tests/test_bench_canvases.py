"""benchmarks/bench_canvases.py: the two arrangements it compares, without timing anything."""

import numpy as np
import pytest

from tests.bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_canvases")


def test_square_holds_every_image_and_grouped_splits_them_by_orientation(bench):
    sizes = bench.mix_sizes()
    assert len(sizes) == 100
    setups = bench.arrangements("800:1333", 32)
    square = bench.canvas_shares(setups["square"], sizes)
    grouped = bench.canvas_shares(setups["grouped"], sizes)
    assert square == {(1344, 1344): 1.0}
    assert set(grouped) == {(800, 1344), (1344, 800), (1024, 1024)}
    assert sum(grouped.values()) == pytest.approx(1.0)
    # 4:3 and 3:2 landscapes (and 16:9) go landscape; their portraits portrait; squares square.
    landscape = sum(n for (h, w), n in bench.COCO_LIKE if w > 1.25 * h) / 100
    portrait = sum(n for (h, w), n in bench.COCO_LIKE if h > 1.25 * w) / 100
    assert grouped[(800, 1344)] == pytest.approx(landscape) and grouped[(1344, 800)] == pytest.approx(portrait)
    assert grouped[(1024, 1024)] == pytest.approx(1 - landscape - portrait)
    assert np.isclose(landscape, 0.69) and np.isclose(portrait, 0.23)


def test_a_plain_size_is_refused(bench):
    with pytest.raises(SystemExit, match="SHORT:LONG"):
        bench.arrangements("512", 32)
