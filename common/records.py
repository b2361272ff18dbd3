"""Model state <-> Flower ``ArrayRecord``, with key, shape and dtype checks.

Flower's ``ArrayRecord(state_dict)`` / ``ArrayRecord.to_torch_state_dict()`` do the
conversion; this module adds the checks that make a mismatch fail loudly with the
offending key instead of deep inside ``load_state_dict``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from common.errors import DataError, ModelError
from common.wire import decode_array


def record_to_state_dict(record: Any) -> OrderedDict[str, torch.Tensor]:
    """``ArrayRecord`` -> ``state_dict`` with every array checked by :func:`decode_array`.

    Raises
    ------
    DataError
        If ``record`` is not an ``ArrayRecord`` or an array does not decode.

    """
    if not isinstance(record, ArrayRecord):
        raise DataError(f"expected an ArrayRecord, got {type(record).__name__}")
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key in record:
        try:
            arr = decode_array(record[key])
        except DataError as exc:
            raise DataError(f"array {key!r}: {exc}") from None
        state[key] = torch.from_numpy(arr.copy())
    return state


def state_to_record(model: nn.Module) -> ArrayRecord:
    """Package a model's ``state_dict`` (parameters and buffers) as an ``ArrayRecord``.

    Parameters
    ----------
    model : torch.nn.Module
        A plain module (not an Opacus ``GradSampleModule`` wrapper: its keys carry a
        ``_module.`` prefix that the server's model does not have).

    Returns
    -------
    flwr.app.ArrayRecord
        One array per ``state_dict`` entry, keys unchanged, on the CPU.

    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = [k for k in state if k.startswith("_module.")]
    if bad:
        raise ModelError(f"refusing to send Opacus wrapper keys (e.g. {bad[0]!r}); unwrap first")
    return ArrayRecord(state)


def expected_spec(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Return ``{key: (shape, dtype)}`` for every ``state_dict`` entry of ``model``."""
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}


def check_state(
    state: Mapping[str, torch.Tensor], spec: Mapping[str, tuple[tuple[int, ...], str]]
) -> None:
    """Check that ``state`` has exactly the keys, shapes and dtypes of ``spec``.

    Raises
    ------
    ModelError
        Naming the first missing, unexpected or mismatched key.

    """
    missing = sorted(set(spec) - set(state))
    extra = sorted(set(state) - set(spec))
    if missing or extra:
        raise ModelError(
            f"arrays do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}. "
            "They were made for another model or another version of it (e.g. a checkpoint "
            "from an older medfed): use the same model and medfed version on both ends."
        )
    for key, (shape, dtype) in spec.items():
        t = state[key]
        if tuple(t.shape) != shape or str(t.dtype) != dtype:
            raise ModelError(
                f"array {key!r} is {tuple(t.shape)} {t.dtype}, the model expects {shape} {dtype}"
            )


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    """Load an ``ArrayRecord`` into ``model`` in place after checking it.

    Raises
    ------
    ModelError
        If keys, shapes or dtypes differ from the model's ``state_dict``.
    DataError
        If an array does not decode (:func:`decode_array`).

    """
    state = record_to_state_dict(record)
    check_state(state, expected_spec(model))
    model.load_state_dict(state, strict=True)
