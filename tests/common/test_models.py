import pytest
import torch
from opacus.validators import ModuleValidator

from common.errors import ModelError
from common.models import get_model, get_spec, list_models


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_is_dp_compatible_and_has_declared_shape(name):
    # Prepare
    spec = get_spec(name)
    model = get_model(name)
    # Execute
    errors = ModuleValidator.validate(model, strict=False)
    out = model(torch.zeros((2, *spec.input_shape), dtype=torch.float32))
    # Assert
    assert errors == []
    assert out.shape[0] == 2


def test_unknown_model_suggests_closest_name():
    with pytest.raises(ModelError, match="Did you mean 'cnn'") as info:
        get_model("cnm")
    assert isinstance(info.value, KeyError)


def test_same_seed_gives_same_initial_weights():
    torch.manual_seed(0)
    a = get_model("cnn").state_dict()
    torch.manual_seed(0)
    b = get_model("cnn").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
