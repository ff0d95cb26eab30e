"""benchmarks/bench_scheduler.py: XLA:CPU's two schedulers on the step, end to end on the mini model."""

import jax
import pytest

from tests.bench_scripts import load_benchmark


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's schedulers")
def test_the_memory_minimising_scheduler_needs_fewer_temporaries_for_the_same_bits(capsys):
    bench = load_benchmark("bench_scheduler")
    argv = ["--model", "faster_rcnn_mini_fpn", "--size", "128", "--rounds", "1"]
    result = bench.main([*argv, "--recipe", "default"])  # raises if the two computed different bits
    (memory, memory_temp, *_), (default, default_temp, *_) = result["rows"]
    assert (memory, default) == ("memory-minimising", "default")
    assert float(memory_temp) < 0.9 * float(default_temp)
    assert result["ratio"] > 0
    assert "same bits from both" in capsys.readouterr().out
