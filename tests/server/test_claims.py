"""A site that lies about its size cannot set the global model (issue 14, item 5)."""

import numpy as np
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig
from common.models import get_model
from common.records import state_to_record
from server.claims import ClaimRegistry
from server.runlog import RecordingStrategy
from server.secagg import SecAggRound
from tests.server.messages import new_message
from tests.server.test_secagg import (
    InProcessGrid,
    _transport,
    plaintext_fedavg,
    train_handler,
    train_messages,
)

LIE = 10**12


def test_registry_caps_first_claims_and_holds_sites_to_their_registered_count():
    claims = ClaimRegistry(max_examples=1000)
    assert claims.check(1, 600, server_round=1) is None  # registered: 600
    assert "max-site-examples = 1000" in str(claims.check(2, LIE, server_round=1))
    assert claims.check(1, 600, server_round=2) is None
    assert "registered count 600" in str(claims.check(1, 601, server_round=3))
    assert claims.check(1, 300, server_round=4) is None  # fewer (e.g. a smaller epoch) is fine
    assert claims.check(3, True, server_round=1) is not None  # not a count
    assert claims.check(3, float("nan"), server_round=1) is not None
    assert [r["node"] for r in claims.refused] == [2, 1, 3, 3]


def _lie(stage: str, node: int, reply: Message) -> Message:
    """Site 9 runs its own code: it claims 10^12 examples past its egress guard."""
    if node == 9 and stage == "advertise-keys" and not reply.has_error():
        reply.content["metrics"]["num-examples"] = LIE
    return reply


def test_secagg_round_excludes_a_lying_site_before_masking():
    # Prepare: site 9 claims 10^12 examples; the cap is the default max-site-examples
    nodes = [7, 8, 9]
    run = RunConfig.from_run_config({"secagg.enabled": True})
    torch.manual_seed(0)
    arrays = state_to_record(get_model("cnn"))
    grid = InProcessGrid(
        nodes, handler=train_handler(), run_config=run.to_run_config(), tamper=_lie
    )
    claims = ClaimRegistry(run.federation.max_site_examples)
    rnd = SecAggRound(
        params=run.secagg,
        server_round=1,
        global_arrays=arrays,
        transport=_transport(grid),
        claims=claims,
    )
    contents = {m.metadata.dst_node_id: m.content for m in train_messages(grid, nodes, arrays)}
    honest = InProcessGrid([7, 8], handler=train_handler(), run_config=run.to_run_config())
    _, expected, _ = plaintext_fedavg(honest, [7, 8], arrays)
    # Execute
    result = rnd.run(contents)
    # Assert: the liar is out and the model is the honest sites' weighted mean
    assert result.survivors == [7, 8]
    assert "max-site-examples" in rnd.report.excluded[9]
    for k in arrays:
        np.testing.assert_allclose(result.arrays[k], expected[k], rtol=0, atol=1e-6)


def _reply(node: int, n: float, value: float) -> Message:
    request = new_message(RecordDict(), "train", node, "1")
    state = {k: torch.full_like(v, value) for k, v in get_model("cnn").state_dict().items()}
    model = get_model("cnn")
    model.load_state_dict(state)
    metrics = MetricRecord({"num-examples": n})
    return Message(
        RecordDict({"arrays": state_to_record(model), "metrics": metrics}), reply_to=request
    )


def test_plain_aggregation_leaves_out_a_lying_site_and_records_why(tmp_path):
    # Prepare: without SecAgg the round log's strategy checks the claims
    claims = ClaimRegistry(max_examples=1000)
    meta = {"model": "cnn", "model_kwargs": {"num_classes": 2}, "task": "classification"}
    strategy = RecordingStrategy(FedAvg(), run_dir=tmp_path, checkpoint_meta=meta, claims=claims)
    replies = [_reply(1, 100, 1.0), _reply(2, 300, 2.0), _reply(3, LIE, 100.0)]
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: the mean of the honest sites (100 * 1 + 300 * 2) / 400 = 1.75
    assert arrays is not None
    for v in arrays.to_torch_state_dict().values():
        if v.is_floating_point():
            assert torch.allclose(v, torch.full_like(v, 1.75))
    assert "max-site-examples" in strategy._train.failed[3]
    assert 3 not in strategy._train.replied
