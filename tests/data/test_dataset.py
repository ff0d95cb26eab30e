"""Image decoding (modes, 16-bit range, EXIF orientation, broken files), header-only
sizes, per-image object counts and the max-boxes summary."""

import numpy as np
import pytest
from PIL import Image

from lucid_jax.data import (
    DatasetError,
    ShapesDataset,
    dropped_boxes_summary,
    get_annotation,
    image_size,
    load_image,
    object_counts,
)

ORIENTATION = 0x0112


def _rotate_like_exif_6(stored: np.ndarray) -> np.ndarray:
    """Orientation 6 ("rotate 90 CW to view") by a float64 loop: stored (r, c) -> shown (c, H - 1 - r)."""
    h, w = stored.shape[:2]
    shown = np.zeros((w, h) + stored.shape[2:], np.float64)
    for r in range(h):
        for c in range(w):
            shown[c, h - 1 - r] = stored[r, c]
    return shown


def _exif_jpeg(path, stored: np.ndarray, orientation: int):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())


def test_greyscale_palette_and_rgba_become_rgb(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(load_image(tmp_path / "l.png"), np.repeat(grey[..., None], 3, -1))

    rgba = np.random.default_rng(0).integers(0, 256, (6, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgba[..., :3])

    palette = Image.new("P", (5, 4))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.putdata([0, 1, 2, 1, 0] * 4)
    palette.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :3], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])


def test_sixteen_bit_png_keeps_its_gradient(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 32).round().astype(np.uint16).reshape(32, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")  # stored as 16-bit
    out = load_image(tmp_path / "ramp16.png")
    expected = np.floor(ramp.astype(np.float64) * 255.0 / 65535.0 + 0.5)  # round half up (no value lands on .5)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert len(np.unique(out)) == 256 and out.min() == 0 and out.max() == 255
    # Pillow's own conversion clips at 255: most of the ramp would be white.
    clipped = np.asarray(Image.open(tmp_path / "ramp16.png").convert("RGB"))
    assert (clipped == 255).mean() > 0.9 and (out == 255).mean() < 0.01


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :8] = (200, 30, 30)
    rgb[:, 8:16] = (30, 200, 30)
    rgb[:, 16:] = (30, 30, 200)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=98)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = load_image(tmp_path / "cmyk.jpg")
    assert out.shape == (16, 24, 3)
    for cols, colour in ((slice(2, 6), rgb[0, 0]), (slice(10, 14), rgb[0, 8]), (slice(18, 22), rgb[0, 16])):
        np.testing.assert_allclose(out[4:12, cols].reshape(-1, 3).mean(0), colour, atol=12)


def test_exif_orientation_turns_the_image_upright(tmp_path):
    stored = np.full((20, 40, 3), 30, np.uint8)
    stored[2:7, 30:38] = 240  # a bright block near the stored top-right corner
    _exif_jpeg(tmp_path / "rot.jpg", stored, 6)
    assert Image.open(tmp_path / "rot.jpg").size == (40, 20)  # stored width, height
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (40, 20, 3)
    assert image_size(tmp_path / "rot.jpg") == (40, 20)
    expected = _rotate_like_exif_6(stored.astype(np.float64))
    np.testing.assert_allclose(out.astype(np.float64), expected, atol=40)
    bright = out.min(-1) > 128
    rows, cols = np.flatnonzero(bright.any(1)), np.flatnonzero(bright.any(0))
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (30, 37, 13, 17)
    _exif_jpeg(tmp_path / "upright.jpg", stored, 1)
    assert load_image(tmp_path / "upright.jpg").shape == (20, 40, 3) and image_size(tmp_path / "upright.jpg") == (
        20,
        40,
    )


def test_image_size_reads_the_header_only(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # pixel data truncated, header intact
    assert image_size(tmp_path / "cut.jpg") == (48, 64)
    with pytest.raises(DatasetError, match=r"cut\.jpg: cannot decode image") as err:
        load_image(tmp_path / "cut.jpg")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"hello, not an image\n" * 3, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00"])
def test_broken_files_raise_one_line_dataset_errors(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    for read in (load_image, image_size):
        with pytest.raises(DatasetError, match=r"broken\.png: cannot") as err:
            read(path)
        assert "\n" not in str(err.value)
    with pytest.raises(DatasetError, match="image file not found"):
        load_image(tmp_path / "missing.png")


def test_truncated_png_raises(tmp_path):
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DatasetError, match="cannot decode image"):
        load_image(tmp_path / "a.png")


def test_shapes_annotation_matches_the_example_and_counts_match_decoding():
    ds = ShapesDataset(
        num_examples=6, image_size=(64, 96), min_objects=1, max_objects=6, min_object_size=8, max_object_size=20, seed=4
    )
    for i in range(len(ds)):
        ann, ex = ds.annotation(i), ds[i]
        np.testing.assert_array_equal(ann["boxes"], ex["boxes"])
        np.testing.assert_array_equal(ann["labels"], ex["labels"])
        assert ann["ignore"].dtype == bool and not ann["ignore"].any() and len(ann["ignore"]) == len(ann["labels"])
        assert (ann["height"], ann["width"], ann["id"]) == (64, 96, i)
    counts = object_counts(ds)
    np.testing.assert_array_equal(counts, [len(ds[i]["labels"]) for i in range(len(ds))])
    assert counts.dtype == np.int64 and counts.max() > counts.min()


class _PlainDataset:
    """A user dataset with neither ``annotation`` nor ``train_object_counts``."""

    class_names = ("a",)

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        m = self.sizes[i]
        return {
            "image": np.zeros((10, 12, 3), np.uint8),
            "boxes": np.tile([[0, 0, 2, 2]], (m, 1)).astype(np.float32),
            "labels": np.ones(m, np.int32),
            "difficult": np.arange(m) == 0,
            "id": f"x{i}",
        }


def test_datasets_without_annotations_fall_back_to_decoding():
    ds = _PlainDataset([3, 0, 5])
    np.testing.assert_array_equal(object_counts(ds), [3, 0, 5])
    ann = get_annotation(ds, 2)
    assert (ann["height"], ann["width"], ann["id"]) == (10, 12, "x2")
    np.testing.assert_array_equal(ann["ignore"], [True, False, False, False, False])


def test_dropped_boxes_summary_counts_boxes_past_the_budget():
    counts = np.array([3, 70, 64, 100, 0, 65])
    summary = dropped_boxes_summary(counts, 64)
    reference = sum(max(int(c) - 64, 0) for c in counts)  # 6 + 36 + 1
    assert summary == (reference, int(counts.sum()), 3, 64) and summary.dropped == 43
    assert str(summary) == "dropped 43 of 302 boxes in 3 images (max-boxes 64)"
    big = dropped_boxes_summary([40_000, 117, 5], 16)
    assert str(big) == "dropped 40,085 of 40,122 boxes in 2 images (max-boxes 16)"
    assert dropped_boxes_summary([1, 2], 16).dropped == 0
