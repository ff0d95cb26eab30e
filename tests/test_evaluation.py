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
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lucid_jax.evaluation import DetectionEvaluator, evaluate, voc_ap

NAMES = ("cat", "dog", "bird")
CAT_VOC_ALL, CAT_VOC_11, CAT_COCO = 4 / 9, 14 / 33, 134 / 303


def _pad(rows, k):
    """Per-image lists of (box, score, label) -> padded arrays with a valid mask."""
    out = {"boxes": np.zeros((len(rows), k, 4), np.float32), "scores": np.zeros((len(rows), k), np.float32),
           "labels": np.zeros((len(rows), k), np.int32), "valid": np.zeros((len(rows), k), bool)}
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


def test_voc_ap_interpolations_directly():
    recall, precision = np.array([0, 1 / 3, 2 / 3, 2 / 3]), np.array([0, 1 / 2, 2 / 3, 1 / 2])
    assert voc_ap(recall, precision) == pytest.approx(4 / 9)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(14 / 33)
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0])) == pytest.approx(1.0)
    assert voc_ap(np.zeros(0), np.zeros(0)) == 0.0


def test_perfect_detections_score_one():
    dets = [[(box, 0.9, label) for box, label in row] for row in GT]
    m = evaluate(_pad(dets, 4), _targets(GT, 3), NAMES)
    for key in ("AP", "AP50", "AP75", "voc_AP50_11pt", "voc_AP50_all"):
        assert m[key] == pytest.approx(1.0), key


def test_invalid_background_and_padding_rows_are_ignored():
    base = evaluate(_pad(DETS, 5), _targets(GT, 4), NAMES)
    noisy = _pad(DETS, 5)
    noisy["boxes"][:, 4], noisy["scores"][:, 4], noisy["labels"][:, 4] = [200, 200, 210, 210], 0.99, 1  # valid False
    noisy["boxes"][0, 3], noisy["scores"][0, 3], noisy["labels"][0, 3], noisy["valid"][0, 3] = [300, 0, 310, 9], 0.95, 0, True
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
    as_list = evaluate([{k: v[:1] for k, v in p.items()}, {k: v[1:] for k, v in p.items()}],
                       [{k: v[:1] for k, v in t.items()}, {k: v[1:] for k, v in t.items()}], NAMES)
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
    anns = [{"id": n + 1, "image_id": image_ids[i], "category_id": lab, "iscrowd": 0,
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
             "area": float((b[2] - b[0]) * (b[3] - b[1]))}
            for n, (i, b, lab) in enumerate((i, b, lab) for i, row in enumerate(gt_rows) for b, lab in row)]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]}))
    results = [{"image_id": image_ids[i], "category_id": lab, "score": s,
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
               for i, row in enumerate(det_rows) for b, s, lab in row]
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
