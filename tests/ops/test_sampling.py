"""Tests for lucid_jax.ops.sampling: loop-counted references, uniformity, keys, tracing."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_jax.compile_count import count_compiles
from lucid_jax.ops.matching import MatchLabel
from lucid_jax.ops.sampling import sample_balanced, sample_balanced_indices

_STATIC = ("num_samples", "positive_fraction")
jsample = jax.jit(sample_balanced, static_argnames=_STATIC)
jindices = jax.jit(sample_balanced_indices, static_argnames=_STATIC)
RPN = dict(num_samples=256, positive_fraction=0.5)
ROI = dict(num_samples=64, positive_fraction=0.25)  # the RoI head's fraction, a smaller sample
N = 300  # one label length for most tests, so each setting compiles once


def ref_counts(labels, *, num_samples, positive_fraction):
    """(num_pos, num_neg) of torchvision's sampler, counting one label at a time."""
    pos = neg = 0
    for v in labels:
        pos += int(v >= MatchLabel.POSITIVE)
        neg += int(v == MatchLabel.NEGATIVE)
    num_pos = min(int(num_samples * positive_fraction), pos)
    return num_pos, min(num_samples - num_pos, neg)


def _labels(seed, pos, neg, n=N, positive_value=MatchLabel.POSITIVE):
    """[n] int32 labels with ``pos`` positives and ``neg`` negatives, the rest IGNORE, shuffled."""
    labels = np.full(n, int(MatchLabel.IGNORE), np.int32)
    labels[:pos] = positive_value
    labels[pos : pos + neg] = MatchLabel.NEGATIVE
    return np.random.default_rng(seed).permutation(labels)


CONFIGS = {  # name: (positives, negatives) out of N
    "few_pos": (3, 200),
    "many_pos": (250, 40),
    "no_neg": (100, 0),
    "all_ignore": (0, 0),
    "all_neg": (0, N),
    "few_neg": (0, 10),
    "tiny": (1, 2),
    "all_pos": (N, 0),
}


def _check_sample(labels, key, settings):
    """The mask and index samples for ``key`` agree with each other and with the reference counts."""
    positive, negative = map(np.asarray, jsample(labels, key, **settings))
    indices, valid = map(np.asarray, jindices(labels, key, **settings))
    num_pos, num_neg = ref_counts(labels, **settings)
    assert positive.sum() == num_pos and negative.sum() == num_neg
    assert num_pos <= settings["num_samples"] * settings["positive_fraction"]
    assert np.all(labels[positive] >= MatchLabel.POSITIVE) and np.all(labels[negative] == MatchLabel.NEGATIVE)
    assert indices.dtype == np.int32 and indices.shape == valid.shape == (settings["num_samples"],)
    k = num_pos + num_neg
    assert np.all(valid[:k]) and not np.any(valid[k:]) and np.all(indices[k:] == 0)
    np.testing.assert_array_equal(indices[:num_pos], np.flatnonzero(positive))  # positives first
    np.testing.assert_array_equal(indices[num_pos:k], np.flatnonzero(negative))
    return positive, negative


@pytest.mark.parametrize("settings", [RPN, ROI], ids=["rpn", "roi"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_counts_and_membership_match_reference(config, settings):
    for seed in range(3):
        _check_sample(_labels(seed, *CONFIGS[config]), jax.random.key(seed), settings)


def test_labels_above_one_count_as_positive_like_torchvision():
    labels = _labels(0, 20, 100, positive_value=7)  # class labels, as the RoI head may pass
    positive, _ = _check_sample(labels, jax.random.key(0), ROI)
    assert positive.sum() == 16


def test_short_label_vector_pads_the_indices():
    labels = _labels(1, 3, 4, n=10)
    for settings in (RPN, ROI, dict(num_samples=5, positive_fraction=1.0), dict(num_samples=0, positive_fraction=0.5)):
        _check_sample(labels, jax.random.key(2), settings)


def test_selection_is_uniform_over_keys():
    # 8 positives, 10 negatives, 2 ignored; 2 positives and 6 negatives drawn per key.
    labels = _labels(5, 8, 10, n=20)
    keys = jax.random.split(jax.random.key(1234), 4000)
    draw = jax.jit(jax.vmap(lambda k: sample_balanced(labels, k, num_samples=8, positive_fraction=0.25)))
    positive, negative = map(np.asarray, draw(keys))  # [4000, 20]
    assert np.all(positive.sum(1) == 2) and np.all(negative.sum(1) == 6)
    pos_ids, neg_ids = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    # Standard errors are about 0.007 and 0.008: these bounds are over 5 of them wide.
    np.testing.assert_allclose(positive[:, pos_ids].mean(0), 2 / 8, atol=0.04)
    np.testing.assert_allclose(negative[:, neg_ids].mean(0), 6 / 10, atol=0.04)
    assert not np.any(positive[:, labels != 1]) and not np.any(negative[:, labels != 0])
    # Without replacement and jointly uniform: each of the 28 pairs about 4000 / 28 times.
    pairs = {p: 0 for p in itertools.combinations(pos_ids.tolist(), 2)}
    for row in positive:
        pairs[tuple(np.flatnonzero(row).tolist())] += 1
    assert min(pairs.values()) > 0.7 * 4000 / 28 and max(pairs.values()) < 1.3 * 4000 / 28


def test_keys_decide_the_sample():
    labels = _labels(3, 150, 150)
    samples = [np.concatenate(jsample(labels, jax.random.key(s), **ROI)) for s in range(10)]
    for a, b in itertools.combinations(samples, 2):
        assert not np.array_equal(a, b)
    again = np.concatenate(jsample(labels, jax.random.key(4), **ROI))
    np.testing.assert_array_equal(again, samples[4])
    raw = jsample(labels, jax.random.PRNGKey(4), **ROI)  # legacy uint32 keys work too
    _check_sample(labels, jax.random.PRNGKey(4), ROI)
    assert int(raw[0].sum()) == 16


def test_vmap_over_images_and_keys_equals_per_image_calls():
    labels = np.stack([_labels(i, *c) for i, c in enumerate([(3, 200), (250, 40), (0, 10)])])  # [3, N]
    keys = jax.random.split(jax.random.key(9), 3)
    masks = jax.jit(jax.vmap(lambda lab, k: sample_balanced(lab, k, **RPN)))(labels, keys)
    index = jax.jit(jax.vmap(lambda lab, k: sample_balanced_indices(lab, k, **RPN)))(labels, keys)
    for i in range(3):
        for got, want in zip(masks + index, jsample(labels[i], keys[i], **RPN) + jindices(labels[i], keys[i], **RPN)):
            np.testing.assert_array_equal(got[i], want)
        _check_sample(labels[i], keys[i], RPN)


def test_jit_compiles_once_for_new_data():
    traces = []

    @jax.jit
    def run(labels, key):
        traces.append(1)  # runs only while tracing
        return sample_balanced(labels, key, **ROI), sample_balanced_indices(labels, key, **ROI)

    with count_compiles(run) as compiles:
        for seed in range(4):
            labels, key = _labels(seed, 10 * seed, 100), jax.random.key(seed)
            (positive, negative), (indices, valid) = run(labels, key)
            assert int(positive.sum()) == ref_counts(labels, **ROI)[0]
            np.testing.assert_array_equal(np.sort(indices[valid]), np.flatnonzero(positive | negative))
        assert len(traces) == 1 and compiles.count == 1
        run(_labels(0, 5, 5, n=N + 1), jax.random.key(0))  # a new shape: the counter is live
    assert len(traces) == 2 and compiles.count == 2


@pytest.mark.parametrize("fn", [sample_balanced, sample_balanced_indices])
def test_export_for_cpu_cuda_tpu(fn):
    key = jax.random.key(0)
    spec = (jax.ShapeDtypeStruct((N,), jnp.int32), jax.ShapeDtypeStruct(key.shape, key.dtype))
    jitted = jax.jit(lambda labels, k: fn(labels, k, **ROI))
    exported = jax.export.export(jitted, platforms=("cpu", "cuda", "tpu"))(*spec)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    labels = _labels(0, 30, 200)
    for got, want in zip(exported.call(labels, key), jitted(labels, key)):
        np.testing.assert_array_equal(got, want)


_L, _K = np.zeros(5, np.int32), jax.random.key(0)


@pytest.mark.parametrize("fn", [sample_balanced, sample_balanced_indices])
@pytest.mark.parametrize(
    "labels, kwargs, error, match",
    [
        (np.zeros((2, 5), np.int32), ROI, ValueError, r"labels must have shape \[N\], got \(2, 5\)"),
        (np.zeros(5, np.float32), ROI, TypeError, "labels must be an integer array"),
        (_L, dict(ROI, num_samples=-1), ValueError, "num_samples must be >= 0, got -1"),
        (_L, dict(ROI, num_samples=6.0), TypeError, "num_samples must be a Python int"),
        (_L, dict(ROI, positive_fraction=1.5), ValueError, r"positive_fraction must be a Python float in \[0, 1\]"),
    ],
)
def test_bad_input_fails_at_trace_time(fn, labels, kwargs, error, match):
    with pytest.raises(error, match=f"{fn.__name__}: {match}"):
        jax.jit(lambda: fn(labels, _K, **kwargs)).trace()
