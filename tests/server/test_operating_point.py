"""The sites' validation score histograms reach the coordinator only as their sum."""

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from common import secure_sum
from common.config import RunConfig
from common.models import get_model
from common.operating_point import choose_threshold
from common.records import state_to_record
from server.secagg import SecAggGrid
from tests.server.test_secagg import InProcessGrid, train_handler, train_messages

NODES = [7, 8, 9]


def _histogram(node: int, bins: int) -> np.ndarray:
    """Each site's own score histogram: counts that differ per site."""
    rng = np.random.default_rng(node)
    return rng.integers(0, 40, size=(2, bins)).astype(np.float64)


def _with_histogram(bins: int):
    inner = train_handler()

    def handler(msg: Message, context: Context) -> Message:
        reply = inner(msg, context)
        hist = _histogram(context.node_id, bins)
        reply.content[secure_sum.RECORD] = ArrayRecord(
            {secure_sum.SCORE_HISTOGRAM: Array(hist.astype(np.float32))}
        )
        return reply

    return handler


def test_secure_histogram_equals_the_pooled_one_and_no_site_sends_its_own(tmp_path):
    # Prepare: three sites behind the production egress guard and SecAgg+ mod
    run = RunConfig.from_run_config({"secagg.enabled": True, "operating-point-bins": 20})
    torch.manual_seed(0)
    initial = state_to_record(get_model("cnn"))
    inner = InProcessGrid(NODES, handler=_with_histogram(20), run_config=run.to_run_config())
    grid = SecAggGrid(inner, params=run.secagg, run_dir=tmp_path)
    pooled = sum(_histogram(n, 20) for n in NODES)
    # Execute
    replies = list(grid.send_and_receive(train_messages(grid, NODES, initial), timeout=10))
    # Assert: the sum rides on exactly one reply and equals the pooled histogram
    carrying = [r for r in replies if secure_sum.RECORD in r.content]
    assert len(replies) == 3 and len(carrying) == 1
    got = carrying[0].content[secure_sum.RECORD][secure_sum.SCORE_HISTOGRAM].numpy()
    np.testing.assert_array_equal(got, pooled)
    # what left each site: only protocol records and one uint32 vector, never a histogram
    for reply in inner.replies:
        assert secure_sum.RECORD not in reply.content
        for ar in reply.content.array_records.values():
            assert list(ar) == ["vector"] and ar["vector"].dtype == "uint32"


def _reply(node: int, hist: np.ndarray | None, val: dict[str, float]) -> Message:
    from tests.server.messages import new_message

    request = new_message(RecordDict(), "train", node, "1")
    content = RecordDict(
        {
            "arrays": state_to_record(get_model("cnn")),
            "metrics": MetricRecord({"num-examples": 10, **val}),
        }
    )
    if hist is not None:
        content[secure_sum.RECORD] = ArrayRecord(
            {secure_sum.SCORE_HISTOGRAM: Array(hist.astype(np.float32))}
        )
    reply = Message(content, reply_to=request)
    return reply


def test_best_model_stores_the_pooled_youden_threshold(tmp_path):
    # Prepare: plaintext replies (SecAgg off) in round 1 validate round 0's model
    from flwr.serverapp.strategy import FedAvg

    from common.checkpoint import load_checkpoint
    from server.runlog import RecordingStrategy
    from server.selection import BEST_MODEL

    site_a = np.array([[6, 2, 1, 1], [0, 1, 3, 6]], float)
    site_b = np.array([[1, 3, 6, 0], [0, 0, 3, 7]], float)  # pooled Youden point: 0.75
    meta = {"model": "cnn", "model_kwargs": {"num_classes": 2}, "task": "classification"}
    strategy = RecordingStrategy(
        FedAvg(),
        run_dir=tmp_path,
        checkpoint_meta=meta,
        selection_metric="val-balanced-accuracy",
        operating_point="youden",
    )
    arrays = state_to_record(get_model("cnn"))
    val = {"val-balanced-accuracy": 0.8, "val-num-examples": 20}
    replies = [_reply(1, site_a, val), _reply(2, site_b, val)]
    # Execute
    strategy.make_evaluate_fn(None)(0, arrays)
    strategy.aggregate_train(1, replies)  # the inner FedAvg sees no secure-sum record
    strategy.make_evaluate_fn(None)(1, arrays)
    # Assert
    np.testing.assert_array_equal(strategy.histograms[0], site_a + site_b)
    best = load_checkpoint(tmp_path / BEST_MODEL)
    assert best.selected_round == 0
    assert best.operating_point is not None
    assert best.operating_point == choose_threshold(site_a + site_b, server_round=0).as_dict()
    assert best.operating_point["threshold"] == 0.75
    line = (tmp_path / "rounds.jsonl").read_text().splitlines()[-1]
    assert '"operating-point"' in line and '"threshold": 0.75' in line
