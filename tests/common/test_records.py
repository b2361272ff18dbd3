import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from common.errors import ModelError
from common.records import load_record, state_to_record


def test_round_trip_preserves_every_tensor():
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    load_record(dst, state_to_record(src))
    assert torch.equal(src.weight, dst.weight) and torch.equal(src.bias, dst.bias)


def test_shape_mismatch_names_the_key():
    with pytest.raises(ModelError, match="'weight' is \\(2, 4\\)"):
        load_record(nn.Linear(3, 2), state_to_record(nn.Linear(4, 2)))


def test_missing_key_is_reported():
    rec = ArrayRecord({"weight": torch.zeros(2, 3)})
    with pytest.raises(ModelError, match="missing \\['bias'\\]"):
        load_record(nn.Linear(3, 2), rec)


def test_opacus_wrapper_keys_are_refused():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self._module = nn.Linear(2, 2)

    with pytest.raises(ModelError, match="_module"):
        state_to_record(Wrapped())
