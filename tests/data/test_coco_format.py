"""Datasets and detections in COCO's json formats: the file's own ids for COCO, synthetic
ids for VOC and shapes, difficult objects as crowds, detections cleaned per image."""

import json

import numpy as np
import pytest
from PIL import Image

from lucid_jax.data import COCODataset, ShapesDataset, VOCDataset, coco_ground_truth
from lucid_jax.data.coco_format import detection_list
from lucid_jax.inference import coco_results


@pytest.fixture
def coco(tmp_path):
    (tmp_path / "images").mkdir()
    data = {
        "info": {"description": "kept as it is"},
        "images": [
            {"id": 40, "file_name": "x.jpg", "height": 10, "width": 20},
            {"id": 3, "file_name": "y.jpg", "height": 30, "width": 15},
        ],
        "categories": [{"id": 9, "name": "dog"}, {"id": 2, "name": "cat"}],
        "annotations": [{"id": 77, "image_id": 40, "category_id": 9, "bbox": [1, 1, 4, 4], "area": 9.5, "iscrowd": 0}],
    }
    for image in data["images"]:  # the dataset checks that every listed image exists
        Image.fromarray(np.zeros((image["height"], image["width"], 3), np.uint8)).save(
            tmp_path / "images" / image["file_name"]
        )
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return COCODataset(path, tmp_path / "images"), data


def test_coco_results_use_the_files_ids(coco):
    ds, _ = coco
    assert ds.image_ids == [3, 40] and ds.label_to_cat_id == {1: 2, 2: 9}
    dets = [
        {"boxes": [[1, 2, 4, 8], [0, 0, 1, 1]], "scores": [0.5, 0.25], "labels": [2, 1]},
        {
            "boxes": [[2, 2, 3, 5], [9, 9, 9.5, 9.5], [0, 0, 2, 2]],
            "scores": [0.75, 0.9, 0.1],
            "labels": [1, 0, 3],
            "valid": [True, True, True],
        },
    ]
    assert coco_results(ds, dets) == [
        {"image_id": 3, "category_id": 9, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.5},
        {"image_id": 3, "category_id": 2, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.25},
        {
            "image_id": 40,
            "category_id": 2,
            "bbox": [2.0, 2.0, 1.0, 3.0],
            "score": 0.75,
        },  # background and label 3 dropped
    ]
    assert coco_results(ds, {1: dets[1]}) == coco_results(ds, [None, dets[1]])
    assert len(coco_results(ds, {1: dets[1]})) == 1


def test_coco_ground_truth_is_the_original_file(coco):
    ds, data = coco
    assert coco_ground_truth(ds) == data


def test_detection_list_checks_lengths_and_masks():
    out = detection_list(
        [{"boxes": np.zeros((2, 4)), "scores": [1, 2], "labels": [1, 1], "valid": [False, True]}], 1, 1
    )
    assert out[0]["scores"].tolist() == [2.0] and out[0]["boxes"].dtype == np.float64
    with pytest.raises(ValueError, match="2 images of detections for a dataset of 3"):
        detection_list([None, None], 3, 1)
    with pytest.raises(ValueError, match=r"indices \[5\] outside"):
        detection_list({5: None}, 3, 1)
    with pytest.raises(ValueError, match="2 boxes, 1 scores"):
        detection_list([{"boxes": np.zeros((2, 4)), "scores": [1], "labels": [1, 1]}], 1, 1)


def test_voc_ground_truth_has_synthetic_ids_and_difficult_objects_as_crowds(tmp_path):
    root = tmp_path / "VOC"
    for sub in ("Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "JPEGImages/p.jpg")
    Image.fromarray(np.zeros((50, 20, 3), np.uint8)).save(root / "JPEGImages/q.png")
    obj = (
        "<object><name>{}</name><difficult>{}</difficult>"
        "<bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"
    )
    (root / "Annotations/p.xml").write_text(
        f"<annotation><filename>p.jpg</filename>{obj.format('dog', 0, 1, 1, 10, 20)}"
        f"{obj.format('cat', 1, 5, 6, 7, 8)}</annotation>"
    )
    (root / "Annotations/q.xml").write_text(
        f"<annotation><filename>q.png</filename>{obj.format('cat', 0, 2, 3, 4, 5)}</annotation>"
    )
    ds = VOCDataset(root)
    assert coco_ground_truth(ds) == {
        "images": [
            {"id": 1, "width": 40, "height": 30, "file_name": "p"},
            {"id": 2, "width": 20, "height": 50, "file_name": "q"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0.0, 0.0, 10.0, 20.0], "area": 200.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [4.0, 5.0, 3.0, 3.0], "area": 9.0, "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 3.0], "area": 9.0, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    results = coco_results(ds, [{"boxes": [[1, 1, 2, 3]], "scores": [0.5], "labels": [2]}, None])
    assert results == [{"image_id": 1, "category_id": 2, "bbox": [1.0, 1.0, 1.0, 2.0], "score": 0.5}]


def test_shapes_ground_truth_matches_its_examples():
    ds = ShapesDataset(num_examples=3, image_size=(64, 80), seed=5)
    gt = coco_ground_truth(ds)
    assert [im["id"] for im in gt["images"]] == [1, 2, 3] and gt["images"][0]["height"] == 64
    for i in range(3):
        anns = [a for a in gt["annotations"] if a["image_id"] == i + 1]
        boxes = np.array([a["bbox"] for a in anns], np.float64)
        ex = ds[i]
        np.testing.assert_allclose(boxes[:, :2], ex["boxes"][:, :2])
        np.testing.assert_allclose(boxes[:, :2] + boxes[:, 2:], ex["boxes"][:, 2:])
        assert [a["category_id"] for a in anns] == ex["labels"].tolist()
    assert (
        len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])
        and min(a["id"] for a in gt["annotations"]) == 1
    )
