"""The lucid-jax command line: one-line errors for bad input, from every command. The
jobs it runs have their own tests in tests/jobs/."""

import pytest

from tests.cli_run import run_cli


def _voc(root, xml):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "Annotations" / "a.xml").write_text(xml)
    from PIL import Image

    Image.new("RGB", (64, 48)).save(root / "JPEGImages" / "a.jpg")
    return root


GOOD_XML = """<annotation><filename>a.jpg</filename><size><width>64</width><height>48</height></size>
<object><name>dog</name><difficult>0</difficult><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>30</xmax><ymax>30</ymax></bndbox></object>
</annotation>"""


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_voc", "not found|does not exist|no such"),
        ("malformed_xml", "a.xml"),
        ("malformed_json", "json"),
        ("unknown_model", "unknown model 'faster_rcnn_nope'"),
        ("unknown_class", "dog"),
        ("no_split_file", r"val\.txt: split file for split 'val' not found; pass --split all to score every image"),
        ("other_architecture", "holds a faster_rcnn_mini_fpn, not a faster_rcnn_resnet_50_fpn"),
        ("missing_checkpoint", "checkpoint directory not found"),
        ("bad_size", "multiple of 32"),
    ],
)
def test_errors_are_one_line(case, match, tmp_path, trained):
    if case == "missing_voc":
        args = ["train", "--data", f"voc:{tmp_path / 'nope'}", "--out", str(tmp_path / "o")]
    elif case == "malformed_xml":
        root = _voc(tmp_path / "voc", "<annotation><object><name>dog</name>")
        args = ["train", "--data", f"voc:{root}", "--out", str(tmp_path / "o")]
    elif case == "malformed_json":
        (tmp_path / "ann.json").write_text("{not json")
        args = ["train", "--data", f"coco:{tmp_path / 'ann.json'}:{tmp_path}", "--out", str(tmp_path / "o")]
    elif case == "unknown_model":
        args = ["train", "--data", "shapes", "--model", "faster_rcnn_nope", "--out", str(tmp_path / "o")]
    elif case == "unknown_class":
        root = _voc(tmp_path / "voc", GOOD_XML)
        args = ["eval", "--data", f"voc:{root}", "--split", "all", "--checkpoint", str(trained)]
    elif case == "no_split_file":
        root = _voc(tmp_path / "voc", GOOD_XML)
        args = ["eval", "--data", f"voc:{root}", "--checkpoint", str(trained)]
    elif case == "other_architecture":
        args = ["eval", "--data", "shapes", "--checkpoint", str(trained), "--model", "faster_rcnn_resnet_50_fpn"]
    elif case == "missing_checkpoint":
        args = ["eval", "--data", "shapes", "--checkpoint", str(tmp_path / "none")]
    else:
        args = ["train", "--data", "shapes", "--image-size", "100", "--out", str(tmp_path / "o")]
    code, out, err = run_cli(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("lucid-jax: error:"), err
    assert "Traceback" not in err
    import re

    assert re.search(match, lines[0], re.IGNORECASE), lines[0]
