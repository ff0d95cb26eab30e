"""The loader on aspect-ratio canvases: every batch holds one canvas, the canvas of an image
is a function of its size read without decoding, and the loader stays a pure function of
(seed, step): resume at any step, prefetch, host shards, padded last batches."""

import functools

import numpy as np
import pytest

from lucid_jax.data import Loader, ShapesDataset, image_shapes, parse_image_size, preprocess, preprocess_on_canvas
from lucid_jax.data.canvases import Canvases
from lucid_jax.data.jitter import jitter_preprocess

ARRAY_KEYS = ("images", "boxes", "labels", "valid", "difficult", "image_sizes", "scales", "image_valid")
# SHORT:LONG = 32:64 with a stride of 32: landscape 32x64, portrait 64x32, square 64x64 (min(64, 40) rounded up)
CANVASES = Canvases(32, 64, multiple=32)


class _Orientations:
    """Landscape, portrait and square shapes images in a fixed, uneven mix; counts decodes."""

    class_names = ShapesDataset.class_names
    kinds = {"landscape": (40, 72), "portrait": (72, 40), "square": (50, 54)}
    pattern = ["landscape", "portrait", "landscape", "square", "portrait", "landscape", "landscape"]

    def __init__(self, n: int = 23):
        self.n = n
        self.decoded = 0
        self._sets = {
            kind: ShapesDataset(num_examples=n, image_size=size, min_object_size=8, max_object_size=20, seed=k)
            for k, (kind, size) in enumerate(self.kinds.items())
        }

    def kind(self, index: int) -> str:
        return self.pattern[index % len(self.pattern)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        self.decoded += 1
        return {**self._sets[self.kind(index)][index], "id": index}

    def image_shape(self, index: int) -> tuple[int, int]:
        return self.kinds[self.kind(index)]


@pytest.fixture(scope="module")
def mixed():
    return _Orientations()


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in ARRAY_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
        assert x["ids"] == y["ids"]


def _flip(example, rng, *, canvas):
    return preprocess_on_canvas(example, rng, canvases=CANVASES, canvas=canvas, flip_prob=0.5, size_divisibility=32)


def _loader(ds, batch_size=2, **kw):
    options = {"transform": _flip, "max_boxes": 8, "num_workers": 0, "canvases": CANVASES, **kw}
    return Loader(ds, batch_size, **options)


def _canvas_of(ds, index):
    return CANVASES.shapes[CANVASES.canvas_index(*ds.image_shape(index))]


def test_canvas_of_an_image_is_a_function_of_its_size_read_without_decoding(mixed, voc_mixed):
    from lucid_jax.data import VOCDataset

    before = mixed.decoded
    loader = _loader(mixed)
    assert mixed.decoded == before  # the sizes come from image_shape, not the pixels
    expected = [CANVASES.canvas_index(*mixed.image_shape(i)) for i in range(len(mixed))]
    assert loader.canvas_ids.tolist() == expected and set(expected) == {0, 1, 2}
    # VOC reads the header (EXIF-rotated), the same size as the decoded image, and caches it
    dataset = VOCDataset(voc_mixed[0], split="val")
    shapes = image_shapes(dataset)
    for i in range(4):
        assert tuple(shapes[i]) == dataset[i]["image"].shape[:2] == dataset.image_shape(i)
    assert {CANVASES.canvas_index(h, w) for h, w in shapes} == {0, 1, 2}  # 96x160, 160x96, 160x160


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_every_batch_holds_one_canvas_and_epochs_have_a_constant_length(mixed, drop_remainder):
    loader = _loader(mixed, batch_size=3, shuffle=True, seed=1, drop_remainder=drop_remainder)
    counts = np.bincount(loader.canvas_ids, minlength=3)
    rounding = np.floor if drop_remainder else np.ceil
    assert len(loader) == int(rounding(counts / 3).sum())
    orders = []
    for epoch in range(3):
        batches = list(loader.epoch(epoch))
        assert len(batches) == len(loader)
        ids = []
        for step, batch in enumerate(batches, start=epoch * len(loader)):
            real = [i for i in batch["ids"] if i is not None]
            canvas = loader.batch_canvas(step)
            assert {_canvas_of(mixed, i) for i in real} == {canvas}
            assert batch["images"].shape == (3, *canvas, 3)
            if not drop_remainder:  # padding rows: on the batch's canvas, flagged invalid
                np.testing.assert_array_equal(batch["image_valid"], [i is not None for i in batch["ids"]])
                assert (batch["image_sizes"][~batch["image_valid"]] == canvas).all()
            ids += real
        assert len(ids) == len(set(ids))
        if not drop_remainder:
            assert sorted(ids) == list(range(len(mixed)))
        orders.append(ids)
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_resume_at_any_step_is_bit_identical_and_prefetch_changes_nothing(mixed):
    jitter = functools.partial(jitter_preprocess)
    loader = _loader(mixed, transform=jitter, shuffle=True, seed=7)
    steps = 2 * len(loader) + 2  # across two epoch boundaries
    full = list(loader.iterate(0, steps))
    for k in range(steps):
        _assert_batches_equal(
            list(_loader(mixed, transform=jitter, shuffle=True, seed=7).iterate(k, 1)), full[k : k + 1]
        )
    threaded = _loader(mixed, transform=jitter, shuffle=True, seed=7, num_workers=2, prefetch=3)
    _assert_batches_equal(list(threaded.iterate(0, steps)), full)
    _assert_batches_equal(list(threaded.iterate(5, 4)), full[5:9])
    assert any(batch["images"].shape[1:3] != full[0]["images"].shape[1:3] for batch in full)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_host_shards_are_disjoint_complete_slices_of_the_global_batch(mixed, drop_remainder):
    whole = _loader(mixed, batch_size=4, shuffle=True, seed=3, drop_remainder=drop_remainder)
    shards = [
        _loader(mixed, shuffle=True, seed=3, drop_remainder=drop_remainder, num_shards=2, shard_index=k)
        for k in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for step in range(2 * len(whole)):
        parts = [s.batch_indices(step)[1] for s in shards]
        assert parts[0] + parts[1] == whole.batch_indices(step)[1]
        assert not set(parts[0]) & set(parts[1])
        assert shards[0].batch_canvas(step) == shards[1].batch_canvas(step) == whole.batch_canvas(step)
    if not drop_remainder:
        # a canvas's last global batch of 1 or 2 leaves shard 1 empty: padding on that canvas
        step = next(s for s in range(len(whole)) if len(whole.batch_indices(s)[1]) <= 2)
        empty = list(shards[1].iterate(step, 1))[0]
        assert not empty["image_valid"].any() and empty["ids"] == [None, None]
        assert empty["images"].shape == (2, *whole.batch_canvas(step), 3) and not empty["images"].any()


def test_evaluation_order_is_grouped_in_order_of_first_image(mixed):
    loader = _loader(mixed, batch_size=3, drop_remainder=False)
    firsts = [loader.batch_indices(s)[1][0] for s in range(len(loader))]
    assert firsts == sorted(firsts)


def test_a_square_only_size_is_the_ungrouped_loader():
    shapes = ShapesDataset(num_examples=10, image_size=48, min_object_size=8, max_object_size=20, seed=2)
    transform = functools.partial(preprocess, canvas=64, longer_side=64, flip_prob=0.5, size_divisibility=32)
    plain = Loader(shapes, 4, transform=transform, shuffle=True, seed=5, num_workers=0)
    square = Loader(
        shapes, 4, transform=transform, shuffle=True, seed=5, num_workers=0, canvases=parse_image_size("64")
    )
    assert square.canvases is None and len(square) == len(plain)
    _assert_batches_equal(list(square.iterate(0, 6)), list(plain.iterate(0, 6)))
