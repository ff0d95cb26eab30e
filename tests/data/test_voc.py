"""VOC reader on a tiny VOCdevkit written in tmp_path: parsing, the 1-based box
conversion checked against pixels, the image fallback, class lists, splits (given and
derived), annotations without decoding, EXIF-rotated images, boxes without area,
unsafe XML, errors."""

import time

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
    return (
        f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>"
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>"
    )


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
        (_xml("a.jpg", [("cat", (1, 1, "inf", 3), 0)]), "non-finite"),
        (_xml("a.jpg", [("cat", (1, "nan", 2, 3), 0)]), "non-finite"),
        (_xml("a.jpg", [("cat", (1, 1, 2, "1e39"), 0)]), "non-finite"),
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
    with pytest.raises(DatasetError, match=r"val\.txt.*not found") as err:
        VOCDataset(voc, split="val")
    assert "--split all" in str(err.value) and "\n" not in str(err.value)
    (voc / "JPEGImages/b.png").unlink()
    with pytest.raises(DatasetError, match=r"b\.xml.*image 'b\.jpg' not found"):
        VOCDataset(voc)


def test_missing_split_files_are_derived_for_train_trainval_and_all(voc):
    main = voc / "ImageSets/Main"
    (main / "train.txt").unlink()
    (main / "val.txt").write_text("c\n")
    train = VOCDataset(voc, split="train")
    assert train.ids == ["a", "b"] and "val.txt" in train.split_source
    (main / "test.txt").write_text("b\n")
    assert VOCDataset(voc, split="train").ids == ["a"]  # neither val nor test
    assert VOCDataset(voc, split="trainval").ids == ["a", "c"]  # trainval holds val, not test
    assert VOCDataset(voc, split="all").ids == ["a", "b", "c"]
    assert VOCDataset(voc).ids == ["a", "b", "c"]  # split=None: every image, as before
    (main / "train.txt").write_text("b\n")
    assert VOCDataset(voc, split="train").ids == ["b"]  # a split file always wins
    with pytest.raises(DatasetError, match=r"minival\.txt: split file .* not found; pass --split all"):
        VOCDataset(voc, split="minival")
    (main / "val.txt").write_text("a\nb\nc\n")
    (main / "train.txt").unlink()
    with pytest.raises(DatasetError, match="no images in split 'train'"):
        VOCDataset(voc, split="train")


def test_classes_txt_sets_the_labels_and_rejects_unknown_names(voc):
    (voc / "classes.txt").write_text("person\n\ndog\ncat\nhorse\n")
    ds = VOCDataset(voc)
    assert ds.class_names == ("person", "dog", "cat", "horse") and ds.class_source.endswith("classes.txt")
    np.testing.assert_array_equal(ds[0]["labels"], [2, 3])
    assert VOCDataset(voc, class_names=["dog", "cat", "person"]).class_names == (
        "dog",
        "cat",
        "person",
    )  # argument wins
    (voc / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(DatasetError, match=r"c\.xml: class 'person' is not in .*classes\.txt \['cat', 'dog'\]") as err:
        VOCDataset(voc)
    assert "\n" not in str(err.value)
    (voc / "classes.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DatasetError, match="without repeats"):
        VOCDataset(voc)


def test_class_counts_count_the_split_objects(voc):
    ds = VOCDataset(voc)
    assert ds.class_source == "discovered"
    assert ds.class_counts == {"cat": 2, "dog": 2, "person": 1}  # the difficult person counts
    assert VOCDataset(voc, split="train").class_counts == {"cat": 2, "dog": 1, "person": 0}
    np.testing.assert_array_equal(ds.train_object_counts(), [2, 1, 2])


def test_annotation_matches_the_example_without_decoding(voc):
    ds = VOCDataset(voc)
    for i in range(len(ds)):
        ann, ex = ds.annotation(i), ds[i]
        np.testing.assert_array_equal(ann["boxes"], ex["boxes"])
        np.testing.assert_array_equal(ann["labels"], ex["labels"])
        np.testing.assert_array_equal(ann["ignore"], ex["difficult"])
        assert (ann["height"], ann["width"]) == ex["image"].shape[:2] and ann["id"] == ex["id"]
    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(voc / "JPEGImages/a.jpg")
    data = (voc / "JPEGImages/a.jpg").read_bytes()
    (voc / "JPEGImages/a.jpg").write_bytes(data[: len(data) // 2])  # the header survives, the pixels do not
    ds = VOCDataset(voc)
    assert (ds.annotation(0)["height"], ds.annotation(0)["width"]) == (30, 40)
    with pytest.raises(DatasetError, match="cannot decode image"):
        ds[0]


def test_exif_rotated_jpeg_boxes_refer_to_the_upright_image(voc):
    stored = np.full((20, 40, 3), 20, np.uint8)
    stored[2:7, 30:38] = 250  # shown upright (orientation 6) at rows 30..37, cols 13..17
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(voc / "JPEGImages/r.jpg", quality=95, exif=exif.tobytes())
    # Annotation tools show the upright image: 1-based xmin 14, ymin 31, xmax 18, ymax 38.
    (voc / "Annotations/r.xml").write_text(_xml("r.jpg", [("cat", (14, 31, 18, 38), 0)], size=(20, 40)))
    ds = VOCDataset(voc)
    i = ds.ids.index("r")
    ex, ann = ds[i], ds.annotation(i)
    assert ex["image"].shape == (40, 20, 3) and (ann["height"], ann["width"]) == (40, 20)
    x1, y1, x2, y2 = ann["boxes"][0].astype(int)
    bright = ex["image"].min(-1) > 128
    assert bright[y1:y2, x1:x2].all() and bright.sum() == (y2 - y1) * (x2 - x1)


def test_boxes_without_area_are_dropped_and_counted(voc):
    objects = [("cat", (9, 1, 2, 3), 0), ("dog", (5, 5, 5, 5), 0), ("cat", (5, 5, 3, 8), 0), ("dog", (2, 9, 4, 7), 1)]
    (voc / "Annotations/a.xml").write_text(_xml("a.jpg", objects))
    ann = parse_annotation(voc / "Annotations/a.xml")
    assert ann["dropped_invalid"] == 3 and ann["names"] == ["dog"]
    np.testing.assert_array_equal(ann["boxes"], [[4, 4, 5, 5]])  # a one-pixel VOC box is a unit square
    ds = VOCDataset(voc)
    assert ds.dropped_invalid_boxes == 3
    np.testing.assert_array_equal(ds.annotation(0)["labels"], [2])


def test_boxes_past_the_image_are_clipped_once_and_scored_as_they_lie(tmp_path):
    from lucid_jax.evaluation import evaluate_dataset
    from lucid_jax.jobs.data import describe_data

    root = tmp_path / "VOC"
    for sub in ("Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((150, 200, 3), np.uint8)).save(root / "JPEGImages/p.jpg")  # 200 wide, 150 high
    objects = [("cat", (-50, -30, 500, 400), 0), ("dog", (10, 10, 50, 40), 0), ("cat", (301, 1, 400, 90), 0)]
    xml = root / "Annotations/p.xml"
    xml.write_text(_xml("p.jpg", objects, size=(100, 100)))  # <size> disagrees with the image
    ds = VOCDataset(root)
    assert (ds.clipped_boxes, ds.dropped_invalid_boxes) == (2, 1)  # the third lies wholly right of the image
    assert ds.size_mismatches == [(xml, (100, 100), (150, 200))]
    ann, example = ds.annotation(0), ds[0]
    np.testing.assert_array_equal(ann["boxes"], [[0, 0, 200, 150], [9, 9, 50, 40]])
    np.testing.assert_array_equal(example["boxes"], ann["boxes"])  # training sees the same boxes
    np.testing.assert_array_equal(ann["labels"], example["labels"])
    notes: list[str] = []
    assert describe_data(ds, notes.append)["clipped_boxes"] == 2
    assert notes[1:] == [
        "data: clipped 2 boxes to their image, dropped 1 with no area",
        f"warning: {xml} gives <size> 100x100, but its image is 200x150; the image's size is used",
    ]
    # a perfect detector (the boxes as they lie in the image) scores 1.0, not 0.5
    perfect = {"boxes": ann["boxes"], "scores": np.array([0.9, 0.8]), "labels": ann["labels"]}
    metrics = evaluate_dataset(ds, [perfect])
    assert metrics["AP"] == pytest.approx(1.0) and metrics["voc_AP50_all"] == pytest.approx(1.0)


BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{k} "{("&lol" + (str(k - 1) if k > 1 else "") + ";") * 10}">' for k in range(1, 10))
    + "]><annotation><filename>a.jpg</filename><object><name>&lol9;</name></object></annotation>"
)
EXTERNAL_ENTITY = (
    '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY ext SYSTEM "file:///etc/passwd">]>'
    "<annotation><filename>&ext;</filename></annotation>"
)


@pytest.mark.parametrize("body", [BILLION_LAUGHS, EXTERNAL_ENTITY], ids=["billion_laughs", "external_entity"])
def test_unsafe_xml_is_refused_quickly(voc, body):
    (voc / "Annotations/a.xml").write_text(body)
    start = time.perf_counter()
    with pytest.raises(DatasetError, match=r"a\.xml: unsafe XML refused") as err:
        VOCDataset(voc)
    assert time.perf_counter() - start < 0.5
    assert "\n" not in str(err.value)


def test_a_filename_outside_jpegimages_is_never_opened(voc):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(voc / "secret.jpg")
    (voc / "Annotations/d.xml").write_text(_xml("../secret.jpg", [("cat", (1, 1, 4, 4), 0)]))
    with pytest.raises(DatasetError, match=r"d\.xml: image '\.\./secret\.jpg' not found"):
        VOCDataset(voc)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(voc / "JPEGImages/d.jpg")  # found by the XML's stem
    ds = VOCDataset(voc)
    assert ds[ds.ids.index("d")]["image"].shape == (8, 8, 3)
