"""The site's secure-aggregation mod: state persistence, ordering, refusals."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client.secagg_mod import STATE_RECORD, SiteSecAggState, secagg_mod
from common import secure_sum
from common.config import RunConfig
from common.models import get_model
from common.records import state_to_record
from common.replies import ReplyCode, fixed_reason
from common.secagg import crypto
from common.secagg.params import ADVERTISE, RECORD, SHARE_KEYS, UNMASK
from common.secagg.schema import Header
from tests.server.test_secagg import train_handler

SESSION = bytes(range(16))


def _msg(node: int, content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    md = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content, metadata=md)


def _cnn_size() -> int:
    """Masked entries: the CNN's float weights plus the default run's secure sums."""
    extra = secure_sum.length(secure_sum.spec(RunConfig()))
    floats = sum(v.numel() for v in get_model("cnn").state_dict().values() if v.is_floating_point())
    return floats + extra


def _context(node: int, **run_config) -> Context:
    return Context(
        run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config=run_config
    )


def _advertise(node: int, context: Context, *, lr: float = 0.05) -> Message:
    torch.manual_seed(0)
    content = RecordDict(
        {
            "arrays": state_to_record(get_model("cnn")),
            "config": ConfigRecord({"server-round": 1}),
            RECORD: Header(ADVERTISE, 1, SESSION).record(),
        }
    )
    return secagg_mod(_msg(node, content), context, train_handler(lr=lr))


def test_advertise_trains_keeps_delta_in_state_and_sends_only_public_keys():
    # Prepare
    context = _context(7)
    # Execute
    reply = _advertise(7, context)
    # Assert
    assert not reply.has_error()
    assert not reply.content.array_records  # nothing but keys and metrics leave
    rec = reply.content[RECORD]
    assert len(rec["enc-pk"]) == 32 and len(rec["mask-pk"]) == 32
    assert reply.content["metrics"]["num-examples"] == 16 + 8 * (7 % 5)
    state = SiteSecAggState.from_context(context, with_delta=True)
    assert state.stage == ADVERTISE and state.delta is not None and state.delta.size == _cnn_size()
    assert crypto.public_key(state.mask_sk) == rec["mask-pk"]


def test_state_round_trips_through_state_dict():
    # Prepare
    state = SiteSecAggState(
        stage=SHARE_KEYS,
        server_round=3,
        session=SESSION,
        node_id=2**63 + 5,
        enc_sk=bytes(32),
        nodes=[1, 2],
        share_key=[b"k" * 32],
        delta=np.arange(5, dtype=np.float64),
    )
    # Execute
    config, delta = state.state_dict()
    restored = SiteSecAggState()
    restored.load_state_dict(config, delta)
    # Assert
    assert restored.node_id == state.node_id and restored.nodes == [1, 2]
    assert restored.share_key == [b"k" * 32] and restored.share_src == []
    np.testing.assert_array_equal(restored.delta, state.delta)


def test_out_of_order_stage_is_refused_and_state_wiped():
    # Prepare
    context = _context(7)
    _advertise(7, context)
    unmask = RecordDict(
        {
            RECORD: Header(UNMASK, 1, SESSION).record(
                survivors=[7], dropped=[], **{"num-survivors": 3}
            )
        }
    )
    # Execute
    reply = secagg_mod(_msg(7, unmask), context, train_handler())
    # Assert
    assert reply.has_error() and "must follow" in reply.error.reason
    assert SiteSecAggState.from_context(context).stage == ""
    assert STATE_RECORD in context.state.config_records


def test_update_beyond_clip_range_is_refused_not_clipped():
    # Prepare: a huge learning rate makes the delta exceed clip-range 0.001
    context = _context(7, **{"secagg.clip-range": 0.001})
    # Execute
    reply = _advertise(7, context, lr=5.0)
    # Assert
    assert reply.has_error() and "secagg.clip-range" in reply.error.reason


def test_plaintext_train_message_is_refused_when_the_run_promised_secure_aggregation():
    # Prepare
    context = _context(7, **{"secagg.enabled": True})
    torch.manual_seed(0)
    content = RecordDict(
        {
            "arrays": state_to_record(get_model("cnn")),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    # Execute
    reply = secagg_mod(_msg(7, content), context, train_handler())
    # Assert
    assert reply.has_error() and "secagg.enabled" in reply.error.reason


def test_messages_without_secagg_record_pass_through_when_secagg_is_off():
    # Prepare
    context = _context(7, **{"secagg.enabled": False})
    torch.manual_seed(0)
    content = RecordDict(
        {
            "arrays": state_to_record(get_model("cnn")),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    # Execute
    reply = secagg_mod(_msg(7, content), context, train_handler())
    # Assert: the plain train reply, untouched
    assert list(reply.content.array_records) == ["arrays"]
    assert STATE_RECORD not in context.state.config_records


def test_egress_guard_passes_every_secagg_reply_and_none_holds_the_plaintext():
    # Prepare: a full in-process round through the production mod chain
    from flwr.common.serde import recorddict_to_proto

    from tests.server.test_secagg import plaintext_fedavg, run_round

    nodes = [11, 22, 33]
    grid, arrays, rnd, contents = run_round(nodes)
    plain, _, _ = plaintext_fedavg(grid, nodes, arrays)
    # Execute
    rnd.run(contents)
    # Assert: the guard let every reply out (no error) ...
    assert len(grid.replies) == 4 * len(nodes)
    assert not any(r.has_error() for r in grid.replies)
    for reply in grid.replies:
        node = reply.metadata.src_node_id
        wire_bytes = recorddict_to_proto(reply.content).SerializeToString()
        # ... no reply carries a model record, and no run of the trained weights' bytes
        assert "arrays" not in reply.content
        for key, trained in plain[node]["arrays"].items():
            changed = trained.numpy().ravel()[:64]
            if changed.size >= 8 and not np.array_equal(changed, arrays[key].numpy().ravel()[:64]):
                assert changed[:8].tobytes() not in wire_bytes, key


def test_egress_guard_refuses_a_secagg_record_with_an_extra_field():
    # Prepare: a mod that tries to smuggle the plaintext delta next to the public keys
    from client.egress import egress_guard

    context = _context(7)

    def leaky_secagg(msg, ctx, call_next):
        reply = secagg_mod(msg, ctx, call_next)
        reply.content[RECORD]["delta"] = b"\x00" * 32
        return reply

    torch.manual_seed(0)
    content = RecordDict(
        {
            "arrays": state_to_record(get_model("cnn")),
            "config": ConfigRecord({"server-round": 1}),
            RECORD: Header(ADVERTISE, 1, SESSION).record(),
        }
    )
    # Execute
    reply = egress_guard(
        _msg(7, content), context, lambda m, c: leaky_secagg(m, c, train_handler())
    )
    # Assert
    assert reply.has_error()
    assert reply.error.reason == fixed_reason(ReplyCode.EGRESS, "stage-record")
