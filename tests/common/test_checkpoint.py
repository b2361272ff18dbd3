import re

import pytest
import torch

from common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from common.errors import DataError, DataNotFoundError
from common.models import get_model


def test_checkpoint_is_self_describing(tmp_path):
    # Prepare
    model = get_model("cnn", num_classes=2)
    ckpt = Checkpoint(
        model="cnn",
        model_kwargs={"num_classes": 2},
        task="classification",
        state_dict=model.state_dict(),
        round=7,
        metrics={"accuracy": 0.9},
    )
    # Execute
    save_checkpoint(tmp_path / "m.pt", ckpt)
    loaded = load_checkpoint(tmp_path / "m.pt")
    rebuilt = loaded.build_model()
    # Assert
    assert loaded.round == 7 and loaded.metrics == {"accuracy": 0.9}
    x = torch.rand(3, 1, 28, 28)
    model.eval()
    assert torch.allclose(rebuilt(x), model(x))


def test_foreign_files_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not a medfed checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(DataError):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(DataNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def _selected(**fields):
    return Checkpoint(
        model="cnn",
        model_kwargs={"num_classes": 2},
        task="classification",
        state_dict=get_model("cnn").state_dict(),
        round=4,
        metrics={"val-balanced-accuracy": 0.93, "val-num-examples": 40.0},
        **fields,
    )


def test_best_model_fields_round_trip(tmp_path):
    # Prepare: what the ServerApp writes as best_model.pt
    ckpt = _selected(selected_round=4, selection_metric="val-balanced-accuracy")
    # Execute
    save_checkpoint(tmp_path / "best_model.pt", ckpt)
    loaded = load_checkpoint(tmp_path / "best_model.pt")
    # Assert
    assert loaded.selected_round == 4 and loaded.selection_metric == "val-balanced-accuracy"
    assert loaded.metrics == ckpt.metrics
    # an ordinary checkpoint says it was not selected
    save_checkpoint(tmp_path / "round-004.pt", _selected())
    plain = load_checkpoint(tmp_path / "round-004.pt")
    assert plain.selected_round is None and plain.selection_metric is None


def test_a_checkpoint_from_before_model_selection_still_loads(tmp_path):
    # Prepare: the fields save_checkpoint wrote before selected-round / selection-metric
    save_checkpoint(tmp_path / "m.pt", _selected())
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    del raw["selected-round"], raw["selection-metric"]
    torch.save(raw, tmp_path / "old.pt")
    # Execute
    old = load_checkpoint(tmp_path / "old.pt")
    # Assert
    assert old.round == 4 and old.selected_round is None and old.selection_metric is None
    assert old.build_model() is not None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"selected-round": 3}, "field 'selected-round' must be None, or the integer 'round'"),
        ({"selected-round": True}, "field 'selected-round' must be"),
        ({"selection-metric": ["val-loss"]}, "field 'selection-metric' must be"),
        ({"selection-metric": "val loss\n"}, "field 'selection-metric' must be"),
        ({"selected-round": 4, "selection-metric": None}, "are set together"),
        ({"selected-round": None, "selection-metric": "val-loss"}, "are set together"),
    ],
)
def test_malformed_selection_fields_are_refused(tmp_path, fields, message):
    save_checkpoint(tmp_path / "m.pt", _selected(selected_round=4, selection_metric="val-loss"))
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    raw.update(fields)
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(DataError, match=re.escape(message)):
        load_checkpoint(tmp_path / "bad.pt")
