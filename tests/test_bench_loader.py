"""benchmarks/bench_loader.py: real image files through the training loader, and the step's demand."""

import pytest

from tests.bench_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_loader")


def test_loader_rate_and_the_step_demand(bench, tmp_path):
    bench.write_photos(tmp_path, 8)
    names = sorted(p.name for p in (tmp_path / "JPEGImages").iterdir())
    assert sum(n.endswith(".jpg") for n in names) == sum(n.endswith(".png") for n in names) == 4
    argv = ["--data", f"voc:{tmp_path}", "--image-size", "128:192", "--batches", "3", "--step-seconds", "1e-3"]
    rows = bench.main([*argv, "--augments", "flip,jitter", "--workers", "2"])
    assert [r[0] for r in rows] == ["flip", "jitter"]
    for _, rate, demand, waits in rows:
        assert float(rate) > 0 and float(demand) == 2000.0  # 2 images per 1 ms step
        assert waits.endswith("%") and 0 < float(waits[:-1]) <= 100  # no loader feeds 2000 images/s
