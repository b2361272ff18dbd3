"""The egress guard (client/egress.py): an exact reply schema per message type and stage.

Every attack on the egress rules listed in issue 12 (item 4) has a test here, written
before the fix and checked to fail on the guard it replaced. Replies are built by hand
(tiny and hand-checkable), except the honest ones, which come from the ClientApp's own
handlers on a tiny site dataset and from a full in-process SecAgg+ round.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from client.egress import egress_guard
from common import secure_sum
from common.config import RunConfig
from common.models import get_model
from common.records import state_to_record
from common.replies import ReplyCode, fixed_reason
from common.secagg.crypto import CIPHERTEXT_BYTES, SHARE_BYTES
from common.secagg.params import ADVERTISE, MASKED_INPUT, RECORD, SHARE_KEYS, UNMASK
from common.secagg.schema import (
    AdvertiseReply,
    Ciphertexts,
    Header,
    UnmaskReply,
    masked_input_reply,
    share_keys_reply,
)
from tests.server.messages import new_message
from tests.sites import tiny_site

#: A plain run: no secure aggregation, no DP (each test adds what it needs).
RUN = {"model": "cnn", "num-classes": 2, "secagg.enabled": False, "dp.enabled": False}
DP_RUN = RUN | {"dp.enabled": True}
SECAGG_RUN = RUN | {"secagg.enabled": True}
SCAFFOLD_RUN = RUN | {"strategy": "scaffold", "momentum": 0.0}
SECRET = 0.123456789
SESSION = bytes(range(16))
NODE = 7

Handler = Callable[[Message, Context], Message]


# --------------------------------------------------------------------------- helpers
def _request(message_type: str = MessageType.TRAIN, **records) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1}), **records})
    return new_message(content, message_type, NODE, "1")


def _context(run: dict, **node_config) -> Context:
    return Context(
        run_id=1, node_id=NODE, node_config=node_config, state=RecordDict(), run_config=run
    )


def _guard(
    content: RecordDict,
    *,
    run: dict = RUN,
    message_type: str = MessageType.TRAIN,
    request: Message | None = None,
) -> Message:
    msg = request or _request(message_type)
    return egress_guard(msg, _context(run), lambda m, c: Message(content, reply_to=m))


def _assert_refused(reply: Message, detail: str, code: ReplyCode = ReplyCode.EGRESS) -> None:
    assert reply.has_error()
    assert reply.error.code == code
    assert reply.error.reason == fixed_reason(code, detail)


def _train_metrics(**extra: float) -> MetricRecord:
    return MetricRecord(
        {"num-examples": 30, "train-loss": 0.5, "train-steps": 4, "train-seconds": 1.0} | extra
    )


def _dp_metrics() -> dict[str, float]:
    return {"epsilon": 1.5, "delta": 1e-3, "dp-noise-multiplier": 1.1}


def _eval_metrics(**extra: float) -> MetricRecord:
    return MetricRecord({"num-examples": 10, "val-accuracy": 0.7, "val-loss": 0.6} | extra)


def _update() -> ArrayRecord:
    torch.manual_seed(0)
    return state_to_record(get_model("cnn"))


def _plain_train(**extra) -> RecordDict:
    return RecordDict({"arrays": _update(), "metrics": _train_metrics(), **extra})


def _masked_length() -> int:
    """The model's float entries plus the default run's secure sums (score histogram)."""
    state = get_model("cnn").state_dict()
    extra = secure_sum.length(secure_sum.spec(RunConfig()))
    return sum(v.numel() for v in state.values() if v.is_floating_point()) + extra


def _nan_with_payload(payload: int) -> float:
    """A quiet NaN whose 51-bit mantissa carries ``payload`` (it survives Flower's wire)."""
    return struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_0000_0000 | payload))[0]


# ------------------------------------------------------------- SecAgg+ stage fixtures
def _stage_request(stage: str) -> Message:
    """A minimal valid server request of ``stage`` to site :data:`NODE` (neighbour 8)."""
    fields: dict[str, dict] = {
        ADVERTISE: {},
        SHARE_KEYS: {
            "nodes": [NODE, 8],
            "enc-pks": [b"\x01" * 32, b"\x02" * 32],
            "mask-pks": [b"\x03" * 32, b"\x04" * 32],
            "threshold": 2,
            "total-weight": 60.0,
        },
        MASKED_INPUT: {"src": [8], "ciphertexts": [b"\x05" * CIPHERTEXT_BYTES]},
        UNMASK: {"survivors": [NODE, 8], "dropped": [], "num-survivors": 2},
    }
    extra = {"arrays": _update()} if stage == ADVERTISE else {}
    return _request(**extra, **{RECORD: Header(stage, 1, SESSION).record(**fields[stage])})


def _stage_reply(stage: str) -> RecordDict:
    """What an honest site replies to :func:`_stage_request` (shapes of secagg_mod's)."""
    if stage == ADVERTISE:
        keys = AdvertiseReply(b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32)
        return RecordDict({"metrics": _train_metrics(), RECORD: keys.record()})
    if stage == SHARE_KEYS:
        bundle = Ciphertexts([8], [b"\x0d" * CIPHERTEXT_BYTES])
        return RecordDict({RECORD: share_keys_reply(bundle)})
    if stage == MASKED_INPUT:
        vector = np.zeros(_masked_length(), dtype=np.uint32)
        return masked_input_reply(vector, active=[8], rejected=[])
    share = b"\x0e" * SHARE_BYTES
    return RecordDict({RECORD: UnmaskReply([NODE, 8], [share, share], [], []).record()})


# ================================================ attack 1: metric names and values
def test_an_image_spread_over_many_val_metrics_is_refused():
    # Prepare: a 28 x 28 image, 6 pixels per metric, in 131 keys that start with val-
    image = (np.arange(28 * 28) % 256).astype(np.uint8).tobytes()
    pixels = {
        f"val-px-{i:03d}": float(int.from_bytes(image[6 * i : 6 * i + 6], "big"))
        for i in range(131)
    }
    content = RecordDict({"metrics": MetricRecord({"num-examples": 10} | pixels)})
    # Execute
    reply = _guard(content, message_type=MessageType.EVALUATE)
    # Assert
    _assert_refused(reply, "metric-name")


def test_phi_in_a_metric_key_is_refused_and_the_key_never_leaves(caplog):
    # Prepare: a dp- key (prefix allow-listed before) that spells a patient's name
    key = "dp-doe-john-1970-01-01"
    content = _plain_train(metrics=_train_metrics(**{key: 1.0}))
    # Execute
    with caplog.at_level(logging.INFO):
        reply = _guard(content, run=DP_RUN)
    # Assert: refused; the name is neither in the reply nor in the site's log
    _assert_refused(reply, "metric-name")
    assert "doe" not in reply.error.reason
    assert "doe" not in caplog.text


@pytest.mark.parametrize(
    "value",
    [_nan_with_payload(0xDEAD_BEEF_CAFE), float("inf"), float("-inf"), [0.5, 0.5]],
    ids=["nan-payload", "inf", "-inf", "list"],
)
def test_non_finite_or_non_scalar_metric_values_are_refused(value):
    # Prepare
    content = RecordDict({"metrics": _eval_metrics(**{"val-auroc": value})})
    # Execute
    reply = _guard(content, message_type=MessageType.EVALUATE)
    # Assert
    _assert_refused(reply, "metric-value")


def test_only_the_canonical_nan_and_only_for_an_undefined_val_metric_passes():
    # Prepare: AUROC of a one-class split is undefined (common.metrics), as math.nan
    undefined = RecordDict({"metrics": _eval_metrics(**{"val-auroc": float("nan")})})
    nan_loss = _plain_train(metrics=_train_metrics(**{"train-loss": float("nan")}))
    # Execute
    evaluate_reply = _guard(undefined, message_type=MessageType.EVALUATE)
    train_reply = _guard(nan_loss)
    # Assert
    assert not evaluate_reply.has_error()
    _assert_refused(train_reply, "metric-value")


@pytest.mark.parametrize(
    ("run", "key", "value"),
    [
        (RUN, "num-examples", -1),
        (RUN, "num-examples", 30.5),
        (RUN, "train-steps", 2.5),
        (RUN, "train-seconds", -1.0),
        (DP_RUN, "epsilon", -0.5),
        (DP_RUN, "epsilon", 1e300),
        (DP_RUN, "delta", 1.5),
        (DP_RUN, "dp-noise-multiplier", -1.0),
    ],
)
def test_metric_values_outside_their_range_are_refused(run, key, value):
    # Prepare
    metrics = _train_metrics(**(_dp_metrics() if run is DP_RUN else {}))
    metrics[key] = value
    # Execute
    reply = _guard(_plain_train(metrics=metrics), run=run)
    # Assert
    _assert_refused(reply, "metric-value")


def test_evaluate_in_train_admits_exactly_the_tasks_validation_metrics_in_train_replies():
    # Prepare: a train reply that also validated the received global model
    metrics = _train_metrics(**{"val-accuracy": 0.5, "val-auroc": 0.75, "val-loss": 0.6})
    # Execute
    reply = _guard(_plain_train(metrics=metrics), run=RUN | {"evaluate-in-train": True})
    # Assert
    assert not reply.has_error()


@pytest.mark.parametrize(
    ("run", "message_type", "metrics"),
    [
        (RUN, MessageType.TRAIN, _train_metrics(epsilon=1.0)),  # DP metric without DP
        # validation in a train reply of a run without evaluate-in-train
        (
            RUN | {"evaluate-in-train": False},
            MessageType.TRAIN,
            _train_metrics(**{"val-accuracy": 0.5}),
        ),
        (RUN, MessageType.TRAIN, _train_metrics(**{"val-dice": 0.5})),  # not the task's
        (RUN, MessageType.EVALUATE, _eval_metrics(**{"train-loss": 0.5})),  # train in eval
        (RUN, MessageType.EVALUATE, _eval_metrics(**{"val-dice": 0.5})),  # not the task's
        (DP_RUN, MessageType.EVALUATE, _eval_metrics(epsilon=1.0)),
        (RUN, MessageType.TRAIN, _train_metrics(**{"fault-delay-seconds": 0.0})),  # no faults
    ],
)
def test_metrics_outside_the_message_types_exact_set_are_refused(run, message_type, metrics):
    # Prepare
    if message_type == MessageType.TRAIN:
        content = _plain_train(metrics=metrics)
    else:
        content = RecordDict({"metrics": metrics})
    # Execute
    reply = _guard(content, run=run, message_type=message_type)
    # Assert
    _assert_refused(reply, "metric-name")


def test_num_examples_is_required():
    # Prepare
    content = RecordDict({"metrics": MetricRecord({"val-accuracy": 0.5})})
    # Execute / Assert
    _assert_refused(_guard(content, message_type=MessageType.EVALUATE), "metric-missing")


def test_val_metrics_follow_the_runs_task_and_classes():
    # Prepare: 3-class segmentation reports Dice per foreground class (common/tasks.py)
    seg = {"task": "segmentation", "model": "unet", "num-classes": 3} | {
        k: v for k, v in RUN.items() if k not in ("model", "num-classes")
    }
    names = ["val-dice", "val-dice-1", "val-dice-2", "val-pixel-accuracy", "val-loss"]
    content = RecordDict({"metrics": MetricRecord({"num-examples": 4} | dict.fromkeys(names, 0.5))})
    # Execute
    as_segmentation = _guard(content, run=seg, message_type=MessageType.EVALUATE)
    as_classification = _guard(content, message_type=MessageType.EVALUATE)
    # Assert
    assert not as_segmentation.has_error()
    _assert_refused(as_classification, "metric-name")


# ====================================================== attack 2: metric record names
@pytest.mark.parametrize(
    "content",
    [
        RecordDict({"metrics": _eval_metrics(), "more": MetricRecord({"num-examples": 1})}),
        RecordDict({"stats": _eval_metrics()}),
    ],
    ids=["second-record", "renamed"],
)
def test_metrics_may_travel_only_in_the_record_named_metrics(content):
    # Execute
    reply = _guard(content, message_type=MessageType.EVALUATE)
    # Assert
    _assert_refused(reply, "record-name")


# ============================================ attack 3: protocol records by stage/type
def test_scaffold_delta_leaves_only_when_the_strategy_is_scaffold():
    # Prepare: a correctly shaped SCAFFOLD delta (the model's trainable parameters)
    params = {n: p.detach().clone() for n, p in get_model("cnn").named_parameters()}
    content = _plain_train(**{"scaffold-dc": ArrayRecord(params)})
    # Execute
    under_fedavg = _guard(content)
    under_scaffold = _guard(content, run=SCAFFOLD_RUN)
    # Assert
    _assert_refused(under_fedavg, "record-name")
    assert not under_scaffold.has_error()


@pytest.mark.parametrize(
    "extra",
    [
        {"masked": ArrayRecord({"vector": Array(np.zeros(_masked_length(), dtype=np.uint32))})},
        {RECORD: AdvertiseReply(b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32).record()},
    ],
    ids=["masked", "secagg"],
)
def test_secagg_records_are_refused_outside_secure_aggregation(extra):
    # Execute: in a plain train reply and in an evaluate reply
    in_train = _guard(_plain_train(**extra))
    in_eval = _guard(
        RecordDict({"metrics": _eval_metrics(), **extra}), message_type=MessageType.EVALUATE
    )
    # Assert
    _assert_refused(in_train, "record-name")
    _assert_refused(in_eval, "record-name")


def test_evaluate_reply_may_not_carry_the_model():
    # Prepare
    content = RecordDict({"arrays": _update(), "metrics": _eval_metrics()})
    # Execute / Assert
    _assert_refused(_guard(content, message_type=MessageType.EVALUATE), "record-name")


@pytest.mark.parametrize(
    ("stage", "extra"),
    [
        (ADVERTISE, "arrays"),  # the plaintext update next to the public keys
        (SHARE_KEYS, "metrics"),
        (MASKED_INPUT, "arrays"),
        (MASKED_INPUT, "metrics"),
        (UNMASK, "masked"),
    ],
)
def test_each_secagg_stage_reply_carries_exactly_its_records(stage, extra):
    # Prepare: the honest stage reply, plus one record that stage may not send
    content = _stage_reply(stage)
    content[extra] = {
        "arrays": _update(),
        "metrics": _train_metrics(),
        "masked": ArrayRecord({"vector": Array(np.zeros(_masked_length(), dtype=np.uint32))}),
    }[extra]
    # Execute
    reply = _guard(content, run=SECAGG_RUN, request=_stage_request(stage))
    # Assert
    _assert_refused(reply, "record-name")


def test_secagg_record_of_another_stage_is_refused():
    # Prepare: public keys (advertise) sent in answer to share-keys
    content = RecordDict({RECORD: _stage_reply(ADVERTISE)[RECORD]})
    # Execute
    reply = _guard(content, run=SECAGG_RUN, request=_stage_request(SHARE_KEYS))
    # Assert
    _assert_refused(reply, "stage-record")


@pytest.mark.parametrize(
    ("stage", "field", "value"),
    [
        (SHARE_KEYS, "dst", [99]),  # not a neighbour the server named
        (SHARE_KEYS, "ciphertexts", []),  # lists of different lengths
        (MASKED_INPUT, "active", [8, 99]),
        (UNMASK, "key-nodes", [8]),  # a key share of a node that did not drop
        (UNMASK, "extra", b"PHI"),
    ],
)
def test_secagg_record_fields_are_bound_to_the_request(stage, field, value):
    # Prepare
    content = _stage_reply(stage)
    content[RECORD][field] = value
    if field == "key-nodes":
        content[RECORD]["key-shares"] = [b"\x0f" * SHARE_BYTES]
    # Execute
    reply = _guard(content, run=SECAGG_RUN, request=_stage_request(stage))
    # Assert
    _assert_refused(reply, "stage-record")


@pytest.mark.parametrize(
    "vector",
    [np.zeros(_masked_length() + 1, dtype=np.uint32), np.zeros(_masked_length(), np.float32)],
    ids=["length", "dtype"],
)
def test_masked_vector_must_have_the_exact_length_and_dtype(vector):
    # Prepare
    content = _stage_reply(MASKED_INPUT)
    content["masked"] = ArrayRecord({"vector": Array(vector)})
    # Execute
    reply = _guard(content, run=SECAGG_RUN, request=_stage_request(MASKED_INPUT))
    # Assert
    _assert_refused(reply, "array-spec")


def test_plaintext_update_is_refused_when_secure_aggregation_is_on():
    # Prepare: a correct model update, but the run promised the server only sees sums
    # Execute
    reply = _guard(_plain_train(), run=SECAGG_RUN)
    # Assert
    _assert_refused(reply, "stage-record")


def test_the_stage_is_read_from_the_request_before_the_handler_runs():
    # Prepare: a handler that rewrites the request's stage to allow a vector it then sends
    request = _stage_request(SHARE_KEYS)

    def handler(msg: Message, ctx: Context) -> Message:
        msg.content[RECORD]["stage"] = MASKED_INPUT
        msg.content[RECORD]["src"] = [8]
        return Message(_stage_reply(MASKED_INPUT), reply_to=msg)

    # Execute
    reply = egress_guard(request, _context(SECAGG_RUN), handler)
    # Assert
    _assert_refused(reply, "record-name")


def test_protocol_records_are_an_explicit_table_not_import_side_effects():
    # Prepare / Execute
    from client.egress import PROTOCOL_RECORDS
    from common import wire

    # Assert
    assert set(PROTOCOL_RECORDS) == {"secagg", "masked", "scaffold-dc"}
    assert not hasattr(wire, "register_record") and not hasattr(wire, "EXTRA_RECORDS")


# ====================================== model record (kept from the allow-list guard)
def test_data_tensor_smuggled_in_the_model_record_is_refused():
    state = dict(get_model("cnn").state_dict())
    state["patient_images"] = torch.full((4, 1, 28, 28), SECRET)
    reply = _guard(RecordDict({"arrays": ArrayRecord(state), "metrics": _train_metrics()}))
    _assert_refused(reply, "array-spec")


def test_reshaped_or_retyped_model_array_is_refused():
    state = {k: v.clone() for k, v in get_model("cnn").state_dict().items()}
    first = next(iter(state))
    state[first] = state[first].double()
    reply = _guard(RecordDict({"arrays": ArrayRecord(state), "metrics": _train_metrics()}))
    _assert_refused(reply, "array-spec")


def test_bytes_appended_after_array_data_are_refused():
    record = _update()
    first = next(iter(record))
    a = record[first]
    record[first] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data + b"PHI" * 10)
    reply = _guard(RecordDict({"arrays": record, "metrics": _train_metrics()}))
    _assert_refused(reply, "array-spec")


def test_config_record_is_refused():
    content = _plain_train(notes=ConfigRecord({"patient-name": f"Doe^{SECRET}"}))
    _assert_refused(_guard(content), "record-name")


def test_model_record_of_the_wrong_type_is_refused():
    content = RecordDict({"arrays": MetricRecord({"x": 1.0}), "metrics": _train_metrics()})
    _assert_refused(_guard(content), "record-type")


# =================================== attack 4: exceptions and free-text error replies
def test_a_handler_exception_leaves_as_a_fixed_internal_error(caplog):
    # Prepare: an exception whose text holds a path and a value
    from common.errors import DataError

    def handler(msg: Message, ctx: Context) -> Message:
        raise DataError(f"/srv/hospital/site-a/patient-42.npz holds {SECRET}")

    # Execute
    with caplog.at_level(logging.ERROR):
        reply = egress_guard(_request(), _context(RUN), handler)
    # Assert: fixed text out; the exception and its traceback stay in the site's log
    _assert_refused(reply, "", code=ReplyCode.INTERNAL)
    assert "patient-42" not in reply.error.reason
    logged = [r for r in caplog.records if r.name == "client.egress"]
    assert any(r.exc_info and "patient-42" in str(r.exc_info[1]) for r in logged)


def test_an_exception_inside_the_check_leaves_as_a_fixed_internal_error():
    # Prepare: a run config the check cannot even parse (its error names the value)
    run = RUN | {"model": "resnet-at-/srv/hospital"}
    # Execute
    reply = _guard(_plain_train(), run=run)
    # Assert
    _assert_refused(reply, "", code=ReplyCode.INTERNAL)


@pytest.mark.parametrize(
    "error",
    [
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom at /srv/hospital"),
        Error(code=ReplyCode.PRIVACY_BUDGET, reason="ledger /srv/hospital/state at eps 7.9"),
        Error(code=ReplyCode.POLICY, reason=fixed_reason(ReplyCode.POLICY) + ": Doe^John"),
        Error(code=ReplyCode.POLICY, reason=fixed_reason(ReplyCode.DATA)),  # another code's
    ],
    ids=["flower-code", "free-text", "detail-not-a-name", "wrong-code"],
)
def test_handler_error_replies_without_a_fixed_reason_are_replaced(error):
    # Execute
    reply = egress_guard(_request(), _context(RUN), lambda m, c: Message(error, reply_to=m))
    # Assert
    _assert_refused(reply, "", code=ReplyCode.INTERNAL)


@pytest.mark.parametrize(
    "error",
    [
        Error(code=ReplyCode.POLICY, reason=fixed_reason(ReplyCode.POLICY, "require-dp")),
        Error(code=ReplyCode.PRIVACY_BUDGET, reason=fixed_reason(ReplyCode.PRIVACY_BUDGET)),
    ],
)
def test_handler_error_replies_with_a_fixed_reason_pass_unchanged(error):
    # Execute
    reply = egress_guard(_request(), _context(RUN), lambda m, c: Message(error, reply_to=m))
    # Assert
    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (error.code, error.reason)


def test_simulated_faults_keep_their_fixed_reasons_only_at_virtual_sites():
    # Prepare: what client/faults.py does at a simulated site (dropout reply; crash raise)
    from client.faults import REASON_CRASH, REASON_DROPOUT, InjectedFault

    def dropout(msg: Message, ctx: Context) -> Message:
        return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=REASON_DROPOUT), reply_to=msg)

    def crash(msg: Message, ctx: Context) -> Message:
        raise InjectedFault(f"{REASON_CRASH} (site 1, round 2, mid-round)")

    virtual = _context(RUN, **{"partition-id": 1})
    # Execute
    dropped = egress_guard(_request(), virtual, dropout)
    crashed = egress_guard(_request(), virtual, crash)
    at_hospital = egress_guard(_request(), _context(RUN), dropout)
    # Assert
    assert dropped.error.code == ErrorCode.NODE_UNAVAILABLE
    assert dropped.error.reason == REASON_DROPOUT
    assert crashed.error.reason == REASON_CRASH
    _assert_refused(at_hospital, "", code=ReplyCode.INTERNAL)


def test_unknown_message_type_is_refused():
    reply = _guard(RecordDict({"metrics": _eval_metrics()}), message_type=MessageType.QUERY)
    _assert_refused(reply, "message-type")


# ============================================= item 5: the site worker's function
def test_check_reply_raises_egress_refused_with_a_code_and_a_detail():
    # Prepare
    from client.egress import EgressRefused, check_reply
    from common.errors import MedfedError

    content = _plain_train(metrics=_train_metrics(**{"val-px-1": 1.0}))
    # Execute
    with pytest.raises(EgressRefused) as caught:
        check_reply(
            message_type=MessageType.TRAIN,
            request=_request().content,
            reply=content,
            run_config=RUN,
        )
    # Assert
    assert isinstance(caught.value, MedfedError)
    assert (caught.value.code, caught.value.detail) == (ReplyCode.EGRESS, "metric-name")


def test_the_site_policy_can_restrict_metrics_further():
    # Prepare
    from client.egress import EgressRefused, check_reply

    kwargs = {
        "message_type": MessageType.TRAIN,
        "request": _request().content,
        "reply": _plain_train(),
        "run_config": RUN,
    }
    policy = frozenset({"num-examples", "train-loss", "train-steps"})
    # Execute / Assert: the honest reply passes unrestricted, not without train-seconds
    check_reply(**kwargs)
    with pytest.raises(EgressRefused, match="metric"):
        check_reply(**kwargs, allowed_metrics=policy)


# ======================================== honest replies of today's app still pass
@pytest.fixture
def site(tmp_path):
    return tiny_site(tmp_path / "site")


def _site_handler() -> Handler:
    """The site's own train/evaluate handler (client/site/handlers.py), default policy."""
    from client.site.handlers import make_handler
    from client.site.policy import SitePolicy

    return make_handler(SitePolicy.default())


def _app_context(site, run: dict) -> Context:
    node = {"dataset-dir": str(site), "state-dir": str(site.parent / "state")}
    return _context(run | {"batch-size": 8}, **node)


@pytest.mark.parametrize("run", [RUN, DP_RUN], ids=["no-dp", "dp"])
def test_the_sites_train_reply_passes(site, run):
    # Prepare
    request = _request(arrays=_update())
    # Execute
    reply = egress_guard(request, _app_context(site, run), _site_handler())
    # Assert
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    # the validation score histogram travels for the coordinator to sum (no SecAgg here)
    assert set(reply.content) == {"arrays", "metrics", secure_sum.RECORD}
    hist = reply.content[secure_sum.RECORD][secure_sum.SCORE_HISTOGRAM].numpy()
    assert hist.shape == (2, 100) and hist.sum() == reply.content["metrics"]["val-num-examples"]
    assert ("epsilon" in reply.content["metrics"]) is (run is DP_RUN)


def test_the_sites_evaluate_reply_passes(site):
    # Prepare
    request = _request(MessageType.EVALUATE, arrays=_update())
    # Execute
    reply = egress_guard(request, _app_context(site, RUN), _site_handler())
    # Assert
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert {"num-examples", "val-accuracy", "val-auroc"} <= set(reply.content["metrics"])


@pytest.mark.parametrize("stage", [ADVERTISE, SHARE_KEYS, MASKED_INPUT, UNMASK])
def test_each_honest_secagg_stage_reply_passes(stage):
    # Execute
    reply = _guard(_stage_reply(stage), run=SECAGG_RUN, request=_stage_request(stage))
    # Assert
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""


def test_a_full_secagg_round_through_the_production_mods_passes():
    # Prepare: three sites, the real secagg_mod inside the guard (tests/server/test_secagg.py)
    from tests.server.test_secagg import run_round

    grid, _, rnd, contents = run_round([11, 22, 33], run_config=DP_RUN | {"secagg.enabled": True})
    # Execute
    rnd.run(contents)
    # Assert: all four stages of all three sites left the site
    assert len(grid.replies) == 12 and not any(r.has_error() for r in grid.replies)


def test_scaffold_honest_reply_passes():
    # Prepare
    params = {n: p.detach().clone() for n, p in get_model("cnn").named_parameters()}
    content = _plain_train(**{"scaffold-dc": ArrayRecord(params)})
    # Execute / Assert
    assert not _guard(content, run=SCAFFOLD_RUN).has_error()
