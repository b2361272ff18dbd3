"""Shared fixtures: real data location, tiny site datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    env = os.environ.get("MEDFED_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real public data (``../shared/data`` or ``$MEDFED_DATA_DIR``).

    Missing data skips locally but FAILS under CI (``CI=true``): a CI run that silently
    skipped every real-data test would prove nothing.
    """
    path = _shared_data_dir()
    if not path.is_dir():
        msg = f"shared data not found at {path}; set MEDFED_DATA_DIR"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def pneumonia_npz(shared_data_dir: Path) -> Path:
    """Path of the real PneumoniaMNIST file."""
    path = shared_data_dir / "pneumoniamnist" / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.fail(f"{path} missing from the shared data")
    return path


@pytest.fixture
def server_identity(monkeypatch):
    """Flower's strategies build messages with the ServerApp's task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1 if attr == "_run_id" else 0)
