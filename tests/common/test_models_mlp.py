"""The tabular MLP / logistic regression (common/models/mlp.py)."""

import pytest
import torch
from opacus.validators import ModuleValidator

from common.models import get_model, get_spec
from common.models.mlp import TabularMLP


@pytest.mark.parametrize("name", ["heart-mlp", "heart-logreg"])
def test_registered_dp_compatible_and_maps_features_to_logits(name):
    spec = get_spec(name)
    assert spec.task == "tabular"
    assert spec.input_shape == (13, 1, 1)
    model = get_model(name, num_classes=2)
    assert ModuleValidator.validate(model, strict=False) == []
    out = model(torch.zeros(5, 13, 1, 1))
    assert out.shape == (5, 2)


def test_logistic_regression_has_one_linear_layer():
    model = TabularMLP(in_features=3, num_classes=2, hidden=())
    assert sum(p.numel() for p in model.parameters()) == 3 * 2 + 2


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="in_features"):
        TabularMLP(in_features=0)
    with pytest.raises(ValueError, match="hidden"):
        TabularMLP(in_features=3, hidden=(0,))
