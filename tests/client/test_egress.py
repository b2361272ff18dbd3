"""The egress guard (client/egress.py) as a Flower mod, with handlers that misbehave."""

import logging
import time
import uuid

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
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from client.egress import REASON_PREFIX, egress_guard
from common import wire
from common.models import get_model
from common.records import state_to_record

# Plaintext training replies (secure aggregation off); the secagg case is tested below.
RUN = {"model": "cnn", "num-classes": 2, "secagg.enabled": False}
SECRET = 0.123456789


def _context(**run):
    return Context(
        run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=dict(RUN) | run
    )


def _incoming():
    # A message as the SuperNode hands it to the ClientApp (full metadata, as in
    # tests/server/test_secagg.py), so that replies can be built with reply_to=.
    md = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), metadata=md)


def _guard(content: RecordDict) -> Message:
    msg = _incoming()
    return egress_guard(msg, _context(), lambda m, c: Message(content, reply_to=m))


def _good_metrics(**extra):
    return MetricRecord(
        {"num-examples": 30, "train-loss": 0.5, "train-steps": 4, "train-seconds": 1.0} | extra
    )


def test_model_update_and_allowed_metrics_pass():
    content = RecordDict(
        {"arrays": state_to_record(get_model("cnn")), "metrics": _good_metrics(epsilon=1.5)}
    )
    reply = _guard(content)
    assert not reply.has_error()
    assert reply.content is content


def test_evaluate_reply_with_val_metrics_passes():
    content = RecordDict(
        {"metrics": MetricRecord({"num-examples": 9, "val-accuracy": 0.7, "val-auroc": np.nan})}
    )
    assert not _guard(content).has_error()


def _assert_refused(reply: Message, caplog, *, names: str):
    assert reply.has_error()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert reply.error.reason.startswith(REASON_PREFIX)
    assert names in reply.error.reason
    site_log = " ".join(r.getMessage() for r in caplog.records if r.name == "client.egress")
    assert names in site_log
    assert str(SECRET) not in site_log and str(SECRET) not in reply.error.reason


def test_data_tensor_smuggled_in_the_model_record_is_refused(caplog):
    state = {k: v for k, v in get_model("cnn").state_dict().items()}
    state["patient_images"] = torch.full((4, 1, 28, 28), SECRET)
    reply = _guard(RecordDict({"arrays": ArrayRecord(state), "metrics": _good_metrics()}))
    _assert_refused(reply, caplog, names="'patient_images'")


def test_extra_array_record_is_refused(caplog):
    extra = ArrayRecord({"x": Array(np.full((28, 28), SECRET, dtype=np.float32))})
    content = RecordDict(
        {"arrays": state_to_record(get_model("cnn")), "leak": extra, "metrics": _good_metrics()}
    )
    _assert_refused(_guard(content), caplog, names="'leak'")


def test_reshaped_or_retyped_model_array_is_refused(caplog):
    state = {k: v.clone() for k, v in get_model("cnn").state_dict().items()}
    first = next(iter(state))
    state[first] = state[first].double()
    reply = _guard(RecordDict({"arrays": ArrayRecord(state), "metrics": _good_metrics()}))
    _assert_refused(reply, caplog, names=repr(first))


def test_bytes_appended_after_array_data_are_refused(caplog):
    record = state_to_record(get_model("cnn"))
    first = next(iter(record))
    a = record[first]
    record[first] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data + b"PHI" * 10)
    reply = _guard(RecordDict({"arrays": record, "metrics": _good_metrics()}))
    _assert_refused(reply, caplog, names="extra bytes")


def test_string_metric_in_a_config_record_is_refused(caplog):
    content = RecordDict(
        {
            "arrays": state_to_record(get_model("cnn")),
            "metrics": _good_metrics(),
            "notes": ConfigRecord({"patient-name": f"Doe^{SECRET}"}),
        }
    )
    _assert_refused(_guard(content), caplog, names="'patient-name'")


def test_unknown_or_list_metric_is_refused(caplog):
    reply = _guard(RecordDict({"metrics": _good_metrics(**{"mean-age": SECRET})}))
    _assert_refused(reply, caplog, names="'mean-age'")
    reply = _guard(RecordDict({"metrics": _good_metrics(**{"val-accuracy": [SECRET, 0.5]})}))
    _assert_refused(reply, caplog, names="'val-accuracy'")


def test_error_replies_pass_unchanged():
    msg = _incoming()
    err = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom")
    reply = egress_guard(msg, _context(), lambda m, c: Message(err, reply_to=m))
    assert reply.has_error() and reply.error.reason == "boom"


def test_registered_extra_record_passes_and_is_checked(caplog):
    # Prepare: what secure aggregation does to allow its masked vector
    name = "test-masked"
    check = wire.array_spec_check(lambda run: {"vector": ((10,), "uint32")})
    wire.register_record(name, check)
    try:
        good = ArrayRecord({"vector": Array(np.zeros(10, dtype=np.uint32))})
        bad = ArrayRecord({"vector": Array(np.zeros(11, dtype=np.uint32))})
        # Execute / Assert
        assert not _guard(RecordDict({name: good, "metrics": _good_metrics()})).has_error()
        with caplog.at_level(logging.ERROR):
            _assert_refused(
                _guard(RecordDict({name: bad, "metrics": _good_metrics()})),
                caplog,
                names="'vector'",
            )
    finally:
        del wire.EXTRA_RECORDS[name]
    with pytest.raises(ValueError, match="reserved"):
        wire.register_record("arrays", check)


def test_guard_is_installed_first_on_the_client_app():
    from client.app import app

    assert app._mods[0] is egress_guard


def test_plaintext_update_is_refused_when_secure_aggregation_is_on():
    # Prepare: a correct model update, but the run promises the server only sees sums
    content = RecordDict({"arrays": state_to_record(get_model("cnn")), "metrics": _good_metrics()})
    msg = _incoming()
    # Execute
    reply = egress_guard(
        msg, _context(**{"secagg.enabled": True}), lambda m, c: Message(content, reply_to=m)
    )
    # Assert
    assert reply.has_error()
    assert "plaintext model update while secure aggregation is on" in reply.error.reason
