import math

import numpy as np
import pytest

from common.metrics import classification_metrics


def test_hand_computed_binary_metrics():
    # Prepare: labels 1,1,0,0; predictions 1,0,0,1 -> TP=1 FN=1 TN=1 FP=1
    labels = np.array([1, 1, 0, 0])
    p1 = np.array([0.9, 0.4, 0.2, 0.6])
    probs = np.stack([1 - p1, p1], axis=1)
    # Execute
    m = classification_metrics(labels, probs)
    # Assert
    assert m["accuracy"] == 0.5
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5
    assert m["balanced-accuracy"] == 0.5
    assert m["f1"] == pytest.approx(0.5)
    # AUROC: positive scores {0.9, 0.4} vs negative {0.2, 0.6}: 3 of 4 pairs ordered
    assert m["auroc"] == pytest.approx(0.75)
    assert m["num-examples"] == 4


def test_single_class_gives_nan_auroc_not_an_error():
    m = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert math.isnan(m["auroc"]) and m["accuracy"] == 0.5
