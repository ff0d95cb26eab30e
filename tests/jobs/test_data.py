"""DataWait: the share of a training loop's wall time spent waiting for the next batch."""

import time

import pytest

from lucid_jax.jobs.data import DataWait


def _loop(load_s: float, step_s: float, steps: int = 6):
    def batches():
        for i in range(steps):
            time.sleep(load_s)
            yield i

    waiting = DataWait()
    seen = []
    for batch in waiting.wrap(batches()):
        seen.append(batch)
        time.sleep(step_s)
    return waiting, seen


def test_a_slow_loader_is_most_of_the_wall_time():
    waiting, seen = _loop(load_s=0.05, step_s=0.005)
    assert seen == list(range(6)) and waiting.steps == 5  # the first batch, before the clock starts, is not counted
    assert waiting.fraction() == pytest.approx(0.05 / 0.055, abs=0.12)


def test_a_fast_loader_is_almost_none_of_it():
    waiting, seen = _loop(load_s=0.0, step_s=0.03)
    assert seen == list(range(6)) and waiting.fraction() < 0.05
    assert str(waiting).endswith("over 5 steps")


def test_nothing_measured_before_the_first_step():
    assert DataWait().fraction() == 0.0
