"""Fuzzing the VOC and COCO readers: random and mutated XML text, random and mutated
COCO JSON. A reader either succeeds or raises DatasetError, never anything else, and
never hangs (hypothesis' deadline)."""

import copy
import json
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lucid_jax.data import COCODataset, DatasetError, VOCDataset, parse_annotation

FUZZ = settings(
    max_examples=60,
    deadline=timedelta(milliseconds=1500),
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

VALID_XML = (
    '<?xml version="1.0" encoding="utf-8"?><annotation><folder>VOC2007</folder><filename>a.jpg</filename>'
    "<size><width>40</width><height>30</height><depth>3</depth></size>"
    "<object><name>cat</name><difficult>0</difficult><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax><ymax>25</ymax></bndbox></object>"
    "<object><name>dog</name><difficult>1</difficult><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
    "</annotation>"
)
VALID_COCO = {
    "images": [{"id": 4, "file_name": "a.jpg", "height": 30, "width": 40}, {"id": 9, "file_name": "a.jpg"}],
    "categories": [{"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 4, "category_id": 2, "bbox": [2, 3, 10, 12], "iscrowd": 0, "area": 120},
        {"id": 2, "image_id": 9, "category_id": 5, "bbox": [0, 0, 40, 30], "iscrowd": 1, "area": 1200},
    ],
}

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
tricky = st.sampled_from(
    [
        "",
        " ",
        "0",
        "1",
        "-1",
        "nan",
        "inf",
        "-inf",
        "1e400",
        "1e39",
        "3.5",
        "a.jpg",
        "../a.jpg",
        "/a.jpg",
        "&amp;",
        "<",
        "]]>",
        "\u00e9",
        "0x10",
        "1_0",
    ]
)
json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | text
    | tricky,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(text | tricky, inner, max_size=5),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A VOCdevkit with one image, whose single annotation each example overwrites, and a COCO image folder."""
    root = tmp_path_factory.mktemp("fuzz")
    for sub in ("VOC/Annotations", "VOC/JPEGImages", "images"):
        (root / sub).mkdir(parents=True)
    image = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    image.save(root / "VOC/JPEGImages/a.jpg")
    image.save(root / "images/a.jpg")
    return root


def _read_voc(root, content: bytes):
    (root / "VOC/Annotations/a.xml").write_bytes(content)
    try:
        parse_annotation(root / "VOC/Annotations/a.xml")
        ds = VOCDataset(root / "VOC")
        for i in range(len(ds)):
            ann = ds.annotation(i)
            assert ann["boxes"].shape == (len(ann["labels"]), 4) and np.isfinite(ann["boxes"]).all()
            assert (ann["boxes"][:, 2:] > ann["boxes"][:, :2]).all()
    except DatasetError:
        pass


def _read_coco(root, data):
    path = root / "ann.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    try:
        ds = COCODataset(path, root / "images")
        counts = ds.train_object_counts()
        for i in range(len(ds)):
            ann = ds.annotation(i)
            assert (ann["boxes"][:, 2:] > ann["boxes"][:, :2]).all() and np.isfinite(ann["boxes"]).all()
            assert counts[i] == (~ann["ignore"]).sum()
    except DatasetError:
        pass


@st.composite
def mutated(draw, base: str):
    """``base`` with a few random deletions, insertions and substitutions."""
    s = base
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(s)))
        j = draw(st.integers(i, min(len(s), i + 12)))
        s = s[:i] + draw(text | tricky) + s[j:]
    return s


def test_the_unmutated_inputs_are_valid(folder):
    (folder / "VOC/Annotations/a.xml").write_text(VALID_XML)
    assert len(VOCDataset(folder / "VOC").annotation(0)["labels"]) == 2
    (folder / "ann.json").write_text(json.dumps(VALID_COCO))
    assert COCODataset(folder / "ann.json", folder / "images").train_object_counts().tolist() == [1, 0]


@FUZZ
@given(
    content=st.one_of(
        mutated(VALID_XML).map(lambda s: s.encode()), st.binary(max_size=200), text.map(lambda s: s.encode())
    )
)
def test_voc_xml_fuzz(folder, content):
    _read_voc(folder, content)


@st.composite
def structured_xml(draw):
    """Well-formed XML with VOC's tags in random places and odd values."""
    tags = st.sampled_from(
        ["annotation", "object", "name", "bndbox", "xmin", "ymin", "xmax", "ymax", "difficult", "filename", "size"]
    )

    def element(depth):
        tag = draw(tags)
        if depth > 2 or draw(st.booleans()):
            value = draw(tricky | text.filter(lambda t: "<" not in t and "&" not in t))
            return f"<{tag}>{value}</{tag}>"
        return f"<{tag}>" + "".join(element(depth + 1) for _ in range(draw(st.integers(0, 4)))) + f"</{tag}>"

    body = "".join(element(1) for _ in range(draw(st.integers(0, 5))))
    return f"<annotation><filename>{draw(tricky)}</filename>{body}</annotation>".encode()


@FUZZ
@given(content=structured_xml())
def test_voc_structured_xml_fuzz(folder, content):
    _read_voc(folder, content)


@st.composite
def mutated_coco(draw):
    """VALID_COCO with random values dropped in at random places."""
    data = copy.deepcopy(VALID_COCO)
    for _ in range(draw(st.integers(1, 3))):
        node = data
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, (dict, list)) and draw(st.booleans()):
                node = child
                continue
            action = draw(st.sampled_from(["replace", "delete"]))
            if action == "delete":
                del node[key]
            else:
                node[key] = draw(json_value)
            break
    return data


@FUZZ
@given(data=st.one_of(mutated_coco(), json_value, mutated(json.dumps(VALID_COCO))))
def test_coco_json_fuzz(folder, data):
    _read_coco(folder, data)
