"""Bad and unusual input through the command line, as a user meets it: one line on
stderr, exit code 1 for data and file errors, nothing written before the inputs
validate; and the image modes a real folder holds (greyscale, RGBA, palette, 16-bit,
CMYK, EXIF-rotated) train and predict."""

import json
import os
import time

import numpy as np
from PIL import Image

from tests.cli_run import run_cli

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
QUICK = ["--image-size", "64", "--batch-size", "2", "--steps", "1", "--eval-every", "0", "--no-progress"]
QUICK += ["--num-workers", "1"]


def _one_line_error(code, err, expected_code=1) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("lucid-jax: error: "), err
    return lines[0]


def _xml(filename, w, h, objects) -> str:
    body = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, (x1, y1, x2, y2) in objects
    )
    size = f"<size><width>{w}</width><height>{h}</height></size>"
    return f"<annotation><filename>{filename}</filename>{size}{body}</annotation>"


def _voc(root, images: dict, objects=None):
    """A VOC folder: {file name: PIL image}, each annotated with two boxes (or ``objects``)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for name, image in images.items():
        path = root / "JPEGImages" / name
        if isinstance(image, bytes):
            path.write_bytes(image)
            w, h = 64, 48
        else:
            image.save(path, **({"exif": image.info["exif"]} if "exif" in image.info else {}))
            w, h = image.size
        objs = objects or [("cat", (2, 2, 20, 20)), ("dog", (22, 10, 40, 40))]
        (root / "Annotations" / f"{os.path.splitext(name)[0]}.xml").write_text(_xml(name, w, h, objs))
    return root


def _odd_images() -> dict:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    gradient16 = Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16))
    rotated = Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))  # stored 48 wide, shown 64 wide
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    rotated.info["exif"] = exif.tobytes()
    return {
        "grey.png": rgb.convert("L"),
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"),
        "deep.png": gradient16,
        "cmyk.jpg": rgb.convert("CMYK"),
        "rotated.jpg": rotated,
    }


def test_every_image_mode_trains_and_predicts(tmp_path):
    root = _voc(tmp_path / "voc", _odd_images())
    # one object with no area: dropped and counted
    xml = root / "Annotations" / "grey.xml"
    xml.write_text(
        _xml("grey.png", 64, 48, [("cat", (2, 2, 20, 20)), ("dog", (22, 10, 40, 40)), ("cat", (30, 30, 10, 40))])
    )
    out = tmp_path / "run"
    code, stdout, err = run_cli("train", "--data", f"voc:{root}", "--out", out, "--max-boxes", "1", *QUICK)
    assert code == 0, err
    assert "data: 6 images; classes (found in the annotations): cat (6), dog (6)" in stdout
    assert "data: dropped 1 annotated boxes with no area" in stdout
    assert "dropped 6 of 12 boxes in 6 images (max-boxes 1)" in stdout
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[0] == {"step": 0, "dropped_boxes": 6, "total_boxes": 12, "images_with_dropped_boxes": 6, "max_boxes": 1}
    assert log[-1]["step"] == 1 and log[-1]["finite"] == 1.0

    files = sorted((root / "JPEGImages").iterdir())
    code, _, err = run_cli(
        "predict", *files, "--checkpoint", out, "--out", tmp_path / "pred", "--score-thresh", "0", "--draw"
    )
    assert code == 0, err
    results = json.loads((tmp_path / "pred" / "detections.json").read_text())
    sizes = {os.path.basename(r["image"]): Image.open(r["detections_png"]).size for r in results}
    assert sizes["rotated.jpg"] == (64, 48)  # drawn upright, as the EXIF orientation says
    assert len(sizes) == 6


def test_dataset_smaller_than_the_batch(tmp_path):
    root = _voc(tmp_path / "voc", {"a.png": Image.new("RGB", (64, 48)), "b.png": Image.new("RGB", (64, 48))})
    out = tmp_path / "run"
    line = _one_line_error(*run_cli("train", "--data", f"voc:{root}", "--out", out, "--batch-size", "8")[::2])
    assert line == "lucid-jax: error: the data has 2 image(s), fewer than --batch-size 8; use --batch-size 2 or less"
    assert not out.exists()


def test_truncated_and_non_image_files(tmp_path):
    good = Image.new("RGB", (64, 48))
    good.save(tmp_path / "good.png")
    raw = (tmp_path / "good.png").read_bytes()
    root = _voc(tmp_path / "voc", {"a.png": raw[: len(raw) // 2], "b.png": b"this is not an image"})
    code, _, err = run_cli("train", "--data", f"voc:{root}", "--out", tmp_path / "run", *QUICK)
    assert "cannot decode image" in _one_line_error(code, err) or "truncated" in err
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run_cli(
        "predict", tmp_path / "missing.png", "--checkpoint", tmp_path / "none", "--out", tmp_path / "p"
    )
    assert "no such file or folder" in _one_line_error(code, err) and "missing.png" in err
    code, _, err = run_cli(
        "predict", tmp_path / "notes.txt", "--checkpoint", tmp_path / "none", "--out", tmp_path / "p"
    )
    assert "checkpoint directory not found" in _one_line_error(code, err)
    assert not (tmp_path / "p").exists()


def test_output_paths_that_are_the_wrong_kind(tmp_path):
    (tmp_path / "file").write_text("x")
    line = _one_line_error(
        *run_cli("predict", tmp_path / "file", "--checkpoint", tmp_path, "--out", tmp_path / "file")[::2]
    )
    assert "--out" in line and "is a file" in line
    line = _one_line_error(*run_cli("eval", "--data", "shapes", "--checkpoint", tmp_path, "--results", tmp_path)[::2])
    assert "--results" in line and "is a folder" in line


def test_coco_file_name_escaping_the_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    for name in ("../secret.png", str(tmp_path / "secret.png")):
        ann = {
            "images": [{"id": 1, "file_name": name, "width": 8, "height": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "a"}],
        }
        (tmp_path / "ann.json").write_text(json.dumps(ann))
        line = _one_line_error(
            *run_cli(
                "train",
                "--data",
                f"coco:{tmp_path / 'ann.json'}:{tmp_path / 'images'}",
                "--out",
                tmp_path / "run",
                *QUICK,
            )[::2]
        )
        assert "ann.json: images[0] file_name" in line and "leaves the image folder" in line
        assert not (tmp_path / "run").exists()


def test_a_missing_coco_image_is_refused_before_the_run_folder_exists(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    ann = {
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}, {"id": 2, "file_name": "b.png"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    data = f"coco:{tmp_path / 'ann.json'}:{tmp_path / 'images'}"
    line = _one_line_error(*run_cli("train", "--data", data, "--out", tmp_path / "run2", *QUICK)[::2])
    assert line == (
        f"lucid-jax: error: {tmp_path / 'images' / 'b.png'}: image file not found, listed in {tmp_path / 'ann.json'}"
    )
    assert not (tmp_path / "run2").exists()  # no folder, no empty checkpoints/, no log.jsonl


def test_xml_entity_tricks_are_refused_quickly(tmp_path):
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + "".join(f'<!ENTITY lol{i + 1} "{f"&lol{i};" * 10 if i else "&lol;" * 10}">' for i in range(9))
        + "]><annotation><filename>&lol9;</filename></annotation>"
    )
    external = (
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<annotation><filename>&x;</filename></annotation>"
    )
    for name, text in (("bomb", bomb), ("external", external)):
        root = _voc(tmp_path / name, {"a.png": Image.new("RGB", (64, 48))})
        (root / "Annotations" / "a.xml").write_text(text)
        start = time.perf_counter()
        line = _one_line_error(*run_cli("train", "--data", f"voc:{root}", "--out", tmp_path / "run", *QUICK)[::2])
        assert "a.xml" in line and "unsafe XML refused" in line
        assert time.perf_counter() - start < 60  # the interpreter's start-up, not an expansion


def test_voc_class_list_names_the_file_with_an_unknown_class(tmp_path):
    root = _voc(
        tmp_path / "voc",
        {"a.png": Image.new("RGB", (64, 48)), "b.png": Image.new("RGB", (64, 48))},
        objects=[("cat", (2, 2, 20, 20)), ("dgo", (22, 10, 40, 40))],
    )
    line = _one_line_error(
        *run_cli("train", "--data", f"voc:{root}", "--classes", "cat,dog", "--out", tmp_path / "r", *QUICK)[::2]
    )
    assert "a.xml" in line and "'dgo'" in line
    (root / "classes.txt").write_text("cat\ndog\n")
    line = _one_line_error(*run_cli("train", "--data", f"voc:{root}", "--out", tmp_path / "r", *QUICK)[::2])
    assert "a.xml" in line and "'dgo'" in line
    assert not (tmp_path / "r").exists()
