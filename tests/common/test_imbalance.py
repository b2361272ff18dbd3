"""Class-weighted cross-entropy (issue 13, item 1): the weights and their DP-SGD validity."""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from common.errors import ConfigError, DataError
from common.imbalance import (
    WeightedCrossEntropyLoss,
    balanced_class_weights,
    class_counts,
)
from common.tasks import get_task


def _mean_over_examples(counts, weights):
    return float(np.dot(counts, weights) / np.sum(counts))


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        # sklearn "balanced": N / (K * n_c)
        ([30, 10], [40 / 60, 40 / 20]),
        ([50, 30, 20], [100 / 150, 100 / 90, 100 / 60]),
        ([815, 2262], [3077 / 1630, 3077 / 4524]),  # a demo site's normal/pneumonia counts
        ([7], [1.0]),
    ],
)
def test_weights_are_inverse_pooled_frequencies_with_mean_one(counts, expected):
    # Execute
    weights = balanced_class_weights(counts, max_weight=10.0)
    # Assert: inverse frequency, and mean 1 over examples
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    assert _mean_over_examples(counts, weights) == pytest.approx(1.0)


def test_rare_classes_are_capped_and_the_rest_renormalised():
    # Prepare: the demo's site-1 has 35 normal vs 838 pneumonia (uncapped: 12.47 / 0.52)
    counts = [35, 838]
    # Execute
    weights = balanced_class_weights(counts, max_weight=10.0)
    # Assert: normal is capped at 10; pneumonia takes the rest of the mass (873 - 350)
    np.testing.assert_allclose(weights, [10.0, 523 / 838])
    assert _mean_over_examples(counts, weights) == pytest.approx(1.0)


def test_cap_keeps_inverse_frequency_ratios_among_uncapped_classes():
    # Prepare: 1 + 1 + 100 examples, cap 1.5 -> the two rare classes are capped
    counts = [1, 100, 1]
    # Execute
    weights = balanced_class_weights(counts, max_weight=1.5)
    # Assert: hand-computed water-filling: (102 - 1.5 * 2) / 100 for the big class
    np.testing.assert_allclose(weights, [1.5, 0.99, 1.5])
    assert weights.max() <= 1.5
    assert _mean_over_examples(counts, weights) == pytest.approx(1.0)


def test_absent_class_gets_the_cap_and_does_not_shift_the_mean():
    weights = balanced_class_weights([0, 10, 30], max_weight=5.0)
    np.testing.assert_allclose(weights, [5.0, 2.0, 20 / 30])
    assert _mean_over_examples([0, 10, 30], weights) == pytest.approx(1.0)


def test_cap_of_one_turns_weighting_off():
    np.testing.assert_allclose(balanced_class_weights([3, 97], max_weight=1.0), [1.0, 1.0])


@pytest.mark.parametrize("counts", [[], [0, 0], [-1, 5], [[1, 2]], [1.0, float("nan")]])
def test_bad_counts_are_refused(counts):
    with pytest.raises(DataError):
        balanced_class_weights(counts)


def test_cap_below_one_names_the_config_key():
    with pytest.raises(ConfigError, match="class-weight-max"):
        balanced_class_weights([1, 2], max_weight=0.5)


def test_class_counts_count_every_class_and_refuse_bad_labels():
    np.testing.assert_array_equal(class_counts(np.array([1, 1, 0, 1]), num_classes=3), [1, 3, 0])
    with pytest.raises(DataError, match="labels must be in"):
        class_counts(np.array([0, 2]), num_classes=2)
    with pytest.raises(DataError, match="classification"):
        class_counts(np.zeros((2, 4, 4), dtype=np.int64), num_classes=2)


def test_weighted_loss_is_the_batch_mean_of_weighted_per_example_losses():
    # Prepare: two examples, hand-computable cross-entropies (uniform logits -> log 2)
    logits = torch.zeros(2, 2)
    targets = torch.tensor([0, 1])
    weights = torch.tensor([3.0, 1.0])
    # Execute
    loss = WeightedCrossEntropyLoss(weights)(logits, targets)
    # Assert: (3 log 2 + 1 log 2) / 2 = 2 log 2, not torch's weighted mean (log 2)
    assert float(loss) == pytest.approx(2 * np.log(2))
    torch_mean = nn.CrossEntropyLoss(weight=weights)(logits, targets)
    assert float(torch_mean) == pytest.approx(np.log(2))


def _tiny_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    y = torch.tensor([0, 1, 1, 0, 1])
    weights = torch.tensor([4.0, 0.5])
    return model, x, y, weights


def _manual_per_example_grads(model, x, y, weights):
    """Gradient of w[y_i] * CE_i for each example alone, flattened: (B, P)."""
    rows = []
    for xi, yi in zip(x, y, strict=True):
        model.zero_grad()
        loss = weights[yi] * nn.functional.cross_entropy(model(xi[None]), yi[None])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def _opacus_per_sample_grads(model, x, y, criterion):
    gsm = GradSampleModule(model, loss_reduction="mean")  # what make_private builds
    criterion(gsm(x), y).backward()
    out = torch.cat([p.grad_sample.flatten(1) for p in model.parameters()], dim=1)
    gsm.remove_hooks()
    return out


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients_are_scaled_by_each_examples_weight():
    # Prepare
    model, x, y, weights = _tiny_batch()
    expected = _manual_per_example_grads(model, x, y, weights)
    # Execute: Opacus's hooks (loss_reduction="mean") on the weighted batch-mean loss
    got = _opacus_per_sample_grads(model, x, y, WeightedCrossEntropyLoss(weights))
    # Assert: example i's per-sample gradient is w[y_i] * grad CE_i, alone
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_torch_weighted_mean_would_mix_other_examples_into_each_gradient():
    # Prepare: the tempting alternative, CrossEntropyLoss(weight=w) (divides by sum w)
    model, x, y, weights = _tiny_batch()
    expected = _manual_per_example_grads(model, x, y, weights)
    # Execute
    got = _opacus_per_sample_grads(model, x, y, nn.CrossEntropyLoss(weight=weights))
    # Assert: off by B / sum_j w[y_j], a factor set by the rest of the batch
    factor = len(y) / float(weights[y].sum())
    torch.testing.assert_close(got, expected * factor, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, expected)


def test_tasks_build_the_weighted_loss_only_where_it_applies():
    w = torch.tensor([2.0, 0.5])
    assert isinstance(
        get_task("classification").make_loss(class_weights=w), WeightedCrossEntropyLoss
    )
    assert isinstance(get_task("tabular").make_loss(class_weights=w), WeightedCrossEntropyLoss)
    assert isinstance(get_task("classification").make_loss(), nn.CrossEntropyLoss)
    with pytest.raises(ConfigError, match="class-weighting"):
        get_task("segmentation").make_loss(class_weights=w)
