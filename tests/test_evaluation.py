"""Detection metrics against numbers worked out by hand, and against pycocotools run
directly through its own file-based API.

The fixture: classes cat (1), dog (2), bird (3); two images.
  image A: gt cat [0,0,10,10], dog [20,20,40,40]
  image B: gt cat [50,50,70,70], cat [0,0,20,20], bird [80,80,90,90]
  detections, cat: B [100,100,120,120] 0.9 (miss), A [0,0,10,10] 0.8 (hit),
                   B [50,50,70,70] 0.7 (hit), A [0,0,10,10] 0.6 (duplicate: miss)
             dog:  A [20,20,40,40] 0.5 (hit); bird: none.
Cat, ranked: FP TP TP FP over 3 objects: recall 0, 1/3, 2/3, 2/3 and precision 0, 1/2,
2/3, 1/2. The envelope is 2/3 up to recall 2/3 and 0 beyond, so
  VOC all-point AP = 1/3 * 2/3 + 1/3 * 2/3 = 4/9;
  VOC 11-point AP = 2/3 at t = 0, .1, ..., .6 (7 points), 0 at .7 ... 1 -> 7 * 2/3 / 11 = 14/33;
  COCO AP = 2/3 at the 67 recall thresholds 0, .01, ..., .66 of 101 -> 134/303 (every hit has IoU 1,
  so AP50 = AP75 = AP).
Dog: 1 everywhere. Bird: 0 everywhere. Means over the three classes follow.

The dataset-level tests (evaluate_dataset, coco_evaluate_official) write small COCO and
VOC datasets and compare with pycocotools called directly on files: COCO(file),
loadRes, COCOeval.
"""

import contextlib
import io
import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lucid_jax.data import COCODataset, VOCDataset, collate, preprocess
from lucid_jax.data.coco_format import coco_ground_truth
from lucid_jax.evaluation import (
    DetectionEvaluator,
    coco_evaluate_official,
    evaluate,
    evaluate_dataset,
    num_ground_truth,
)
from lucid_jax.inference import coco_results, unpad_detections

NAMES = ("cat", "dog", "bird")
CAT_VOC_ALL, CAT_VOC_11, CAT_COCO = 4 / 9, 14 / 33, 134 / 303


def _pad(rows, k):
    """Per-image lists of (box, score, label) -> padded arrays with a valid mask."""
    out = {
        "boxes": np.zeros((len(rows), k, 4), np.float32),
        "scores": np.zeros((len(rows), k), np.float32),
        "labels": np.zeros((len(rows), k), np.int32),
        "valid": np.zeros((len(rows), k), bool),
    }
    for i, row in enumerate(rows):
        for j, (box, score, label) in enumerate(row):
            out["boxes"][i, j], out["scores"][i, j], out["labels"][i, j], out["valid"][i, j] = box, score, label, True
    return out


def _flat(metrics):
    """Metrics with the per-class dicts flattened, for pytest.approx."""
    out = {}
    for key, value in metrics.items():
        out.update({f"{key}/{n}": v for n, v in value.items()} if isinstance(value, dict) else {key: value})
    return out


def _targets(rows, m, difficult=()):
    t = _pad([[(box, 0.0, label) for box, label in row] for row in rows], m)
    t = {"boxes": t["boxes"], "labels": t["labels"], "valid": t["valid"], "difficult": np.zeros_like(t["valid"])}
    for i, j in difficult:
        t["difficult"][i, j] = True
    return t


GT = [
    [([0, 0, 10, 10], 1), ([20, 20, 40, 40], 2)],
    [([50, 50, 70, 70], 1), ([0, 0, 20, 20], 1), ([80, 80, 90, 90], 3)],
]
DETS = [
    [([0, 0, 10, 10], 0.8, 1), ([0, 0, 10, 10], 0.6, 1), ([20, 20, 40, 40], 0.5, 2)],
    [([100, 100, 120, 120], 0.9, 1), ([50, 50, 70, 70], 0.7, 1)],
]


def test_hand_computed_fixture():
    m = evaluate(_pad(DETS, 5), _targets(GT, 4), NAMES)
    assert m["per_class_voc_AP50"] == pytest.approx({"cat": CAT_VOC_ALL, "dog": 1.0, "bird": 0.0})
    assert m["voc_AP50_all"] == pytest.approx((CAT_VOC_ALL + 1) / 3)  # 13/27
    assert m["voc_AP50_11pt"] == pytest.approx((CAT_VOC_11 + 1) / 3)  # 47/99
    assert m["per_class_AP"] == pytest.approx({"cat": CAT_COCO, "dog": 1.0, "bird": 0.0})
    for key in ("AP", "AP50", "AP75"):
        assert m[key] == pytest.approx((CAT_COCO + 1) / 3)  # 437/909
    assert all(isinstance(v, float) for k, v in m.items() if not k.startswith("per_class"))


def test_perfect_detections_score_one():
    dets = [[(box, 0.9, label) for box, label in row] for row in GT]
    m = evaluate(_pad(dets, 4), _targets(GT, 3), NAMES)
    for key in ("AP", "AP50", "AP75", "voc_AP50_11pt", "voc_AP50_all"):
        assert m[key] == pytest.approx(1.0), key


def test_invalid_background_and_padding_rows_are_ignored():
    base = evaluate(_pad(DETS, 5), _targets(GT, 4), NAMES)
    noisy = _pad(DETS, 5)
    noisy["boxes"][:, 4], noisy["scores"][:, 4], noisy["labels"][:, 4] = [200, 200, 210, 210], 0.99, 1  # valid False
    noisy["boxes"][0, 3], noisy["scores"][0, 3], noisy["labels"][0, 3], noisy["valid"][0, 3] = (
        [300, 0, 310, 9],
        0.95,
        0,
        True,
    )
    # A third, padding row (image_valid False) whose confident detection would be a false positive.
    extra = _pad(DETS + [[([0, 0, 5, 5], 0.99, 2)]], 5)
    for key in ("boxes", "scores", "labels", "valid"):
        extra[key][:2] = noisy[key]
    targets = _targets(GT + [[]], 4)
    targets["image_valid"] = np.array([True, True, False])
    assert _flat(evaluate(extra, targets, NAMES)) == pytest.approx(_flat(base), nan_ok=True)
    targets["image_valid"][2] = True  # the same row counted: a dog false positive ranked first
    assert evaluate(extra, targets, NAMES)["per_class_voc_AP50"]["dog"] < 1.0


def test_difficult_objects_are_ignored_by_voc():
    gt = [GT[0] + [([60, 0, 80, 20], 2), ([30, 0, 40, 10], 1)], GT[1]]
    dets = [DETS[0] + [([30, 0, 40, 10], 0.85, 1)], DETS[1]]  # a cat detection on the difficult cat
    m = evaluate(_pad(dets, 5), _targets(gt, 5, difficult=[(0, 2), (0, 3)]), NAMES)
    assert m["per_class_voc_AP50"] == pytest.approx({"cat": CAT_VOC_ALL, "dog": 1.0, "bird": 0.0})
    m = evaluate(_pad(dets, 5), _targets(gt, 5), NAMES)
    # Not difficult: the missed dog halves dog recall (AP 1/2); for cat, FP TP TP TP FP over 4
    # objects gives precision 3/4 up to recall 3/4, so AP = 9/16.
    assert m["per_class_voc_AP50"] == pytest.approx({"cat": 9 / 16, "dog": 0.5, "bird": 0.0})


def test_class_without_ground_truth_is_nan_and_left_out_of_means():
    m = evaluate(_pad(DETS, 5), _targets(GT, 4), NAMES + ("fish",))
    assert np.isnan(m["per_class_AP"]["fish"]) and np.isnan(m["per_class_voc_AP50"]["fish"])
    assert m["voc_AP50_all"] == pytest.approx((CAT_VOC_ALL + 1) / 3)
    assert m["AP"] == pytest.approx((CAT_COCO + 1) / 3)


def test_batches_lists_and_jax_arrays_give_the_same_result():
    stacked = evaluate(_pad(DETS, 5), _targets(GT, 4), NAMES)
    p, t = _pad(DETS, 5), _targets(GT, 4)
    evaluator = DetectionEvaluator(NAMES)
    evaluator.add({k: jnp.asarray(v[:1]) for k, v in p.items()}, {k: jnp.asarray(v[:1]) for k, v in t.items()})
    evaluator.add({k: v[1] for k, v in p.items()}, {k: v[1] for k, v in t.items()})  # one unbatched image
    assert len(evaluator) == 2 and _flat(evaluator.compute()) == pytest.approx(_flat(stacked), nan_ok=True)
    as_list = evaluate(
        [{k: v[:1] for k, v in p.items()}, {k: v[1:] for k, v in p.items()}],
        [{k: v[:1] for k, v in t.items()}, {k: v[1:] for k, v in t.items()}],
        NAMES,
    )
    assert _flat(as_list) == pytest.approx(_flat(stacked), nan_ok=True)


def test_no_detections_at_all_scores_zero():
    m = evaluate(_pad([[], []], 3), _targets(GT, 4), NAMES)
    assert m["AP"] == 0.0 and m["voc_AP50_all"] == 0.0 and m["per_class_AP"]["dog"] == 0.0


def test_coco_wiring_matches_pycocotools_on_files(tmp_path):
    rng = np.random.default_rng(0)
    gt_rows, det_rows = [], []
    for _ in range(6):  # random overlapping boxes: many IoUs between the thresholds
        boxes = rng.uniform(0, 150, (5, 2))
        boxes = np.concatenate([boxes, boxes + rng.uniform(5, 80, (5, 2))], 1)
        labels = rng.integers(1, 4, 5)
        gt_rows.append([(b, int(lab)) for b, lab in zip(boxes, labels)])
        pick = rng.integers(0, 5, 8)  # near-duplicates, misses, and some wrong labels
        jitter = boxes[pick] + rng.normal(0, 3, (8, 4))
        det_labels = np.where(rng.random(8) < 0.8, labels[pick], rng.integers(1, 4, 8))
        det_rows.append([(b, float(s), int(lab)) for b, s, lab in zip(jitter, rng.random(8), det_labels)])
    ours = evaluate(_pad(det_rows, 10), _targets(gt_rows, 6), NAMES)

    image_ids = [17, 42, 5, 8, 99, 1000]  # anything: pycocotools does not need 1..N
    images = [{"id": i, "width": 300, "height": 300, "file_name": f"{i}.jpg"} for i in image_ids]
    anns = [
        {
            "id": n + 1,
            "image_id": image_ids[i],
            "category_id": lab,
            "iscrowd": 0,
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
            "area": float((b[2] - b[0]) * (b[3] - b[1])),
        }
        for n, (i, b, lab) in enumerate((i, b, lab) for i, row in enumerate(gt_rows) for b, lab in row)
    ]
    path = tmp_path / "gt.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": anns,
                "categories": [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)],
            }
        )
    )
    results = [
        {
            "image_id": image_ids[i],
            "category_id": lab,
            "score": s,
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
        }
        for i, row in enumerate(det_rows)
        for b, s, lab in row
    ]
    coco = COCO(str(path))
    e = COCOeval(coco, coco.loadRes(results), "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
    assert 0.05 < e.stats[0] < 0.95, "the fixture should be neither trivial nor hopeless"
    for k, key in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")):
        assert ours[key] == pytest.approx(e.stats[k], nan_ok=True) if e.stats[k] > -1 else np.isnan(ours[key]), key
    for k, name in enumerate(NAMES):
        p = e.eval["precision"][:, :, k, 0, -1]
        assert ours["per_class_AP"][name] == pytest.approx(p[p > -1].mean())


# ---------------------------------------------------------------------------------
# Whole datasets: every annotated box, original pixels, pycocotools on files.

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _pycocotools(gt_path, results):
    """COCO(file), loadRes, COCOeval: the official recipe, untouched."""
    coco = COCO(str(gt_path))
    e = COCOeval(coco, coco.loadRes(results), "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
    per_class = {}
    for k, cat_id in enumerate(e.params.catIds):
        p = e.eval["precision"][:, :, k, 0, -1]
        per_class[coco.cats[cat_id]["name"]] = p[p > -1].mean() if (p > -1).any() else float("nan")
    return e.stats, per_class


def _assert_matches_pycocotools(metrics, stats, per_class):
    for k, name in enumerate(STAT_NAMES):
        if stats[k] > -1:
            assert metrics["coco_stats"][name] == pytest.approx(stats[k], abs=1e-9), name
        else:
            assert np.isnan(metrics["coco_stats"][name]), name
    for k, name in enumerate(("AP", "AP50", "AP75")):
        assert metrics[name] == pytest.approx(stats[k], abs=1e-9), name
    assert metrics["per_class_AP"] == pytest.approx(per_class, abs=1e-9, nan_ok=True)


def _random_boxes(rng, n, h, w, lo=4.0, hi=0.4):
    """[n, 4] xyxy boxes inside an h x w image, sides in [lo, hi * side]."""
    bw, bh = rng.uniform(lo, hi * w, n), rng.uniform(lo, hi * h, n)
    x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    return np.stack([x, y, x + bw, y + bh], 1)


def _jittered_detections(rng, gt_boxes, gt_labels, h, w, num_classes, extra):
    """Hits with noise, wrong labels, misses and false positives for one image."""
    boxes, scores, labels = [], [], []
    for box, label in zip(gt_boxes, gt_labels):
        if rng.random() < 0.8:
            side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
            boxes.append(box + rng.normal(0, 0.08, 4) * side)
            labels.append(label if rng.random() < 0.85 else int(rng.integers(1, num_classes + 1)))
            scores.append(rng.random())
    for box in _random_boxes(rng, extra, h, w):
        boxes.append(box), labels.append(int(rng.integers(1, num_classes + 1))), scores.append(rng.random() * 0.6)
    return {
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "scores": np.asarray(scores, np.float32),
        "labels": np.asarray(labels, np.int32),
    }


# Non-contiguous ids, listed out of order; sizes of several aspect ratios; image 55 has 25 objects.
COCO_IMAGES = {101: (480, 640), 7: (500, 300), 55: (200, 200), 1000: (256, 1024)}  # id: (height, width)
COCO_CATEGORIES = [{"id": 12, "name": "bird"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


@pytest.fixture
def coco_file(tmp_path):
    """An instances file with crowds, mask-like areas, a zero-width box, and detections per index."""
    rng = np.random.default_rng(11)
    cat_ids = [c["id"] for c in COCO_CATEGORIES]
    annotations, ann_ids = [], iter(rng.permutation(np.arange(1, 10_000))[:200].tolist())
    for image_id, (h, w) in COCO_IMAGES.items():
        n = 25 if image_id == 55 else int(rng.integers(4, 9))
        for box in _random_boxes(rng, n, h, w):
            bw, bh = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": next(ann_ids),
                    "image_id": image_id,
                    "category_id": int(rng.choice(cat_ids)),
                    "bbox": [float(box[0]), float(box[1]), float(bw), float(bh)],
                    "area": float(bw * bh * rng.uniform(0.5, 1.0)),
                    "iscrowd": 0,
                }
            )
        if image_id != 55:  # a crowd region over a third of the image
            annotations.append(
                {
                    "id": next(ann_ids),
                    "image_id": image_id,
                    "category_id": int(rng.choice(cat_ids)),
                    "bbox": [0.0, 0.0, w / 3, h / 3],
                    "area": w * h / 12,
                    "iscrowd": 1,
                }
            )
    annotations.append(
        {"id": 20_000, "image_id": 7, "category_id": 3, "bbox": [5.0, 5.0, 0.0, 9.0], "area": 0.0, "iscrowd": 0}
    )
    images = [{"id": i, "file_name": f"{i}.jpg", "height": h, "width": w} for i, (h, w) in COCO_IMAGES.items()]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}))
    (tmp_path / "images").mkdir()
    for image in images:  # the dataset checks that every listed image exists; no pixel is read
        (tmp_path / "images" / image["file_name"]).touch()
    ds = COCODataset(path, tmp_path / "images")

    detections = []
    for i, image_id in enumerate(sorted(COCO_IMAGES)):
        ann = ds.annotation(i)
        det = _jittered_detections(
            rng,
            ann["boxes"][~ann["ignore"]],
            ann["labels"][~ann["ignore"]],
            *COCO_IMAGES[image_id],
            num_classes=3,
            extra=4,
        )
        crowd = ann["boxes"][ann["ignore"]]
        if len(crowd):  # detections inside a crowd region: neither hits nor misses
            inside = crowd[0] * np.array([1, 1, 0.5, 0.5]) + np.array([2, 2, 0, 0])
            det = {
                k: np.concatenate([det[k], v])
                for k, v in (
                    ("boxes", inside[None].astype(np.float32)),
                    ("scores", np.float32([0.95])),
                    ("labels", ann["labels"][ann["ignore"]][:1]),
                )
            }
        detections.append(det)
    return ds, path, annotations, detections


def _independent_results(detections):
    """COCO results from the test's own id maps: index -> sorted image id, label -> sorted category id."""
    image_ids, cat_ids = sorted(COCO_IMAGES), sorted(c["id"] for c in COCO_CATEGORIES)
    return [
        {
            "image_id": image_ids[i],
            "category_id": cat_ids[int(lab) - 1],
            "score": float(s),
            "bbox": [float(b[0]), float(b[1]), float(b[2]) - float(b[0]), float(b[3]) - float(b[1])],
        }
        for i, det in enumerate(detections)
        for b, s, lab in zip(det["boxes"].astype(np.float64), det["scores"], det["labels"])
    ]


def test_coco_dataset_metrics_equal_pycocotools_on_the_original_file(coco_file):
    ds, path, annotations, detections = coco_file
    assert ds.dropped_invalid_boxes == 1 and max(ds.train_object_counts()) == 25  # more than --max-boxes 16
    results = _independent_results(detections)
    assert coco_results(ds, detections) == results
    metrics = evaluate_dataset(ds, detections)
    stats, per_class = _pycocotools(path, results)
    assert 0.1 < stats[0] < 0.9, "the fixture should be neither trivial nor hopeless"
    _assert_matches_pycocotools(metrics, stats, per_class)
    official = coco_evaluate_official(path, results)
    _assert_matches_pycocotools({"coco_stats": official, **official}, stats, per_class)
    np.testing.assert_allclose(official["stats"], stats, rtol=0, atol=1e-9)
    # Ground truth counted per class: every non-crowd box the loader keeps (not the zero-width one).
    expected = {
        c["name"]: sum(1 for a in annotations if a["category_id"] == c["id"] and not a["iscrowd"] and a["bbox"][2] > 0)
        for c in COCO_CATEGORIES
    }
    assert metrics["num_ground_truth"] == expected == num_ground_truth(ds)
    assert sum(expected.values()) > 40 and metrics["num_images"] == 4


def test_crowd_regions_swallow_detections_and_count_for_nothing(coco_file):
    ds, path, _, detections = coco_file
    without_crowd_hits = [{k: v[:-1] for k, v in d.items()} if i != 1 else d for i, d in enumerate(detections)]
    # Index 1 (image 55) has no crowd region, so its detections are unchanged; elsewhere the last one sat on a crowd.
    base, trimmed = evaluate_dataset(ds, detections), evaluate_dataset(ds, without_crowd_hits)
    for key in ("AP", "AP50", "AP75"):
        assert base[key] == pytest.approx(trimmed[key], abs=1e-12), key
    # VOC's rule ignores a detection only when its IoU with the crowd box exceeds 0.5; these
    # cover a quarter of it (COCO's crowd IoU, intersection over the detection, is 1).
    assert base["voc_AP50_all"] < trimmed["voc_AP50_all"]
    stats, _ = _pycocotools(path, _independent_results(without_crowd_hits))
    assert base["AP"] == pytest.approx(stats[0], abs=1e-9)


def test_empty_results_score_zero(coco_file):
    ds, path, _, _ = coco_file
    metrics = evaluate_dataset(ds, [None] * len(ds))
    assert metrics["AP"] == 0.0 and metrics["voc_AP50_all"] == 0.0 and metrics["num_detections"] == 0
    official = coco_evaluate_official(path, [])
    assert official["AP"] == 0.0 and len(official["stats"]) == 12
    assert official["per_class_AP"] == {"cat": 0.0, "dog": 0.0, "bird": 0.0}
    with pytest.raises(ValueError, match=r"image ids \[999\]"):
        coco_evaluate_official(path, [{"image_id": 999, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])


def _obj(name, box, difficult=0):
    x1, y1, x2, y2 = box
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    )


def _voc(tmp_path, images):
    """A VOCdevkit folder from {stem: ((height, width), [(name, 1-based box, difficult)])}."""
    root = tmp_path / "VOC"
    for sub in ("Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True)
    for stem, ((h, w), objects) in images.items():
        Image.fromarray(np.full((h, w, 3), 60, np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
        body = "".join(_obj(*o) for o in objects)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename>{body}</annotation>"
        )
    return VOCDataset(root)


def _random_voc(tmp_path, rng):
    images = {}
    for stem, (h, w) in {"p": (120, 200), "q": (240, 90), "r": (160, 160)}.items():
        boxes = np.round(_random_boxes(rng, int(rng.integers(5, 10)), h, w))
        images[stem] = (
            (h, w),
            [
                (
                    str(rng.choice(["cat", "dog", "horse"])),
                    (int(b[0]) + 1, int(b[1]) + 1, int(b[2]), int(b[3])),
                    int(rng.random() < 0.2),
                )
                for b in boxes
            ],
        )
    return _voc(tmp_path, images)


def test_voc_dataset_coco_metrics_equal_pycocotools_and_voc_metrics_equal_the_devkit_path(tmp_path):
    rng = np.random.default_rng(5)
    ds = _random_voc(tmp_path, rng)
    anns = [ds.annotation(i) for i in range(len(ds))]
    assert any(a["ignore"].any() for a in anns), "the fixture needs difficult objects"
    detections = {
        i: _jittered_detections(rng, a["boxes"], a["labels"], a["height"], a["width"], 3, extra=3)
        for i, a in enumerate(anns)
    }
    metrics = evaluate_dataset(ds, detections)

    path = tmp_path / "voc_as_coco.json"
    path.write_text(json.dumps(coco_ground_truth(ds)))
    stats, per_class = _pycocotools(path, coco_results(ds, detections))
    assert 0.05 < stats[0] < 0.95
    _assert_matches_pycocotools(metrics, stats, per_class)

    # VOC AP: the padded evaluator, given room for every box, runs the same devkit rules.
    m = max(len(a["labels"]) for a in anns)
    padded_dets = _pad(
        [[(b, s, lab) for b, s, lab in zip(d["boxes"], d["scores"], d["labels"])] for d in detections.values()], 16
    )
    padded_gt = _targets(
        [[(b, lab) for b, lab in zip(a["boxes"], a["labels"])] for a in anns],
        m,
        difficult=[(i, j) for i, a in enumerate(anns) for j in np.flatnonzero(a["ignore"])],
    )
    devkit = evaluate(padded_dets, padded_gt, ds.class_names)
    for key in ("voc_AP50_11pt", "voc_AP50_all"):
        assert metrics[key] == pytest.approx(devkit[key], abs=1e-12), key
    assert metrics["per_class_voc_AP50"] == pytest.approx(devkit["per_class_voc_AP50"], abs=1e-12, nan_ok=True)
    assert metrics["num_ground_truth"] == {
        n: sum(int(((a["labels"] == k) & ~a["ignore"]).sum()) for a in anns)
        for k, n in enumerate(ds.class_names, start=1)
    }


def test_every_ground_truth_box_counts_whatever_max_boxes_is(tmp_path):
    # 40 objects on a 5 x 8 grid, all of different sizes; the detector finds the 16 largest exactly.
    objects, k = [], 0
    for row in range(5):
        for col in range(8):
            side = 4 + k // 2  # 1-based inclusive sides 5..24 px (by pairs, distinct areas via the offset)
            x, y = 1 + col * 50, 1 + row * 50
            objects.append(("cat", (x, y, x + side + (k % 2), y + side)))
            k += 1
    ds = _voc(tmp_path, {"many": ((256, 416), objects)})
    ann = ds.annotation(0)
    area = (ann["boxes"][:, 2] - ann["boxes"][:, 0]) * (ann["boxes"][:, 3] - ann["boxes"][:, 1])
    assert len(ann["boxes"]) == 40 and len(np.unique(area)) == 40
    largest = np.argsort(-area)[:16]
    found = {
        "boxes": ann["boxes"][largest],
        "scores": np.linspace(0.9, 0.5, 16, dtype=np.float32),
        "labels": ann["labels"][largest],
    }

    # Before: the loader's padded targets keep the 16 largest boxes, and the padded evaluation sees only those.
    example = preprocess(ds[0], canvas=(256, 416))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "keeping the 16 largest"
        batch = collate([example], max_boxes=16)
    padded = _pad([[(b, s, lab) for b, s, lab in zip(found["boxes"], found["scores"], found["labels"])]], 16)
    before = evaluate(padded, batch, ds.class_names)
    # After: every annotated box is in the denominator.
    after = evaluate_dataset(ds, [found])
    print(
        f"padded to 16 boxes: AP {before['AP']:.4f}, VOC AP50 all {before['voc_AP50_all']:.4f}, "
        f"11pt {before['voc_AP50_11pt']:.4f}; every box: AP {after['AP']:.4f}, VOC AP50 all "
        f"{after['voc_AP50_all']:.4f}, 11pt {after['voc_AP50_11pt']:.4f}, AR100 {after['coco_stats']['AR100']:.4f}"
    )
    assert before["AP"] == pytest.approx(1.0) and before["voc_AP50_all"] == pytest.approx(1.0)
    assert after["num_ground_truth"] == {"cat": 40}
    assert after["voc_AP50_all"] == pytest.approx(16 / 40)  # precision 1 up to recall 0.4
    assert after["voc_AP50_11pt"] == pytest.approx(5 / 11)  # recall thresholds 0, .1, .2, .3, .4
    assert after["AP"] == pytest.approx(41 / 101)  # COCO recall thresholds 0, .01, ..., .40
    assert after["coco_stats"]["AR100"] == pytest.approx(0.4)


def test_unpadded_detections_return_to_original_pixels(tmp_path):
    rng = np.random.default_rng(8)
    ds = _random_voc(tmp_path, rng)
    examples = [preprocess(ds[i], canvas=128, longer_side=128) for i in range(len(ds))]
    assert any(abs(float(e["scale"][0]) - 1.0) > 0.1 for e in examples)
    batch = collate(examples, max_boxes=16, batch_size=4)  # a fourth, padding row
    predictions = {
        "boxes": batch["boxes"],
        "scores": np.where(batch["valid"], 0.9, 0.0).astype(np.float32),
        "labels": batch["labels"],
        "valid": batch["valid"],
    }
    predictions["labels"][0, -1], predictions["valid"][0, -1] = 1, False  # an invalid row is dropped
    dets = unpad_detections(predictions, batch)
    assert len(dets) == 3
    for i, det in enumerate(dets):
        ann = ds.annotation(i)
        np.testing.assert_allclose(det["boxes"], ann["boxes"], rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(det["labels"], ann["labels"])
    metrics = evaluate_dataset(ds, dets)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["voc_AP50_all"] == pytest.approx(1.0)


def test_a_crowded_image_counts_every_detection_up_to_max_detections():
    """300 objects on one image, each found exactly: COCO's standard maxDets caps recall at
    100 of them (AP 34/101 on the 101 recall points), maxDets (1, 10, 300) counts them all."""
    rows, cols = np.divmod(np.arange(300), 20)
    boxes = np.stack([cols * 20.0, rows * 20.0, cols * 20.0 + 16, rows * 20.0 + 16], 1)
    gt = {
        "images": [{"id": 1, "height": 400, "width": 400}],
        "categories": [{"id": 1, "name": "tree"}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [x0, y0, 16.0, 16.0], "area": 256.0, "iscrowd": 0}
            for i, (x0, y0, _, _) in enumerate(boxes.tolist())
        ],
    }
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [x0, y0, 16.0, 16.0], "score": 1.0 - i / 1000}
        for i, (x0, y0, _, _) in enumerate(boxes.tolist())
    ]
    capped = coco_evaluate_official(gt, results)
    counted = coco_evaluate_official(gt, results, max_detections=300)
    assert capped["max_dets"] == [1, 10, 100] and counted["max_dets"] == [1, 10, 300]
    for key in ("AP", "AP50", "AP75", "APs"):
        assert capped[key] == pytest.approx(34 / 101), key
        assert counted[key] == pytest.approx(1.0), key
    assert capped["AR100"] == pytest.approx(1 / 3) and counted["AR300"] == pytest.approx(1.0)
    assert capped["per_class_AP"]["tree"] == pytest.approx(34 / 101)
    assert counted["per_class_AP"]["tree"] == pytest.approx(1.0)
    # pycocotools itself, run independently at maxDets (1, 10, 300): its summarize reads
    # AP@[.5:.95] at 100 detections whatever maxDets are, and reports -1; the others agree.
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    e = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    e.params.maxDets = [1, 10, 300]
    e.evaluate()
    e.accumulate()
    with contextlib.redirect_stdout(io.StringIO()):
        e.summarize()
    assert e.stats[0] == -1
    for k, key in enumerate(("AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR300"), start=1):
        expected = e.stats[k]
        assert counted[key] == pytest.approx(expected) if expected > -1 else np.isnan(counted[key]), key
