"""What may leave a hospital: the allow-lists the egress guard enforces (DESIGN section 5).

A site's reply may contain only

* the model update: an ``ArrayRecord`` named :data:`MODEL_RECORD` whose array names,
  shapes and dtypes equal the ``state_dict`` of the model being trained;
* numeric scalar metrics in ``MetricRecord`` s whose keys are in :data:`METRIC_KEYS` or
  start with one of :data:`METRIC_PREFIXES`;
* records registered in :data:`EXTRA_RECORDS` by other protocols (secure aggregation).

Extending the allow-lists (one place, reviewed like code):

* a new metric: add its key to :data:`METRIC_KEYS` here (differential privacy will add
  ``epsilon``, ``delta`` and the ``dp-`` prefix);
* another record, e.g. SecAgg+'s masked vector or its public keys/shares: call
  :func:`register_record` at import time of the module that produces it, with a check
  that returns ``None`` when the record is acceptable or a one-line problem naming the
  offending key (never a value)::

      from common import wire

      def _check_masked(record, run_config):
          ...
          return None

      wire.register_record("secagg-masked", _check_masked)

  :func:`array_spec_check` builds such a check for an ``ArrayRecord`` whose expected
  ``{name: (shape, dtype)}`` follows from the run config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

#: Name of the reply record that carries the model update.
MODEL_RECORD = "arrays"

#: Metric keys a site may report (numeric scalars only). Produced by client/app.py:
#: training statistics, and the site's cumulative privacy spend (client/privacy.py).
METRIC_KEYS: set[str] = {
    "num-examples",
    "train-loss",
    "train-steps",
    "train-seconds",
    "epsilon",
    "delta",
    # simulation only: the delay client/faults.py injected at a slow virtual site
    "fault-delay-seconds",
}

#: Metric key prefixes a site may report: local validation metrics (``val-accuracy``...;
#: segmentation: ``val-dice``, ``val-pixel-accuracy``, ``val-loss`` from common/tasks.py)
#: and DP-SGD settings (``dp-noise-multiplier``...).
METRIC_PREFIXES: list[str] = ["val-", "dp-"]

#: A record check: ``(record, run_config) -> None`` if acceptable, else the problem.
RecordCheck = Callable[[Any, Mapping[str, Any]], str | None]

#: Extra reply records by name (e.g. secure-aggregation payloads) and their checks.
EXTRA_RECORDS: dict[str, RecordCheck] = {}

ArraySpec = Mapping[str, tuple[tuple[int, ...], str]]


def register_record(name: str, check: RecordCheck) -> None:
    """Allow a reply record called ``name`` if ``check`` accepts it.

    Raises
    ------
    ValueError
        If ``name`` is the model record or already registered with another check.

    """
    if name == MODEL_RECORD:
        raise ValueError(f"record name {name!r} is reserved for the model update")
    if name in EXTRA_RECORDS and EXTRA_RECORDS[name] is not check:
        raise ValueError(f"record {name!r} is already allow-listed with another check")
    EXTRA_RECORDS[name] = check


def metric_allowed(key: str) -> bool:
    """Whether a metric key may leave the site."""
    return key in METRIC_KEYS or any(key.startswith(p) for p in METRIC_PREFIXES)


def normalise_dtype(dtype: str) -> str:
    """``torch.float32`` / ``float32`` -> ``float32`` (numpy name)."""
    return dtype.removeprefix("torch.")


def check_arrays(arrays: Any, spec: ArraySpec) -> str | None:
    """Check an ``ArrayRecord`` against ``{name: (shape, dtype)}``.

    Declared and decoded shape and dtype must match, and the serialized payload must be
    exactly as long as a plain serialization of that array (no bytes smuggled after
    the array data).

    Returns
    -------
    str or None
        The first problem (naming the array), or ``None``.

    """
    import numpy as np
    from flwr.app import Array

    names = set(arrays.keys())
    missing = sorted(set(spec) - names)
    extra = sorted(names - set(spec))
    if extra:
        return f"unexpected array {extra[0]!r} (not part of the model)"
    if missing:
        return f"array {missing[0]!r} of the model is missing"
    for name, (shape, dtype) in spec.items():
        arr = arrays[name]
        want = (tuple(shape), normalise_dtype(dtype))
        if (tuple(arr.shape), str(arr.dtype)) != want:
            return f"array {name!r} is declared {tuple(arr.shape)} {arr.dtype}, expected {want}"
        try:
            decoded = np.asarray(arr.numpy())
        except Exception:
            return f"array {name!r} cannot be decoded"
        if (tuple(decoded.shape), str(decoded.dtype)) != want:
            return f"array {name!r} holds {decoded.shape} {decoded.dtype}, expected {want}"
        if len(arr.data) != len(Array(decoded).data):
            return f"array {name!r} carries extra bytes beyond its data"
    return None


def array_spec_check(spec_fn: Callable[[Mapping[str, Any]], ArraySpec]) -> RecordCheck:
    """Build a :data:`RecordCheck` for an ``ArrayRecord`` whose spec depends on run config."""

    def check(record: Any, run_config: Mapping[str, Any]) -> str | None:
        from flwr.app import ArrayRecord

        if not isinstance(record, ArrayRecord):
            return f"expected an ArrayRecord, got {type(record).__name__}"
        return check_arrays(record, spec_fn(run_config))

    return check
