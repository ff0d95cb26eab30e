"""Fixed-shape batches and the loader: shapes and masks, the max_boxes rule, seeded
order, prefetch = no prefetch, resume at step k = skip k, padded last batch, shards."""

import functools
import warnings

import numpy as np
import pytest

from lucid_jax.data import TRAIN_KEYS, Loader, ShapesDataset, collate, model_inputs, preprocess

ARRAY_KEYS = ("images", "boxes", "labels", "valid", "difficult", "image_sizes", "scales", "image_valid")


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(
        num_examples=10, image_size=48, min_objects=1, max_objects=5, min_object_size=8, max_object_size=20, seed=2
    )


def _flip_transform():
    return functools.partial(preprocess, canvas=64, flip_prob=0.5)


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ARRAY_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
        assert x["ids"] == y["ids"]


def _loader(ds, **kw):
    return Loader(ds, 4, **{"transform": _flip_transform(), "max_boxes": 6, "num_workers": 0, **kw})


def test_fixed_shapes_and_valid_masks_across_batches(shapes):
    loader = _loader(shapes, drop_remainder=False)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 3
    counts = set()
    for batch in batches:
        assert batch["images"].shape == (4, 64, 64, 3) and batch["images"].dtype == np.float32
        assert batch["boxes"].shape == (4, 6, 4) and batch["boxes"].dtype == np.float32
        assert batch["labels"].dtype == np.int32 and batch["valid"].dtype == bool
        assert batch["image_sizes"].shape == (4, 2) and batch["image_sizes"].dtype == np.float32
        for row, idx in enumerate(batch["ids"]):
            if idx is None:
                continue
            n = len(shapes[idx]["labels"])
            counts.add(n)
            np.testing.assert_array_equal(batch["valid"][row], np.arange(6) < n)
            np.testing.assert_array_equal(batch["labels"][row, :n], shapes[idx]["labels"])
            assert (batch["labels"][row, n:] == 0).all() and (batch["boxes"][row, n:] == 0).all()
            np.testing.assert_array_equal(batch["image_sizes"][row], [48, 48])
    assert len(counts) > 1, "the fixture should mix object counts"
    last = batches[-1]
    np.testing.assert_array_equal(last["image_valid"], [True, True, False, False])
    assert last["ids"][2:] == [None, None] and not last["valid"][2:].any()
    assert set(model_inputs(last)) == set(TRAIN_KEYS)


def test_drop_remainder_drops_the_partial_batch(shapes):
    loader = _loader(shapes)
    assert len(loader) == 2
    seen = [i for b in loader.epoch(0) for i in b["ids"]]
    assert len(seen) == 8 and None not in seen


def test_too_many_boxes_keeps_the_largest_in_order():
    w = [3, 9, 1, 7, 5]  # box widths, so areas rank 9 > 7 > 5 > 3 > 1
    boxes = np.array([[0, 0, x, 2] for x in w], np.float32)
    example = {"image": np.zeros((32, 32, 3), np.float32), "boxes": boxes, "labels": np.arange(1, 6), "id": "many"}
    with pytest.warns(RuntimeWarning, match="'many' has 5 objects; keeping the 3 largest"):
        batch = collate([example], max_boxes=3)
    np.testing.assert_array_equal(batch["labels"][0], [2, 4, 5])
    np.testing.assert_array_equal(batch["boxes"][0, :, 2], [9, 7, 5])
    assert batch["valid"].all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collate([example], max_boxes=5)


def test_collate_rejects_mixed_canvases():
    a = {"image": np.zeros((32, 32, 3), np.float32), "boxes": np.zeros((0, 4)), "labels": np.zeros(0)}
    b = {**a, "image": np.zeros((64, 32, 3), np.float32)}
    with pytest.raises(ValueError, match="same canvas"):
        collate([a, b], max_boxes=2)


def test_seeded_shuffle_is_deterministic_and_epoch_aware(shapes):
    def order(seed, epoch):
        return [
            i
            for b in _loader(shapes, shuffle=True, seed=seed, drop_remainder=False).epoch(epoch)
            for i in b["ids"]
            if i is not None
        ]

    first = order(0, 0)
    assert sorted(first) == list(range(10))
    assert order(0, 0) == first
    assert order(0, 1) != first and sorted(order(0, 1)) == list(range(10))
    assert order(1, 0) != first
    _assert_batches_equal(
        list(_loader(shapes, shuffle=True, seed=3).iterate(0, 5)),
        list(_loader(shapes, shuffle=True, seed=3).iterate(0, 5)),
    )


def test_prefetch_gives_the_same_batches_as_loading_inline(shapes):
    inline = list(_loader(shapes, shuffle=True, seed=5).iterate(0, 6))
    threaded = list(_loader(shapes, shuffle=True, seed=5, num_workers=3, prefetch=3).iterate(0, 6))
    _assert_batches_equal(inline, threaded)
    unflipped = list(
        _loader(shapes, shuffle=True, seed=5, transform=functools.partial(preprocess, canvas=64)).iterate(0, 6)
    )
    assert any(not np.array_equal(a["boxes"], b["boxes"]) for a, b in zip(inline, unflipped)), "no random flip happened"


def test_resume_at_step_k_equals_skipping_k(shapes):
    loader = _loader(shapes, shuffle=True, seed=9, num_workers=2)
    full = list(loader.iterate(0, 7))  # crosses epochs: 2 steps per epoch
    _assert_batches_equal(list(loader.iterate(start_step=3, num_steps=4)), full[3:])
    stream = iter(loader)
    _assert_batches_equal([next(stream) for _ in range(3)], full[:3])


def test_shards_split_each_epoch_disjointly(shapes):
    a = [i for b in _loader(shapes, shuffle=True, num_shards=2, shard_index=0).epoch(1) for i in b["ids"]]
    b = [i for b in _loader(shapes, shuffle=True, num_shards=2, shard_index=1).epoch(1) for i in b["ids"]]
    assert len(a) == len(b) == 4 and not set(a) & set(b)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_shard_slices_stacked_are_the_global_batch(shapes, drop_remainder):
    """Each host's slice, stacked in shard order, is one loader's batch of the global size,
    at every step and across epochs; on a padded last batch a shard may get none."""
    whole = Loader(shapes, 6, shuffle=True, seed=4, num_workers=0, drop_remainder=drop_remainder)
    shards = [
        Loader(
            shapes, 3, shuffle=True, seed=4, num_workers=0, drop_remainder=drop_remainder, num_shards=2, shard_index=k
        )
        for k in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == len(whole) == (1 if drop_remainder else 2)
    for step in range(4):  # two epochs when padded, four when dropped
        assert shards[0].batch_indices(step)[1] + shards[1].batch_indices(step)[1] == whole.batch_indices(step)[1]
    if not drop_remainder:
        # 10 examples in global batches of 6: the second holds 4, so shard 1 gets only 1
        last = [list(s.iterate(1, 1))[0] for s in shards]
        assert [b["image_valid"].sum() for b in last] == [3, 1]
        ids = [i for b in last for i in b["ids"] if i is not None]
        assert ids == whole.batch_indices(1)[1]


def test_an_empty_shard_of_a_padded_last_batch_is_all_padding(shapes):
    """10 examples, global batch 8 over 4 shards: the last step leaves shards 1 to 3 empty."""
    shards = [
        Loader(shapes, 2, max_boxes=6, num_workers=0, drop_remainder=False, num_shards=4, shard_index=k)
        for k in range(4)
    ]
    last = [list(s.iterate(1, 1))[0] for s in shards]
    assert [int(b["image_valid"].sum()) for b in last] == [2, 0, 0, 0]
    empty = last[3]
    assert empty["images"].shape == last[0]["images"].shape and not empty["images"].any()
    assert not empty["valid"].any() and empty["ids"] == [None, None]


def test_bad_loader_arguments(shapes):
    with pytest.raises(ValueError, match="no full batch"):
        Loader(shapes, 16)
    with pytest.raises(ValueError, match="shard_index"):
        Loader(shapes, 2, num_shards=2, shard_index=2)


class _MixedSizes:
    """Images of different sizes and aspect ratios, one box each covering the whole image."""

    class_names = ("thing",)
    sizes = [(30, 50), (64, 20), (100, 100), (17, 90), (45, 45)]

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        h, w = self.sizes[i]
        return {
            "image": np.full((h, w, 3), 200, np.uint8),
            "boxes": np.array([[0, 0, w, h]], np.float32),
            "labels": np.array([1], np.int32),
            "difficult": np.zeros(1, bool),
            "id": i,
        }


def test_images_of_any_size_land_on_one_canvas():
    loader = Loader(
        _MixedSizes(),
        2,
        transform=functools.partial(preprocess, longer_side=64, size_divisibility=32),
        max_boxes=2,
        drop_remainder=False,
        num_workers=2,
    )
    batches = list(loader.epoch(0))
    assert {b["images"].shape for b in batches} == {(2, 64, 64, 3)}
    for b in batches:
        for row, i in enumerate(b["ids"]):
            if i is None:
                continue
            h, w = _MixedSizes.sizes[i]
            s = 64 / max(h, w)
            np.testing.assert_allclose(b["image_sizes"][row], [round(h * s), round(w * s)])
            np.testing.assert_allclose(b["boxes"][row, 0], [0, 0, round(w * s), round(h * s)], atol=1e-4)
            np.testing.assert_allclose(b["scales"][row], [round(h * s) / h, round(w * s) / w], rtol=1e-6)
