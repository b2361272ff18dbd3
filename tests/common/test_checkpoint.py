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
