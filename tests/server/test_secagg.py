"""SecAgg+ end to end in one process: the real client mods and the real server Grid wrapper.

``InProcessGrid`` is a transport only: it hands each message to the production mod chain
(egress guard outermost, then ``secagg_mod``) around a real training handler (CNN state
dicts after SGD steps on random data) with one persistent ``Context`` per site, and can
drop chosen sites at chosen stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

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
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from client.egress import egress_guard
from client.secagg_mod import secagg_mod
from common.config import RunConfig, SecAggConfig
from common.models import get_model
from common.records import state_to_record
from common.secagg.errors import SecAggAbortedError
from common.secagg.params import RECORD
from server.secagg import (
    ABORT_CODE,
    FAULT_DROPPED,
    FAULT_EXCLUDED,
    FAULT_FAILED,
    FAULT_LATE,
    SecAggGrid,
    SecAggRound,
)
from tests.server.messages import StubGrid

Handler = Callable[[Message, Context], Message]


def train_handler(*, steps: int = 2, lr: float = 0.05) -> Handler:
    """A real local-training handler: CNN, SGD on random 28x28 images, per-site seed."""

    def handler(msg: Message, context: Context) -> Message:
        model = get_model("cnn")
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        g = torch.Generator().manual_seed(context.node_id)
        n = 16 + 8 * (context.node_id % 5)  # unequal weights
        x = torch.rand(n, 1, 28, 28, generator=g)
        y = torch.randint(0, 2, (n,), generator=g)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        metrics = MetricRecord({"num-examples": n, "train-loss": float(loss.detach())})
        return Message(
            RecordDict({"arrays": state_to_record(model), "metrics": metrics}), reply_to=msg
        )

    return handler


class InProcessGrid(StubGrid):
    """Deliver messages to in-process sites through ``secagg_mod``; drop on request."""

    def __init__(
        self,
        node_ids: Iterable[int],
        *,
        handler: Handler,
        run_config: dict | None = None,
        drop: Callable[[str, int], bool] | None = None,
        tamper: Callable[[str, int, Message], Message] | None = None,
    ) -> None:
        cfg = dict(run_config or {})
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config=cfg)
            for n in node_ids
        }
        self.node_ids = list(self.contexts)
        self.handler = handler
        self.drop = drop or (lambda stage, node: False)
        self.tamper = tamper
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def push_messages(self, messages):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            rec = msg.content.config_records.get(RECORD) if msg.has_content() else None
            stage = str(rec["stage"]) if rec is not None else msg.metadata.message_type
            if self.drop(stage, node):
                continue
            reply = egress_guard(
                msg, self.contexts[node], lambda m, c: secagg_mod(m, c, self.handler)
            )
            if self.tamper is not None:
                reply = self.tamper(stage, node, reply)
            self.replies.append(reply)
            out.append(reply)
        return out


def train_messages(grid: Grid, nodes: list[int], arrays: ArrayRecord, server_round: int = 1):
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return [grid.create_message(content, MessageType.TRAIN, n, str(server_round)) for n in nodes]


def plaintext_fedavg(grid: InProcessGrid, nodes, arrays):
    """What each site would have sent without secure aggregation, and FedAvg's mean."""
    results = {}
    for n in nodes:
        msg = train_messages(grid, [n], arrays)[0]
        results[n] = grid.handler(msg, grid.contexts[n]).content
    total = sum(float(r["metrics"]["num-examples"]) for r in results.values())
    mean = {}
    for key in arrays:
        mean[key] = sum(
            float(r["metrics"]["num-examples"])
            / total
            * r["arrays"][key].numpy().astype(np.float64)
            for r in results.values()
        )
    return results, mean, total


def run_round(nodes, *, drop=None, tamper=None, params=None, run_config=None):
    torch.manual_seed(0)
    arrays = state_to_record(get_model("cnn"))
    grid = InProcessGrid(
        nodes, handler=train_handler(), drop=drop, tamper=tamper, run_config=run_config
    )
    rnd = SecAggRound(
        params=params or RunConfig.from_run_config(run_config or {}).secagg,
        server_round=1,
        global_arrays=arrays,
        transport=_transport(grid),
    )
    contents = {m.metadata.dst_node_id: m.content for m in train_messages(grid, nodes, arrays)}
    return grid, arrays, rnd, contents


def _transport(grid: InProcessGrid):
    def send(stage, contents):
        msgs = [grid.create_message(c, MessageType.TRAIN, n, "1") for n, c in contents.items()]
        return {
            r.metadata.src_node_id: (r.error.reason if r.has_error() else r.content)
            for r in grid.send_and_receive(msgs)
        }

    return send


NODES = [11, 22, 33, 44, 55]


def test_unmasked_aggregate_equals_plaintext_weighted_mean_within_bound():
    # Prepare
    grid, arrays, rnd, contents = run_round(NODES)
    _, expected, total = plaintext_fedavg(grid, NODES, arrays)
    # Execute
    result = rnd.run(contents)
    # Assert: the documented bound n * c / 2^31 (no dropout, deterministic rounding)
    bound = len(NODES) * SecAggConfig().clip_range / 2**31
    got_delta = result.mean_delta
    exp_delta = np.concatenate(
        [(expected[k] - arrays[k].numpy().astype(np.float64)).ravel() for k in arrays]
    )
    assert result.survivors == NODES
    assert result.total_weight == total
    assert np.max(np.abs(got_delta - exp_delta)) <= bound
    assert np.max(np.abs(exp_delta)) > 1e-3  # the updates are real, not zeros
    for k in arrays:  # the float32 model equals FedAvg's up to float32 rounding
        np.testing.assert_allclose(result.arrays[k], expected[k], rtol=0, atol=1e-6)


def test_nothing_a_site_sends_contains_its_plaintext_update():
    # Prepare
    grid, arrays, rnd, contents = run_round(NODES[:3])
    plain, _, _ = plaintext_fedavg(grid, NODES[:3], arrays)
    # Execute
    rnd.run(contents)
    # Assert: no reply carries the trained weights; the only array is the uint32 vector
    for reply in grid.replies:
        node = reply.metadata.src_node_id
        trained = np.concatenate([a.numpy().ravel() for a in plain[node]["arrays"].values()])
        for ar in reply.content.array_records.values():
            assert list(ar) == ["vector"] and ar["vector"].dtype == "uint32"
            vec = ar["vector"].numpy()[: trained.size]  # the rest: secure-sum entries
            assert not np.array_equal(vec.view(np.float32), trained)
            # unrelated to the input (|r| < 6 sigma of independent data) ...
            r = np.corrcoef(vec.astype(np.float64), trained.astype(np.float64))[0, 1]
            assert abs(r) < 6 / np.sqrt(vec.size)
            # ... and its bytes are uniform: chi-square, 255 dof, 0.999 quantile 330.5
            counts = np.bincount(np.frombuffer(vec.tobytes(), np.uint8), minlength=256)
            expected = vec.nbytes / 256
            assert ((counts - expected) ** 2 / expected).sum() < 330.5


@pytest.mark.parametrize("stage", ["unmask", "masked-input"])
def test_dropout_at_threshold_recovers_exact_sum_of_survivors(stage):
    # Prepare: 5 holders, threshold 0.5 -> t = 3, so 2 may drop
    dropped = {44, 55}
    grid, arrays, rnd, contents = run_round(NODES, drop=lambda s, n: s == stage and n in dropped)
    # sites that drop at unmask already sent their masked input: they stay in the sum
    in_sum = NODES if stage == "unmask" else [n for n in NODES if n not in dropped]
    _, expected, total = plaintext_fedavg(grid, in_sum, arrays)
    # Execute
    result = rnd.run(contents)
    # Assert
    assert result.survivors == in_sum
    assert result.total_weight == total
    for k in arrays:
        np.testing.assert_allclose(result.arrays[k], expected[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", ["unmask", "masked-input", "share-keys"])
def test_dropout_beyond_threshold_fails_loudly(stage):
    # Prepare: 3 of 5 drop, t = 3
    _, _, rnd, contents = run_round(NODES, drop=lambda s, n: s == stage and n in {33, 44, 55})
    # Execute / Assert
    with pytest.raises(SecAggAbortedError, match="aborted"):
        rnd.run(contents)
    assert rnd.report.status == "failed"
    assert set(rnd.report.dropped[stage]) == {33, 44, 55}


def test_ring_graph_neighbourhoods_recover_dropouts():
    # Prepare: 7 sites, 4 neighbours each (5 holders, t = 3); one drops before masking
    nodes = [101, 102, 103, 104, 105, 106, 107]
    params = RunConfig.from_run_config({"secagg.neighbours": 4}).secagg
    run_config = {"secagg.neighbours": 4}
    grid, arrays, rnd, contents = run_round(
        nodes,
        drop=lambda s, n: s == "masked-input" and n == 104,
        params=params,
        run_config=run_config,
    )
    survivors = [n for n in nodes if n != 104]
    _, expected, _ = plaintext_fedavg(grid, survivors, arrays)
    # Execute
    result = rnd.run(contents)
    # Assert
    assert result.survivors == survivors
    sent = [
        m
        for m in grid.sent
        if m.content.config_records.get(RECORD, {}).get("stage") == "share-keys"
    ]
    assert all(len(m.content[RECORD]["nodes"]) == 5 for m in sent)
    for k in arrays:
        np.testing.assert_allclose(result.arrays[k], expected[k], rtol=0, atol=1e-6)


def test_malformed_masked_vector_excludes_the_site_and_round_completes():
    # Prepare: site 22 sends a float32 vector instead of uint32
    def tamper(stage, node, reply):
        if stage == "masked-input" and node == 22:
            vec = reply.content["masked"]["vector"].numpy()
            reply.content["masked"] = ArrayRecord(
                {"vector": __import__("flwr").app.Array(vec.astype(np.float32))}
            )
        return reply

    grid, arrays, rnd, contents = run_round(NODES, tamper=tamper)
    survivors = [n for n in NODES if n != 22]
    _, expected, _ = plaintext_fedavg(grid, survivors, arrays)
    # Execute
    result = rnd.run(contents)
    # Assert
    assert 22 in rnd.report.excluded and "uint32" in rnd.report.excluded[22]
    assert result.survivors == survivors
    for k in arrays:
        np.testing.assert_allclose(result.arrays[k], expected[k], rtol=0, atol=1e-6)


def test_wrong_unmask_share_is_detected_and_other_shares_used():
    # Prepare: site 33 reveals a corrupted seed share of site 11
    def tamper(stage, node, reply):
        if stage == "unmask" and node == 33:
            rec = reply.content[RECORD]
            nodes = list(rec["seed-nodes"])
            shares = list(rec["seed-shares"])
            i = nodes.index(11)
            shares[i] = bytes(b ^ 0xFF for b in shares[i])
            rec["seed-shares"] = shares
        return reply

    grid, arrays, rnd, contents = run_round(NODES, tamper=tamper)
    _, expected, _ = plaintext_fedavg(grid, NODES, arrays)
    # Execute
    result = rnd.run(contents)
    # Assert
    for k in arrays:
        np.testing.assert_allclose(result.arrays[k], expected[k], rtol=0, atol=1e-6)


def test_grid_wrapper_drives_flower_fedavg_to_the_secure_mean(tmp_path, server_identity):
    # Prepare
    nodes = [7, 8, 9]
    torch.manual_seed(0)
    initial = state_to_record(get_model("cnn"))
    # Flower's bare FedAvg takes one ArrayRecord per reply: no secure-sum record here
    # (medfed's RecordingStrategy takes it out first; tests/server/test_operating_point.py)
    run = RunConfig.from_run_config({"secagg.enabled": True, "operating-point": "none"})
    inner = InProcessGrid(nodes, handler=train_handler(), run_config=run.to_run_config())
    grid = SecAggGrid(inner, params=run.secagg, run_dir=tmp_path)
    _, expected, _ = plaintext_fedavg(inner, nodes, initial)
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3, fraction_evaluate=0.0)
    # Execute: one round of Flower's own FedAvg over the wrapped grid
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
    # Assert
    got = result.arrays.to_torch_state_dict()
    for k in initial:
        np.testing.assert_allclose(got[k].numpy(), expected[k], rtol=0, atol=1e-6)
    line = (tmp_path / "secagg.jsonl").read_text().splitlines()
    assert len(line) == 1 and '"status": "ok"' in line[0]
    # every uploaded array was a masked uint32 vector
    uploads = [ar for r in inner.replies for ar in r.content.array_records.values()]
    assert len(uploads) == 3 and all(ar["vector"].dtype == "uint32" for ar in uploads)


def test_grid_wrapper_records_failed_round_as_site_errors(tmp_path):
    # Prepare: 2 of 3 sites vanish after key advertisement
    nodes = [7, 8, 9]
    torch.manual_seed(0)
    initial = state_to_record(get_model("cnn"))
    run = RunConfig.from_run_config({"secagg.enabled": True})
    inner = InProcessGrid(
        nodes,
        handler=train_handler(),
        run_config=run.to_run_config(),
        drop=lambda s, n: s == "share-keys" and n != 7,
    )
    grid = SecAggGrid(inner, params=run.secagg, run_dir=tmp_path)
    msgs = train_messages(grid, nodes, initial)
    # Execute
    replies = list(grid.send_and_receive(msgs, timeout=10))
    # Assert
    assert len(replies) == 3 and all(r.has_error() for r in replies)
    reasons = {r.metadata.src_node_id: r.error.reason for r in replies}
    assert "aborted at share-keys" in reasons[7]  # the survivor learns why
    assert all("share-keys: no reply" in reasons[n] for n in (8, 9))  # the others' own fault
    # the late sites read as dropped in rounds.jsonl (as without SecAgg+), the survivor failed
    codes = {r.metadata.src_node_id: r.error.code for r in replies}
    assert codes == {7: ABORT_CODE, 8: ErrorCode.NODE_UNAVAILABLE, 9: ErrorCode.NODE_UNAVAILABLE}
    assert '"status": "failed"' in (tmp_path / "secagg.jsonl").read_text()


def test_each_way_of_leaving_a_stage_is_recorded_with_its_kind():
    # Prepare: four sites answer advertise-keys in four ways, none with keys
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    replies = {
        1: Error(code=ErrorCode.NODE_UNAVAILABLE, reason="gone"),
        2: Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="crash"),
        3: RecordDict({"metrics": MetricRecord({"num-examples": 1})}),  # no secagg record
    }  # site 4 does not answer before the deadline
    rnd = SecAggRound(
        params=SecAggConfig(),
        server_round=3,
        global_arrays=arrays,
        transport=lambda stage, contents: replies,
    )
    # Execute
    with pytest.raises(SecAggAbortedError, match="aborted at advertise-keys"):
        rnd.run({n: RecordDict({"arrays": arrays}) for n in (1, 2, 3, 4)})
    # Assert
    line = rnd.report.as_json()
    assert [(f["site"], f["stage"], f["kind"], f["in-sum"]) for f in line["faults"]] == [
        (1, "advertise-keys", FAULT_DROPPED, False),
        (2, "advertise-keys", FAULT_FAILED, False),
        (3, "advertise-keys", FAULT_EXCLUDED, False),
        (4, "advertise-keys", FAULT_LATE, False),
    ]
    assert line["faults"][3]["reason"] == "no reply before the deadline"


def test_threshold_formula_for_typical_federations():
    p = SecAggConfig()
    assert [p.shares_needed(m) for m in (2, 3, 5, 10, 50)] == [2, 2, 3, 6, 26]
    assert all(m - p.shares_needed(m) == math.ceil(m / 2) - 1 for m in range(2, 51))
