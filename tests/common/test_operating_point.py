"""The operating point: histograms, the pooled ROC at bin resolution, threshold choice."""

import math

import numpy as np
import pytest

from common.errors import ConfigError, DataError
from common.operating_point import (
    OperatingPoint,
    auroc_from_histogram,
    choose_threshold,
    confusion_at,
    roc_from_histogram,
    score_histogram,
)


def test_histogram_bins_scores_per_true_class():
    # Prepare: bin b holds b/B <= p < (b+1)/B; p = 1 falls in the last bin
    scores = [0.0, 0.09, 0.1, 0.55, 1.0, 0.95]
    labels = [0, 0, 0, 1, 1, 0]
    # Execute
    hist = score_histogram(scores, labels, bins=10)
    # Assert
    assert hist.shape == (2, 10) and hist.sum() == 6
    assert hist[0].tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert hist[1].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 1]


def test_youden_point_of_a_hand_made_pooled_case():
    # Prepare: 4 bins (thresholds 0, .25, .5, .75, 1), two sites of 10 + 10 images
    site_a = np.array([[6, 2, 1, 1], [0, 1, 3, 6]], float)
    site_b = np.array([[1, 3, 6, 0], [0, 0, 3, 7]], float)
    pooled = site_a + site_b  # neg [7, 5, 7, 1], pos [0, 1, 6, 13]
    # by hand at t = j/4: sens = tail(pos)/20, spec = head(neg)/20
    #   j=0: 1.00, 0.00 -> J 0.00      j=1: 1.00, 0.35 -> J 0.35
    #   j=2: 0.95, 0.60 -> J 0.55      j=3: 0.65, 0.95 -> J 0.60   j=4: J 0
    # Execute
    op = choose_threshold(pooled, method="youden", server_round=7)
    _, sens, spec = roc_from_histogram(pooled)
    # Assert
    np.testing.assert_allclose(sens, [1.0, 1.0, 0.95, 0.65, 0.0])
    np.testing.assert_allclose(spec, [0.0, 0.35, 0.60, 0.95, 1.0])
    assert op.threshold == 0.75 and op.round == 7 and op.validation_examples == 40
    assert op.sensitivity == pytest.approx(0.65) and op.specificity == pytest.approx(0.95)
    # site a alone would pick 0.5: pooling is not averaging the sites' choices
    assert choose_threshold(site_a).threshold == 0.5
    # the ROC is scale invariant (SecAgg's weighted mean is the sum up to a factor)
    assert choose_threshold(pooled * 0.013).threshold == op.threshold


def test_target_sensitivity_takes_the_highest_threshold_that_reaches_it():
    pooled = np.array([[7, 5, 7, 1], [0, 1, 6, 13]], float)  # sens 1, 1, .95, .65, 0
    op = choose_threshold(pooled, method="sensitivity", target_sensitivity=0.9)
    assert op.threshold == 0.5 and op.sensitivity == pytest.approx(0.95)
    assert choose_threshold(pooled, method="sensitivity", target_sensitivity=1.0).threshold == 0.25
    with pytest.raises(ConfigError, match="operating-point-sensitivity"):
        choose_threshold(pooled, method="sensitivity", target_sensitivity=0.0)


def test_auroc_at_bin_resolution_matches_the_exact_one_when_bins_separate_scores():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
    scores = np.round(scores, 2)  # on the bins' 0.01 grid: a bin never splits a tie
    hist = score_histogram(scores, labels, bins=100)
    assert auroc_from_histogram(hist) == pytest.approx(roc_auc_score(labels, scores), abs=2e-3)


def test_roc_refuses_a_histogram_without_both_classes_or_with_bad_counts():
    with pytest.raises(DataError, match="both classes"):
        roc_from_histogram(np.array([[3.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(DataError, match="counts"):
        roc_from_histogram(np.array([[3.0, -1.0], [1.0, 1.0]]))
    with pytest.raises(DataError, match=r"\(2, B\)"):
        roc_from_histogram(np.ones((3, 4)))


def test_confusion_at_threshold():
    scores = np.array([0.1, 0.4, 0.6, 0.9, 0.3, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 1])
    at_half = confusion_at(scores, labels, threshold=0.5)
    assert (at_half["tp"], at_half["fp"], at_half["tn"], at_half["fn"]) == (2, 1, 2, 1)
    assert at_half["sensitivity"] == pytest.approx(2 / 3)
    low = confusion_at(scores, labels, threshold=0.25)
    assert low["sensitivity"] == 1.0 and low["specificity"] == pytest.approx(1 / 3)
    assert math.isnan(confusion_at([0.9], [1], threshold=0.5)["specificity"])


def test_operating_point_round_trips_and_refuses_nonsense():
    op = choose_threshold(np.array([[5, 1], [1, 5]], float))
    assert OperatingPoint.from_dict(op.as_dict()) == op
    with pytest.raises(DataError, match="threshold"):
        OperatingPoint.from_dict(op.as_dict() | {"threshold": 3.0})
    with pytest.raises(DataError, match="malformed"):
        OperatingPoint.from_dict({"threshold": 0.5})
