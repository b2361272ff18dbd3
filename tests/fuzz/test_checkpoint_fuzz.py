"""Fuzzing the checkpoints ``medfed evaluate`` loads (issue 14, item 4).

A checkpoint is input from elsewhere. Whatever the file holds (fields missing or of the
wrong type, absurd model arguments, tensors that do not fit, pickled objects that are not
tensors, truncated or flipped bytes), :func:`common.checkpoint.load_checkpoint` and
:func:`common.export.load_model_file` either return a model or raise
:class:`~common.errors.DataError`, and ``medfed evaluate`` exits with code 2 and a
message, never a traceback; nothing beyond tensors is ever unpickled.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from common import cli
from common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from common.errors import DataError, MedfedError
from common.export import load_model_file
from common.models import get_model
from tests.cli_errors import assert_refused

FAST = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SLOW = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: Seconds one load may take; the checks run before any real model is built.
SECONDS_PER_FILE = 20.0

FIELDS = (
    "format",
    "version",
    "model",
    "model-kwargs",
    "task",
    "label-names",
    "round",
    "run-config",
    "metrics",
    "state-dict",
    "selected-round",
    "selection-metric",
)


def _valid_payload() -> dict[str, Any]:
    """A real checkpoint's content: a CNN of width 4, as save_checkpoint writes it."""
    torch.manual_seed(0)
    model = get_model("cnn", width=8)
    ckpt = Checkpoint(
        model="cnn",
        model_kwargs={"width": 8},
        task="classification",
        state_dict=model.state_dict(),
        round=3,
        label_names=["normal", "pneumonia"],
        run_config={"model": "cnn", "lr": 0.1},
        metrics={"val-loss": 0.5},
    )
    tmp = io.BytesIO()
    payload: dict[str, Any] = {
        "format": "medfed-checkpoint",
        "version": 1,
        "model": ckpt.model,
        "model-kwargs": dict(ckpt.model_kwargs),
        "task": ckpt.task,
        "label-names": list(ckpt.label_names),
        "round": ckpt.round,
        "run-config": dict(ckpt.run_config),
        "metrics": dict(ckpt.metrics),
        "state-dict": {k: v.detach().clone() for k, v in ckpt.state_dict.items()},
        "selected-round": None,
        "selection-metric": None,
    }
    torch.save(payload, tmp)  # the payload itself must be what torch saves
    return payload


PAYLOAD = _valid_payload()

# ----------------------------------------------------------------------- strategies

_tensors = st.builds(
    lambda shape, dtype: torch.zeros(shape, dtype=dtype),
    st.lists(st.integers(0, 4), max_size=4).map(tuple),
    st.sampled_from([torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool]),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
#: Anything ``torch.load(weights_only=True)`` can give back.
weights_only_values = st.recursive(
    st.one_of(_scalars, _tensors),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)
_absurd_ints = st.one_of(
    st.sampled_from([0, -1, 2**31, 2**63 - 1, 10**6, 10**9, 65, 1025, 4097, 10_001]),
    st.integers(),
)
#: Model arguments: names of the CNN's, of other models' and unknown ones; absurd values.
_model_kwargs = st.dictionaries(
    st.sampled_from(
        ["in_channels", "num_classes", "width", "depth", "hidden_size", "dp_layers", "bogus"]
    ),
    st.one_of(_absurd_ints, st.floats(), st.booleans(), st.text(max_size=8), st.none()),
    max_size=3,
)


@st.composite
def mutated_payloads(draw: st.DrawFn) -> Any:
    """A real checkpoint payload with one to three fields removed, retyped or made absurd."""
    if draw(st.integers(0, 19)) == 0:  # not a table at all
        return draw(weights_only_values)
    raw: dict[Any, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PAYLOAD.items()}
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(FIELDS))
        kind = draw(st.sampled_from(["drop", "replace", "kwargs", "state", "model"]))
        if kind == "drop":
            raw.pop(key, None)
        elif kind == "replace":
            raw[key] = draw(weights_only_values)
        elif kind == "kwargs":
            raw["model-kwargs"] = draw(_model_kwargs)
        elif kind == "model":
            raw["model"] = draw(
                st.sampled_from(["cnn", "unet", "gru", "lstm", "heart-mlp", "CNN", "", "nope"])
            )
            if draw(st.booleans()):
                raw["task"] = draw(
                    st.sampled_from(["classification", "segmentation", "tabular", "x"])
                )
        else:
            state = dict(raw["state-dict"]) if isinstance(raw.get("state-dict"), dict) else {}
            names = sorted(k for k in state if isinstance(k, str)) or ["w"]
            name = draw(st.sampled_from(names))
            change = draw(st.sampled_from(["drop", "extra", "shape", "dtype", "value", "key"]))
            if change == "drop":
                state.pop(name, None)
            elif change == "extra":
                state[name + ".extra"] = torch.zeros(2)
            elif change == "shape":
                state[name] = torch.zeros(draw(st.integers(0, 5)), 3)
            elif change == "dtype":
                old = state.get(name, torch.zeros(1))
                state[name] = torch.zeros(old.shape, dtype=torch.float64)
            elif change == "value":
                state[name] = draw(weights_only_values)
            else:
                state[draw(st.integers())] = torch.zeros(1)
            raw["state-dict"] = state
    return raw


def _write(path: Path, payload: Any) -> Path:
    torch.save(payload, path)
    return path


def _loads_or_refuses(path: Path) -> None:
    """The property: a model, or a DataError; never another exception; quick."""
    t0 = time.perf_counter()
    try:
        _, model = load_model_file(path)
    except DataError:
        pass
    else:
        assert isinstance(model, torch.nn.Module)
    assert time.perf_counter() - t0 < SECONDS_PER_FILE


# --------------------------------------------------------------------------- tests


@FAST
@given(payload=mutated_payloads())
@example(payload={**PAYLOAD, "model-kwargs": {"width": 10**9}})
@example(payload={**PAYLOAD, "model-kwargs": {"in_channels": 2**31}})
@example(payload={**PAYLOAD, "model-kwargs": {"width": True}})
@example(payload={**PAYLOAD, "state-dict": {1: torch.zeros(1)}})
@example(payload={**PAYLOAD, "label-names": "normal"})
@example(payload={**PAYLOAD, "round": math.nan})
@example(payload=[PAYLOAD])
def test_mutated_checkpoint_fields_load_or_are_refused(tmp_path: Path, payload: Any) -> None:
    # Prepare / Execute / Assert
    _loads_or_refuses(_write(tmp_path / "ckpt.pt", payload))


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """The saved checkpoint's bytes, truncated, flipped or overwritten."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        if not out:
            break
        pos = draw(st.integers(0, len(out) - 1))
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite"]))
        if kind == "truncate":
            del out[pos:]
        elif kind == "flip":
            out[pos] ^= draw(st.integers(1, 255))
        else:
            chunk = draw(st.binary(min_size=1, max_size=32))
            out[pos : pos + len(chunk)] = chunk
    return bytes(out)


def _saved_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(PAYLOAD, buf)
    return buf.getvalue()


SAVED = _saved_bytes()


def _central_directory_broken() -> bytes:
    """The zip's end record intact (``is_zipfile`` is true), its central directory not."""
    out = bytearray(SAVED)
    out[out.find(b"PK\x01\x02") + 1] ^= 0xFF
    return bytes(out)


@FAST
@given(data=mutated_bytes(SAVED))
@example(data=_central_directory_broken())  # found by fuzzing: BadZipFile escaped medfed evaluate
@example(data=SAVED[: len(SAVED) // 2])
@example(data=b"")
def test_mutated_checkpoint_bytes_load_or_are_refused(tmp_path: Path, data: bytes) -> None:
    # Prepare
    path = tmp_path / "ckpt.pt"
    path.write_bytes(data)
    # Execute / Assert
    _loads_or_refuses(path)


class _Trap:
    """A pickled object whose unpickling would create a file (code execution)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (Path.touch, (str(self.target),))


@pytest.mark.parametrize(
    "where", ["top", "state-dict", "model-kwargs", "metrics", "label-names", "nested"]
)
def test_non_tensor_pickles_are_refused_and_never_run(tmp_path: Path, where: str) -> None:
    # Prepare: a real checkpoint with an object that runs code when unpickled
    target = tmp_path / "ran"
    trap = _Trap(target)
    raw: Any = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PAYLOAD.items()}
    if where == "top":
        raw = trap
    elif where == "state-dict":
        raw["state-dict"]["conv"] = trap
    elif where == "model-kwargs":
        raw["model-kwargs"]["width"] = trap
    elif where == "metrics":
        raw["metrics"]["val-loss"] = trap
    elif where == "label-names":
        raw["label-names"] = [trap]
    else:
        raw["run-config"]["deep"] = [{"x": (1, trap)}]
    path = _write(tmp_path / "ckpt.pt", raw)
    # Execute
    with pytest.raises(DataError, match="not a readable medfed checkpoint"):
        load_model_file(path)
    # Assert
    assert not target.exists()


def test_numpy_arrays_in_a_checkpoint_are_refused(tmp_path: Path) -> None:
    # Prepare: numpy arrays unpickle through numpy's reconstructor (not a tensor)
    raw = {**PAYLOAD, "state-dict": {"w": np.zeros(3)}}
    path = _write(tmp_path / "ckpt.pt", raw)
    # Execute / Assert
    with pytest.raises(DataError):
        load_model_file(path)


# ------------------------------------------------------------------------ the CLI


runner = CliRunner()
cli._register_plugins()


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MedMNIST-format file (so evaluate never reaches the shared data)."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.array([[0], [1], [0], [1]], dtype=np.uint8)
    np.savez(path, val_images=images, val_labels=labels, train_images=images, train_labels=labels)
    return path


@pytest.mark.parametrize(
    "payload_or_bytes",
    [
        _central_directory_broken(),
        SAVED[:100],
        {**PAYLOAD, "model-kwargs": {"width": 10**9}},
        {**PAYLOAD, "model-kwargs": {"in_channels": 64, "width": 1024}},
        {k: v for k, v in PAYLOAD.items() if k != "state-dict"},
        {**PAYLOAD, "round": "three"},
        {"weights": torch.zeros(1)},
    ],
    ids=[
        "zip-central-dir",
        "truncated",
        "huge-width",
        "big-model",
        "no-state",
        "round-str",
        "foreign",
    ],
)
def test_medfed_evaluate_refuses_bad_checkpoints_with_exit_code_2(
    tmp_path: Path, npz: Path, payload_or_bytes: Any
) -> None:
    # Prepare
    path = tmp_path / "ckpt.pt"
    if isinstance(payload_or_bytes, bytes):
        path.write_bytes(payload_or_bytes)
    else:
        _write(path, payload_or_bytes)
    # Execute
    result = runner.invoke(
        cli.app,
        ["evaluate", "--checkpoint", str(path), "--data", str(npz), "--split", "val"],
    )
    # Assert
    assert_refused(result, "error:")
    assert result.exit_code == 2


def test_a_valid_checkpoint_still_evaluates(tmp_path: Path, npz: Path) -> None:
    # Prepare: the unmutated payload (the fuzzing baseline must be loadable)
    path = save_checkpoint(
        tmp_path / "ok.pt",
        Checkpoint(
            model="cnn",
            model_kwargs={"width": 8},
            task="classification",
            state_dict=PAYLOAD["state-dict"],
        ),
    )
    # Execute
    result = runner.invoke(
        cli.app, ["evaluate", "--checkpoint", str(path), "--data", str(npz), "--device", "cpu"]
    )
    # Assert
    assert result.exit_code == 0, result.output
    assert isinstance(load_checkpoint(path), Checkpoint)


@pytest.mark.slow
@SLOW
@given(payload=mutated_payloads())
def test_mutated_checkpoint_fields_large_corpus(tmp_path: Path, payload: Any) -> None:
    _loads_or_refuses(_write(tmp_path / "ckpt.pt", payload))


@pytest.mark.slow
@SLOW
@given(data=mutated_bytes(SAVED))
def test_mutated_checkpoint_bytes_large_corpus(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "ckpt.pt"
    path.write_bytes(data)
    _loads_or_refuses(path)


def test_medfed_errors_are_data_errors() -> None:
    # the property above relies on this: every refusal of a checkpoint is a DataError
    assert issubclass(DataError, MedfedError)
