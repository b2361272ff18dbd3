"""What may leave a hospital: the reply vocabulary and checks of the egress rules (DESIGN 5).

A site's reply is checked against an exact schema that depends on the message type, the
secure-aggregation stage of the request and the run config; the schema itself is built
by :func:`client.egress.reply_schema`. This module holds the pieces that need no client
code: record names, metric rules, array checks and the refusal they raise.

* The model update: an ``ArrayRecord`` named :data:`MODEL_RECORD` whose array names,
  shapes and dtypes equal the ``state_dict`` of the model being trained, and whose
  payload holds no byte beyond the array data (:func:`check_arrays`).
* Metrics: one ``MetricRecord`` named :data:`METRICS_RECORD` whose keys are exactly
  names of a :data:`MetricRules` table and whose values are finite numeric scalars in
  each rule's range (:func:`check_metrics`). The tables per message type are
  :func:`train_metric_rules` and :func:`evaluate_metric_rules`; the evaluate table
  follows the run's task (``val-`` + the keys its metrics function returns).
* Nothing else unless the schema names it (secure-aggregation and SCAFFOLD records are
  added explicitly by the schema for the stage or strategy that produces them).

A refusal is an :class:`EgressRefused` whose :attr:`~EgressRefused.detail` is a name
from :data:`DETAILS`, so the error reply that leaves the site says which rule refused
(``common.replies.fixed_reason(EGRESS, detail)``) and never what the reply held. Its
message, for the site's own log, names schema keys only, never values nor names the
schema does not know (a key may itself carry data).
"""

from __future__ import annotations

import functools
import io
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array

from common.errors import DataError, MedfedError
from common.replies import ReplyCode, fixed_reason

__all__ = [
    "ARRAY_SPEC",
    "DETAILS",
    "MESSAGE_TYPE",
    "METRICS_RECORD",
    "METRIC_MISSING",
    "METRIC_NAME",
    "METRIC_VALUE",
    "MODEL_RECORD",
    "RECORD_MISSING",
    "RECORD_NAME",
    "RECORD_TYPE",
    "STAGE_RECORD",
    "VAL_COUNT",
    "VAL_PREFIX",
    "ArraySpec",
    "EgressRefused",
    "MetricRule",
    "MetricRules",
    "array_spec",
    "check_arrays",
    "check_metrics",
    "decode_array",
    "evaluate_metric_rules",
    "screen_replies",
    "task_metric_names",
    "train_metric_rules",
]

#: Name of the reply record that carries the model update.
MODEL_RECORD = "arrays"
#: Name of the only reply record that may carry metrics.
METRICS_RECORD = "metrics"
#: Prefix of a site's local validation metrics: ``val-`` + a key of the task's metrics.
VAL_PREFIX = "val-"
#: Count of validation images behind the ``val-*`` metrics of a train reply
#: (``evaluate-in-train``); an evaluate reply's ``num-examples`` is that count already.
VAL_COUNT = "val-num-examples"

# Details of refusals (the vocabulary of ``fixed_reason(ReplyCode.EGRESS, detail)``).
#: A metric whose name is not in the reply's schema (or the site policy's list).
METRIC_NAME = "metric-name"
#: A metric value that is not a finite numeric scalar in its rule's range.
METRIC_VALUE = "metric-value"
#: A metric the schema requires (``num-examples``) is absent.
METRIC_MISSING = "metric-missing"
#: A record whose name is not in the reply's schema.
RECORD_NAME = "record-name"
#: A record of the wrong kind (e.g. metrics in an ``ArrayRecord``'s place).
RECORD_TYPE = "record-type"
#: A record the schema requires is absent.
RECORD_MISSING = "record-missing"
#: An array record whose names, shapes, dtypes or payload differ from the expected.
ARRAY_SPEC = "array-spec"
#: A secure-aggregation record that does not answer the request's stage exactly.
STAGE_RECORD = "stage-record"
#: A message type that has no reply schema.
MESSAGE_TYPE = "message-type"
#: Every detail an :class:`EgressRefused` may carry.
DETAILS = frozenset(
    {
        METRIC_NAME,
        METRIC_VALUE,
        METRIC_MISSING,
        RECORD_NAME,
        RECORD_TYPE,
        RECORD_MISSING,
        ARRAY_SPEC,
        STAGE_RECORD,
        MESSAGE_TYPE,
    }
)

ArraySpec = Mapping[str, tuple[tuple[int, ...], str]]

#: The one NaN a metric may be: Python's ``math.nan`` (0x7FF8000000000000). Any other NaN
#: carries up to 51 bits in its payload, and Flower's wire keeps them.
CANONICAL_NAN_BITS = 0x7FF8_0000_0000_0000


class EgressRefused(MedfedError, ValueError):  # noqa: N818 - a refusal, named as the API asks
    """A reply may not leave the site.

    Parameters
    ----------
    detail : str
        Which rule refused, a name from :data:`DETAILS` (``metric-name``...): it goes into
        the error reply's fixed reason.
    message : str
        For the site's log only: names schema keys and rules, never values.
    code : ReplyCode
        The reply code, :attr:`ReplyCode.EGRESS` unless the request itself was unusable.

    Raises
    ------
    ValueError
        If ``detail`` is not a vocabulary name (it could carry data out).
    """

    def __init__(self, detail: str, message: str, *, code: ReplyCode = ReplyCode.EGRESS) -> None:
        fixed_reason(code, detail)  # raises ValueError unless detail is a vocabulary name
        super().__init__(message)
        self.code = ReplyCode(code)
        self.detail = detail

    @property
    def reason(self) -> str:
        """The fixed reason of the error reply: ``fixed_reason(code, detail)``."""
        return fixed_reason(self.code, self.detail)


@dataclass(frozen=True, kw_only=True)
class MetricRule:
    """What one metric's value may be.

    Parameters
    ----------
    integer : bool
        The value must be an ``int`` (counts); else ``int`` or ``float``.
    low, high : float
        Inclusive range of the value.
    undefined_ok : bool
        Whether the canonical NaN (``math.nan``, "undefined", e.g. AUROC of a one-class
        split, see ``common.tasks.Task.evaluate``) is accepted. NaNs with a payload
        and infinities never are.
    required : bool
        Whether the metric must be present.
    """

    integer: bool = False
    low: float = -math.inf
    high: float = math.inf
    undefined_ok: bool = False
    required: bool = False

    def accepts(self, value: Any) -> bool:
        """Return True if ``value`` is a scalar this rule allows."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if isinstance(value, float) and math.isnan(value):
            return self.undefined_ok and _bits(value) == CANONICAL_NAN_BITS
        return self.low <= value <= self.high


MetricRules = Mapping[str, MetricRule]

#: ``num-examples``: the FedAvg weight, a count of images (at most 2^31 - 1).
_COUNT = MetricRule(integer=True, low=0, high=2**31 - 1, required=True)
#: ``val-num-examples``: validation images behind a train reply's ``val-*`` metrics, the
#: weight of their federated mean (server/strategy.py); optional, a policy may withhold it.
_VAL_COUNT = MetricRule(integer=True, low=0, high=2**31 - 1)
_TRAIN_RULES: dict[str, MetricRule] = {
    "num-examples": _COUNT,
    "train-loss": MetricRule(low=0.0, high=1e9),
    "train-steps": MetricRule(integer=True, low=0, high=2**31 - 1),
    "train-seconds": MetricRule(low=0.0, high=1e7),
}
#: DP-SGD's report (client/privacy.py): cumulative epsilon, delta, noise multiplier.
_DP_RULES: dict[str, MetricRule] = {
    "epsilon": MetricRule(low=0.0, high=1e6),
    "delta": MetricRule(low=0.0, high=0.1),
    "dp-noise-multiplier": MetricRule(low=0.0, high=1e4),
}
#: Simulation only: the delay client/faults.py injected at a slow virtual site (seconds).
_FAULT_RULES: dict[str, MetricRule] = {"fault-delay-seconds": MetricRule(low=0.0, high=1e6)}
#: Local validation metrics: ``loss`` (nats), rates in [0, 1]; NaN when undefined.
_VAL_RULE = MetricRule(low=0.0, high=1e9, undefined_ok=True)


def _bits(value: float) -> int:
    return int(struct.unpack("<Q", struct.pack("<d", value))[0])


def train_metric_rules(
    *, dp: bool, faults: bool, validation: tuple[str, int] | None = None
) -> MetricRules:
    """Metrics of a train reply (plaintext, or the advertise-keys stage of SecAgg+).

    ``num-examples``, ``train-loss``, ``train-steps``, ``train-seconds``; with DP also
    ``epsilon``, ``delta``, ``dp-noise-multiplier``; in a run with injected faults
    (simulation) also ``fault-delay-seconds``; with ``evaluate-in-train``
    (``validation=(task, num_classes)``) also ``val-<name>`` of the run's task and
    ``val-num-examples``, the count of validation images (an integer, not required).
    """
    rules = dict(_TRAIN_RULES)
    if dp:
        rules |= _DP_RULES
    if faults:
        rules |= _FAULT_RULES
    if validation is not None:
        rules |= {f"val-{name}": _VAL_RULE for name in task_metric_names(*validation)}
        rules[VAL_COUNT] = _VAL_COUNT
    return rules


def evaluate_metric_rules(*, task: str, num_classes: int, faults: bool) -> MetricRules:
    """Metrics of an evaluate reply: ``num-examples`` and ``val-<name>`` of the run's task.

    Raises
    ------
    ConfigError
        If ``task`` is not registered.
    """
    rules: dict[str, MetricRule] = {"num-examples": _COUNT}
    rules |= {f"val-{name}": _VAL_RULE for name in task_metric_names(task, num_classes)}
    if faults:
        rules |= _FAULT_RULES
    return rules


@functools.lru_cache(maxsize=16)
def task_metric_names(task: str, num_classes: int) -> frozenset[str]:
    """Names of the metrics ``common.tasks.get_task(task).evaluate`` returns, bar the count.

    Looked up from the task registry: the task's own metrics function, called on an
    empty input, gives its keys; both evaluation loops add ``loss``. A registered task
    of an unknown kind gets no metrics (the guard fails closed).

    Parameters
    ----------
    task : str
        Registered task name (``classification``, ``segmentation``, ``tabular``).
    num_classes : int
        ``K``; segmentation reports ``dice-<c>`` per foreground class when ``K > 2``.

    Returns
    -------
    frozenset[str]
        E.g. ``{"loss", "accuracy", "balanced-accuracy", "auroc", ...}``.

    Raises
    ------
    ConfigError
        If ``task`` is not registered.
    """
    import numpy as np

    from common.metrics import classification_metrics, metrics_from_counts
    from common.tasks import ClassificationTask, SegmentationTask, get_task

    kind = get_task(task)
    names: Iterable[str]
    if isinstance(kind, SegmentationTask):
        counts = np.zeros((max(int(num_classes), 2), 3), dtype=np.int64)
        names = metrics_from_counts(counts, correct=0, total=0, images=0)
    elif isinstance(kind, ClassificationTask):
        names = classification_metrics(np.zeros(0, dtype=np.int64), np.zeros((0, num_classes)))
    else:
        return frozenset()
    return frozenset(set(names) - {"num-examples"} | {"loss"})


def check_metrics(
    record: Any, rules: MetricRules, *, allowed: frozenset[str] | None = None
) -> None:
    """Check a metric record against an exact table of names and value rules.

    Parameters
    ----------
    record : flwr.app.MetricRecord
        The reply's :data:`METRICS_RECORD`.
    rules : MetricRules
        The allowed names and the rule of each.
    allowed : frozenset[str] or None
        A further restriction (the site policy's allowed metrics); None for none.

    Raises
    ------
    EgressRefused
        ``record-type`` if not a ``MetricRecord``; ``metric-name`` for a name outside
        the table (or ``allowed``); ``metric-value`` for a value its rule refuses;
        ``metric-missing`` if a required metric is absent.
    """
    from flwr.app import MetricRecord

    if not isinstance(record, MetricRecord):
        raise EgressRefused(RECORD_TYPE, f"record {METRICS_RECORD!r} is not a MetricRecord")
    for key, value in record.items():
        rule = rules.get(key)
        if rule is None or (allowed is not None and key not in allowed):
            raise EgressRefused(
                METRIC_NAME,
                f"a metric name outside the {len(rules)} this reply may carry "
                f"({sorted(rules)}){'' if allowed is None else ' and the site policy'}",
            )
        if not rule.accepts(value):
            raise EgressRefused(
                METRIC_VALUE,
                f"metric {key!r} is not a finite numeric scalar in its range "
                f"[{rule.low}, {rule.high}]{' (an int)' if rule.integer else ''}",
            )
    for key, rule in rules.items():
        if rule.required and key not in record:
            raise EgressRefused(METRIC_MISSING, f"metric {key!r} is missing")


def normalise_dtype(dtype: str) -> str:
    """``torch.float32`` / ``float32`` -> ``float32`` (numpy name)."""
    return dtype.removeprefix("torch.")


def check_arrays(arrays: Any, spec: ArraySpec, *, name: str = MODEL_RECORD) -> None:
    """Check an ``ArrayRecord`` against ``{name: (shape, dtype)}``, exactly.

    Declared and decoded shape and dtype must match, and the serialized payload must be
    exactly as long as a plain serialization of that array (no bytes smuggled after
    the array data).

    Parameters
    ----------
    arrays : flwr.app.ArrayRecord
        The record to check.
    spec : ArraySpec
        Expected ``{array name: (shape, numpy dtype name)}``.
    name : str
        The record's name, for the log.

    Raises
    ------
    EgressRefused
        ``record-type`` if not an ``ArrayRecord``; ``array-spec`` for a missing, extra,
        reshaped, retyped or padded array.
    """
    from flwr.app import ArrayRecord

    if not isinstance(arrays, ArrayRecord):
        raise EgressRefused(RECORD_TYPE, f"record {name!r} is not an ArrayRecord")
    names = set(arrays.keys())
    if names != set(spec):
        missing = sorted(set(spec) - names)
        raise EgressRefused(
            ARRAY_SPEC,
            f"record {name!r} does not hold exactly the expected arrays"
            + (f" (missing {missing[0]!r})" if missing else " (an unexpected array)"),
        )
    for key, (shape, dtype) in spec.items():
        arr = arrays[key]
        want = (tuple(shape), normalise_dtype(dtype))
        if (tuple(arr.shape), str(arr.dtype)) != want:
            raise EgressRefused(
                ARRAY_SPEC, f"array {key!r} of record {name!r} is not declared as {want}"
            )
        try:
            # header checked before allocating (Array.numpy() allocates what it declares)
            decoded = decode_array(arr, shape=want[0], dtype=want[1])
        except Exception as exc:
            raise EgressRefused(
                ARRAY_SPEC, f"array {key!r} of record {name!r} cannot be decoded"
            ) from exc
        if (tuple(decoded.shape), str(decoded.dtype)) != want:
            raise EgressRefused(ARRAY_SPEC, f"array {key!r} of record {name!r} holds another array")
        if len(arr.data) != len(Array(decoded).data):
            raise EgressRefused(
                ARRAY_SPEC, f"array {key!r} of record {name!r} carries extra bytes beyond its data"
            )


#: ``numpy.save`` format versions accepted (1.0 is what Flower writes; 2.0 for big headers).
_NPY_VERSIONS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
#: numpy dtype kinds an array from elsewhere may have: bool, integers, floats.
_ARRAY_KINDS = frozenset("biuf")


def decode_array(
    array: Any, *, shape: tuple[int, ...] | None = None, dtype: str | None = None
) -> np.ndarray:
    """Decode a Flower ``Array`` from elsewhere, checking its header before allocating.

    ``Array.numpy()`` (``numpy.load``) allocates what the ``.npy`` header inside the
    payload declares before it reads the data, so a 100-byte array declaring ``(2**31,)``
    costs 8 GiB; and junk raises ``ValueError``, ``EOFError`` or ``UnicodeError``. Here
    the header (``numpy.lib.format``, versions 1.0 and 2.0) is parsed first and the
    payload must hold exactly ``prod(shape) x itemsize`` bytes after it, of a plain
    numeric dtype (bool, int, uint, float; native byte order; no objects), equal to the
    ``Array``'s declared ``shape``/``dtype`` and to ``shape``/``dtype`` when given. The
    result is a read-only view of the payload: no memory beyond what arrived.

    Parameters
    ----------
    array : flwr.app.Array
        The array as received.
    shape : tuple of int, optional
        The shape it must have.
    dtype : str, optional
        The numpy dtype name it must have (``"float32"``).

    Returns
    -------
    numpy.ndarray
        Read-only, of the checked shape and dtype.

    Raises
    ------
    DataError
        For anything but exactly such an array; the message names the rule, never a value.

    """
    if not isinstance(array, Array):
        raise DataError(f"expected a flwr Array, got {type(array).__name__}")
    data = array.data
    if array.stype != "numpy.ndarray" or not isinstance(data, bytes | bytearray):
        raise DataError("array is not numpy.save data")
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        reader = _NPY_VERSIONS.get(version)
        if reader is None:
            raise DataError(f"array uses .npy format version {version}, not 1.0 or 2.0")
        npy_shape, fortran, npy_dtype = reader(buf)
    except DataError:
        raise
    except Exception as exc:  # numpy raises ValueError, EOFError, SyntaxError, ...
        raise DataError(f"array header does not parse ({type(exc).__name__})") from None
    if npy_dtype.kind not in _ARRAY_KINDS or npy_dtype.hasobject or not npy_dtype.isnative:
        raise DataError("array dtype is not a native-order bool, integer or float type")
    if not all(isinstance(n, int) and n >= 0 for n in npy_shape):
        raise DataError("array shape is not a tuple of non-negative integers")
    count = math.prod(npy_shape)
    if count * npy_dtype.itemsize != len(data) - buf.tell():
        raise DataError("array payload length differs from what its header declares")
    declared = (tuple(array.shape), str(array.dtype))
    if declared != (tuple(npy_shape), str(npy_dtype)):
        raise DataError("array declares another shape or dtype than its payload holds")
    if shape is not None and tuple(npy_shape) != tuple(shape):
        raise DataError(f"array shape is {tuple(npy_shape)}, expected {tuple(shape)}")
    if dtype is not None and str(npy_dtype) != dtype:
        raise DataError(f"array dtype is {npy_dtype}, expected {dtype}")
    flat = np.frombuffer(data, dtype=npy_dtype, count=count, offset=buf.tell())
    return flat.reshape(npy_shape, order="F" if fortran else "C")


def array_spec(arrays: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of an ``ArrayRecord`` as declared (for one's own arrays)."""
    return {k: (tuple(a.shape), normalise_dtype(str(a.dtype))) for k, a in arrays.items()}


def screen_replies(
    replies: Iterable[Any], *, spec: ArraySpec, weight_key: str = "num-examples"
) -> tuple[list[Any], dict[int, str]]:
    """Split a round's train replies into those a strategy can aggregate and the rest.

    A site's reply is input from elsewhere: an array whose ``.npy`` payload lies would
    raise ``ValueError`` inside Flower's aggregation (or allocate what its header
    declares), and a missing or absurd weight would stop it too, ending the whole run.
    A reply is kept if it is an error reply (the strategy counts it as a failure) or if
    its model record :data:`MODEL_RECORD` holds exactly the arrays of ``spec``
    (:func:`check_arrays`), every other array of it decodes (:func:`decode_array`), and it
    has exactly one ``MetricRecord`` whose ``weight_key`` is an int in ``[0, 2**31 - 1]``

    Parameters
    ----------
    replies : Iterable[flwr.app.Message]
        The replies of one train round.
    spec : ArraySpec
        ``{name: (shape, dtype)}`` of the global model sent (:func:`array_spec`).
    weight_key : str
        The aggregation weight's metric name.

    Returns
    -------
    tuple[list[flwr.app.Message], dict[int, str]]
        The replies kept, and ``{node id: reason}`` of those refused (reasons name a rule,
        never a value).

    """
    from flwr.app import MetricRecord

    kept: list[Any] = []
    refused: dict[int, str] = {}
    weight_rule = MetricRule(integer=True, low=0, high=2**31 - 1)
    for reply in replies:
        if reply.has_error():
            kept.append(reply)
            continue
        node = int(reply.metadata.src_node_id)
        content = reply.content
        try:
            if MODEL_RECORD not in content.array_records:
                raise EgressRefused(RECORD_MISSING, f"no {MODEL_RECORD!r} record")
            check_arrays(content.array_records[MODEL_RECORD], spec)
            for name, record in content.array_records.items():
                if name != MODEL_RECORD:
                    for key in record:
                        decode_array(record[key])
            metrics = list(content.metric_records.values())
            if len(metrics) != 1 or not isinstance(metrics[0], MetricRecord):
                raise EgressRefused(RECORD_TYPE, "not exactly one MetricRecord")
            if not weight_rule.accepts(metrics[0].get(weight_key)):
                raise EgressRefused(METRIC_VALUE, f"{weight_key!r} is not a count")
        except (EgressRefused, DataError) as exc:
            detail = exc.detail if isinstance(exc, EgressRefused) else ARRAY_SPEC
            refused[node] = f"malformed reply: {detail}"
            continue
        kept.append(reply)
    return kept, refused
