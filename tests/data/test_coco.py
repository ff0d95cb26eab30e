"""COCO reader on a tiny annotation file: xywh -> xyxy, contiguous labels, crowds kept
for evaluation only, boxes without area counted, empty images, sizes, file names that
leave the image folder, errors."""

import json

import numpy as np
import pytest
from PIL import Image

from lucid_jax.data import COCODataset, Dataset, DatasetError


@pytest.fixture
def coco(tmp_path):
    """Three images (ids 9, 2, 5; 5 has no annotations) and categories 3 cat, 7 dog, 1 zebra."""
    images = tmp_path / "images"
    images.mkdir()
    for name, (h, w) in {"a.png": (20, 30), "b.png": (16, 16), "c.png": (8, 12)}.items():
        Image.fromarray(np.full((h, w, 3), 40, np.uint8)).save(images / name)
    data = {
        "images": [
            {"id": 9, "file_name": "a.png", "height": 20, "width": 30},
            {"id": 2, "file_name": "b.png", "height": 16, "width": 16},
            {"id": 5, "file_name": "c.png", "height": 8, "width": 12},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 1, "name": "zebra"}],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 3, "bbox": [1.5, 2, 3, 4.25], "iscrowd": 0, "area": 12.75},
            {"id": 2, "image_id": 9, "category_id": 7, "bbox": [0, 0, 30, 20], "iscrowd": 1, "area": 600},
            {"id": 3, "image_id": 9, "category_id": 7, "bbox": [10, 10, 5, 5], "iscrowd": 0, "area": 25},
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 16, 16], "iscrowd": 0, "area": 256},
            {"id": 5, "image_id": 2, "category_id": 3, "bbox": [4, 4, 0, 3], "iscrowd": 0, "area": 0},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, images


def test_converts_boxes_labels_and_keeps_empty_images(coco):
    ds = COCODataset(*coco)
    assert isinstance(ds, Dataset) and len(ds) == 3 and ds.image_ids == [2, 5, 9]
    assert ds.class_names == ("zebra", "cat", "dog")  # category ids 1, 3, 7
    assert ds.cat_id_to_label == {1: 1, 3: 2, 7: 3} and ds.label_to_cat_id == {1: 1, 2: 3, 3: 7}
    a = ds[2]
    assert a["id"] == 9 and a["image"].shape == (20, 30, 3)
    # The crowd dog is left out; xywh [1.5, 2, 3, 4.25] becomes xyxy [1.5, 2, 4.5, 6.25].
    np.testing.assert_array_equal(a["boxes"], [[1.5, 2, 4.5, 6.25], [10, 10, 15, 15]])
    np.testing.assert_array_equal(a["labels"], [2, 3])
    b = ds[0]  # the zero-width cat is dropped
    np.testing.assert_array_equal(b["boxes"], [[0, 0, 16, 16]])
    np.testing.assert_array_equal(b["labels"], [1])
    empty = ds[1]
    assert empty["id"] == 5 and empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["boxes"].dtype == np.float32 and empty["labels"].dtype == np.int32


def test_results_map_back_to_category_ids_and_xywh(coco):
    ds = COCODataset(*coco)
    out = ds.to_coco_results(9, [[1.0, 2.0, 4.0, 6.5], [0, 0, 1, 1]], [0.9, 0.1], [3, 0])
    assert out == [{"image_id": 9, "category_id": 7, "bbox": [1.0, 2.0, 3.0, 4.5], "score": pytest.approx(0.9)}]


def _write(tmp_path, data):
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_errors_name_the_file_and_the_problem(coco, tmp_path):
    _, images = coco
    with pytest.raises(DatasetError, match=r"missing\.json: annotation file not found"):
        COCODataset(tmp_path / "missing.json", images)
    with pytest.raises(DatasetError, match=r"image folder not found"):
        COCODataset(coco[0], tmp_path / "noimages")
    with pytest.raises(DatasetError, match=r"bad\.json: malformed JSON") as err:
        COCODataset(_write(tmp_path, '{"images": [1, 2'), images)
    assert "\n" not in str(err.value)
    with pytest.raises(DatasetError, match="has no 'categories'"):
        COCODataset(_write(tmp_path, {"images": []}), images)
    base = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 4, "name": "x"}]}
    with pytest.raises(DatasetError, match=r"annotations\[0\] refers to unknown category id 5"):
        COCODataset(
            _write(tmp_path, {**base, "annotations": [{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}]}), images
        )
    with pytest.raises(DatasetError, match=r"annotations\[0\] refers to unknown image id 3"):
        COCODataset(
            _write(tmp_path, {**base, "annotations": [{"image_id": 3, "category_id": 4, "bbox": [0, 0, 1, 1]}]}), images
        )
    with pytest.raises(DatasetError, match=r"bbox must be \[x, y, width, height\]"):
        COCODataset(
            _write(tmp_path, {**base, "annotations": [{"image_id": 1, "category_id": 4, "bbox": [0, 1]}]}), images
        )
    with pytest.raises(DatasetError, match=r"bbox has a non-finite value"):
        COCODataset(
            _write(
                tmp_path,
                '{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 4, "name": "x"}],'
                ' "annotations": [{"image_id": 1, "category_id": 4, "bbox": [0, 1, NaN, 2]}]}',
            ),
            images,
        )
    with pytest.raises(DatasetError, match=r"does not fit in float32"):
        COCODataset(
            _write(tmp_path, {**base, "annotations": [{"image_id": 1, "category_id": 4, "bbox": [0, 1, 1e39, 2]}]}),
            images,
        )
    with pytest.raises(DatasetError, match=r"images\[0\] id must be an integer, got '1'"):
        COCODataset(_write(tmp_path, {**base, "images": [{"id": "1", "file_name": "a.png"}]}), images)
    with pytest.raises(DatasetError, match=r"images\[1\] repeats image id 1"):
        COCODataset(_write(tmp_path, {**base, "images": base["images"] * 2}), images)
    with pytest.raises(DatasetError, match=r"images\[0\] height must be a positive integer"):
        COCODataset(
            _write(tmp_path, {**base, "images": [{"id": 1, "file_name": "a.png", "height": 0, "width": 3}]}), images
        )
    with pytest.raises(DatasetError, match=r"annotations must be a list"):
        COCODataset(_write(tmp_path, {**base, "annotations": {"0": 1}}), images)
    with pytest.raises(DatasetError, match=r"malformed JSON \(RecursionError"):
        COCODataset(_write(tmp_path, "[" * 100_000 + "]" * 100_000), images)


def test_a_missing_listed_image_is_refused_when_the_file_is_loaded(coco, tmp_path):
    path, images = coco
    ds = COCODataset(path, images)
    (images / "c.png").unlink()
    with pytest.raises(DatasetError, match=r"c\.png: image file not found"):
        ds[1]  # gone after loading: refused on access
    with pytest.raises(DatasetError) as err:
        COCODataset(path, images)  # checked before any work, without opening an image
    assert str(err.value) == f"{images / 'c.png'}: image file not found, listed in {path}"
    (images / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"c\.png: .* \(2 of the 3 listed images are missing\)$"):
        COCODataset(path, images)


def test_boxes_past_the_image_are_clipped_to_its_size_when_the_file_is_loaded(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
        "categories": [{"id": 4, "name": "x"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [-5, 2, 20, 30], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 4, "bbox": [3, 4, 5, 6], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 4, "bbox": [31, 0, 5, 5], "iscrowd": 0},
        ],
    }
    ds = COCODataset(_write(tmp_path, data), tmp_path / "images")
    assert (ds.clipped_boxes, ds.dropped_invalid_boxes) == (2, 1)
    np.testing.assert_array_equal(ds.annotation(0)["boxes"], [[0, 2, 15, 20], [3, 4, 8, 10]])
    np.testing.assert_array_equal(ds[0]["boxes"], ds.annotation(0)["boxes"])


def test_annotation_keeps_crowds_as_ignored_and_counts_dropped_boxes(coco):
    ds = COCODataset(*coco)
    assert ds.annotation_file == coco[0] and ds.image_id_to_index == {2: 0, 5: 1, 9: 2}
    assert ds.dropped_invalid_boxes == 1  # the zero-width cat
    ann = ds.annotation(2)
    assert ann["id"] == 9 and (ann["height"], ann["width"]) == (20, 30)
    np.testing.assert_array_equal(ann["boxes"], [[1.5, 2, 4.5, 6.25], [0, 0, 30, 20], [10, 10, 15, 15]])
    np.testing.assert_array_equal(ann["labels"], [2, 3, 3])
    np.testing.assert_array_equal(ann["ignore"], [False, True, False])
    empty = ds.annotation(1)
    assert (
        empty["boxes"].shape == (0, 4)
        and empty["ignore"].shape == (0,)
        and (empty["height"], empty["width"]) == (8, 12)
    )
    np.testing.assert_array_equal(ds.train_object_counts(), [1, 0, 2])  # crowds are not trained on


def test_sizes_come_from_the_file_else_from_the_rotated_header(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 10 x 30, shown upright 30 x 10
    Image.fromarray(np.zeros((10, 30, 3), np.uint8)).save(images / "r.jpg", exif=exif.tobytes())
    data = {
        "images": [{"id": 1, "file_name": "r.jpg"}, {"id": 2, "file_name": "r.jpg", "height": 30, "width": 10}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 20, 5, 8]}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    ds = COCODataset(path, images)
    for i in range(2):
        ann = ds.annotation(i)
        assert (ann["height"], ann["width"]) == (30, 10) == ds[i]["image"].shape[:2]
    np.testing.assert_array_equal(ds[0]["boxes"], [[1, 20, 6, 28]])  # inside the upright 30 x 10 image


@pytest.mark.parametrize("file_name", ["../a.png", "sub/../../a.png", "/etc/passwd", ""])
def test_file_names_that_leave_the_image_folder_are_refused(coco, tmp_path, file_name):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")  # next to images/, reachable by ".."
    data = {"images": [{"id": 1, "file_name": file_name}], "categories": [{"id": 1, "name": "x"}]}
    with pytest.raises(DatasetError, match=r"images\[0\] file_name") as err:
        COCODataset(_write(tmp_path, data), coco[1])
    assert "\n" not in str(err.value)


def test_file_names_in_subfolders_are_fine(coco, tmp_path):
    (coco[1] / "sub").mkdir()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(coco[1] / "sub" / "x.png")
    data = {"images": [{"id": 1, "file_name": "sub/./x.png"}], "categories": [{"id": 1, "name": "x"}]}
    assert COCODataset(_write(tmp_path, data), coco[1])[0]["image"].shape == (4, 6, 3)
