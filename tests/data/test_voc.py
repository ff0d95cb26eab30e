"""VOC reader on a tiny VOCdevkit written in tmp_path: parsing, the 1-based box
conversion checked against pixels, the image fallback, class collection, splits, errors."""

import numpy as np
import pytest
from PIL import Image

from lucid_jax.data import Dataset, DatasetError, VOCDataset, parse_annotation


def _xml(filename, objects, size=(40, 30)):
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(diff)}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, diff in objects
    )
    return (f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>"
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")


@pytest.fixture
def voc(tmp_path):
    """VOC2007/ with a.jpg, b.png (its XML says b.jpg), c.jpg (a difficult person) and train.txt = a, b."""
    root = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    a = np.zeros((30, 40, 3), np.uint8)
    Image.fromarray(a).save(root / "JPEGImages/a.jpg")
    b = np.zeros((24, 32, 3), np.uint8)
    b[5:15, 10:20] = 255  # 0-based rows 5..14, cols 10..19 = VOC 1-based xmin 11, ymin 6, xmax 20, ymax 15
    Image.fromarray(b).save(root / "JPEGImages/b.png")
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(root / "JPEGImages/c.jpg")
    (root / "Annotations/a.xml").write_text(_xml("a.jpg", [("dog", (1, 2, 10, 20), 0), ("cat", (5, 5, 40, 30), 0)]))
    (root / "Annotations/b.xml").write_text(_xml("b.jpg", [("cat", (11, 6, 20, 15), 0)], size=(32, 24)))
    (root / "Annotations/c.xml").write_text(_xml("c.jpg", [("person", (3, 3, 8, 9), 1), ("dog", (1, 1, 20, 20), 0)]))
    (root / "ImageSets/Main/train.txt").write_text("a\nb\n")
    (root / "ImageSets/Main/cat_train.txt").write_text("a  1\nb  1\n")
    return root


def test_parses_every_annotation_with_collected_sorted_classes(voc):
    ds = VOCDataset(voc)
    assert isinstance(ds, Dataset) and len(ds) == 3 and ds.ids == ["a", "b", "c"]
    assert ds.class_names == ("cat", "dog", "person")
    a = ds[0]
    np.testing.assert_array_equal(a["boxes"], [[0, 1, 10, 20], [4, 4, 40, 30]])  # (x1 - 1, y1 - 1, x2, y2)
    np.testing.assert_array_equal(a["labels"], [2, 1])
    assert a["image"].shape == (30, 40, 3) and a["image"].dtype == np.uint8 and a["id"] == "a"


def test_one_based_boxes_become_tight_continuous_boxes(voc):
    b = VOCDataset(voc)[1]
    white = b["image"].min(-1) > 127
    rows, cols = np.flatnonzero(white.any(1)), np.flatnonzero(white.any(0))
    np.testing.assert_array_equal(b["boxes"][0], [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    np.testing.assert_array_equal(b["boxes"][0], [10, 5, 20, 15])


def test_image_with_a_different_extension_is_found_by_stem(voc):
    b = VOCDataset(voc)[1]
    assert b["image"].shape == (24, 32, 3)  # b.png, although the XML names b.jpg


def test_difficult_objects_are_kept_and_flagged(voc):
    c = VOCDataset(voc)[2]
    np.testing.assert_array_equal(c["difficult"], [True, False])
    np.testing.assert_array_equal(c["labels"], [3, 2])
    assert not VOCDataset(voc)[0]["difficult"].any()


def test_split_file_restricts_images_but_not_classes(voc):
    ds = VOCDataset(voc, split="train")
    assert ds.ids == ["a", "b"] and len(ds) == 2
    assert ds.class_names == ("cat", "dog", "person")  # "person" is only in c, outside the split
    assert VOCDataset(voc, split="cat_train").ids == ["a", "b"]  # class files: stem first, flag second


def test_given_class_list_sets_the_labels(voc):
    ds = VOCDataset(voc, class_names=["person", "dog", "cat", "horse"])
    np.testing.assert_array_equal(ds[0]["labels"], [2, 3])
    assert ds.class_names == ("person", "dog", "cat", "horse")


def test_unknown_class_names_the_file(voc):
    with pytest.raises(DatasetError, match=r"c\.xml.*'person' is not in class_names"):
        VOCDataset(voc, class_names=["cat", "dog"])


def test_malformed_xml_names_the_file_in_one_line(voc):
    (voc / "Annotations/b.xml").write_text("<annotation><filename>b.jpg</filename><object>")
    with pytest.raises(DatasetError) as err:
        VOCDataset(voc)
    message = str(err.value)
    assert "b.xml" in message and "malformed XML" in message and "\n" not in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "body, problem",
    [
        ("<annotation><object><name>cat</name></object></annotation>", "has no <filename>"),
        ("<annotation><filename>a.jpg</filename><object><name>cat</name></object></annotation>", "has no <bndbox>"),
        (_xml("a.jpg", [("cat", ("x", 1, 2, 3), 0)]), "non-numeric"),
        (_xml("a.jpg", [("cat", (9, 1, 2, 3), 0)]), "inverted box"),
        ("<notvoc/>", "expected <annotation>"),
    ],
)
def test_broken_annotations_explain_the_problem(tmp_path, body, problem):
    path = tmp_path / "x.xml"
    path.write_text(body)
    with pytest.raises(DatasetError, match=problem) as err:
        parse_annotation(path)
    assert str(path) in str(err.value)


def test_missing_folders_split_and_images_raise(voc, tmp_path):
    with pytest.raises(DatasetError, match="folder not found"):
        VOCDataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"val\.txt.*not found"):
        VOCDataset(voc, split="val")
    (voc / "JPEGImages/b.png").unlink()
    with pytest.raises(DatasetError, match=r"b\.xml.*image 'b\.jpg' not found"):
        VOCDataset(voc)
