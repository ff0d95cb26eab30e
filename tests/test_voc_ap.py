"""Pascal VOC average precision from a precision-recall curve, all-point and the
VOC2007 11-point interpolation, on the hand-computed cat curve of test_evaluation.py."""

import numpy as np
import pytest

from lucid_jax.voc_ap import voc_ap


def test_voc_ap_interpolations_directly():
    recall, precision = np.array([0, 1 / 3, 2 / 3, 2 / 3]), np.array([0, 1 / 2, 2 / 3, 1 / 2])
    assert voc_ap(recall, precision) == pytest.approx(4 / 9)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(14 / 33)
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0])) == pytest.approx(1.0)
    assert voc_ap(np.zeros(0), np.zeros(0)) == 0.0
