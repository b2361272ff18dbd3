"""The census before round 1: the federation's label counts, and only their sum."""

import numpy as np
import torch
from flwr.app import Context, RecordDict

from client.site.handlers import make_handler
from client.site.policy import SitePolicy
from common import secure_sum
from common.config import RunConfig
from common.models import get_model
from common.records import state_to_record
from common.site_dataset import SiteDataset
from server.census import run_census
from server.secagg import SecAggGrid
from tests.server.test_secagg import InProcessGrid
from tests.sites import tiny_site

NODES = [7, 8, 9]


def _sites(tmp_path, run: RunConfig) -> tuple[InProcessGrid, np.ndarray]:
    """Three real site datasets behind the production site handler, guard and mod."""
    grid = InProcessGrid(
        NODES, handler=make_handler(SitePolicy.default()), run_config=run.to_run_config()
    )
    pooled = np.zeros(2)
    for i, node in enumerate(NODES):
        site = tiny_site(tmp_path / f"site-{node}", train=10 + 7 * i, val=6, seed=node)
        labels = np.asarray(SiteDataset(site).load("train").labels)
        pooled += np.bincount(labels, minlength=2)
        node_config = {"dataset-dir": str(site), "state-dir": str(tmp_path / f"state-{node}")}
        grid.contexts[node] = Context(
            run_id=1,
            node_id=node,
            node_config=node_config,
            state=RecordDict(),
            run_config=run.to_run_config(),
        )
    return grid, pooled


def test_secure_census_returns_the_pooled_counts_and_trains_nothing(tmp_path):
    # Prepare
    run = RunConfig.from_run_config(
        {"secagg.enabled": True, "class-weighting": "federation", "batch-size": 8}
    )
    inner, pooled = _sites(tmp_path, run)
    grid = SecAggGrid(inner, params=run.secagg, run_dir=tmp_path)
    torch.manual_seed(0)
    initial = state_to_record(get_model("cnn"))
    # Execute
    counts = run_census(grid, initial_arrays=initial, min_replies=3, timeout=60)
    # Assert: the exact pooled counts, and only masked vectors left the sites
    np.testing.assert_array_equal(counts, pooled)
    for reply in inner.replies:
        assert secure_sum.RECORD not in reply.content
        for ar in reply.content.array_records.values():
            assert list(ar) == ["vector"] and ar["vector"].dtype == "uint32"
    # nothing was trained: no site spent privacy budget (no ledger written)
    assert not any(
        (tmp_path / f"state-{n}").exists() and any((tmp_path / f"state-{n}").iterdir())
        for n in NODES
    )


def test_plain_census_sums_the_sites_records(tmp_path):
    run = RunConfig.from_run_config(
        {"secagg.enabled": False, "class-weighting": "federation", "batch-size": 8}
    )
    grid, pooled = _sites(tmp_path, run)
    counts = run_census(
        grid, initial_arrays=state_to_record(get_model("cnn")), min_replies=3, timeout=60
    )
    np.testing.assert_array_equal(counts, pooled)


def _evaluate_messages(grid, arrays, server_round: int):
    from flwr.app import ConfigRecord, MessageType

    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return [grid.create_message(content, MessageType.EVALUATE, n, str(server_round)) for n in NODES]


def test_final_validation_under_secagg_sums_the_histograms_and_trains_nothing(tmp_path):
    # Prepare: the last round's model, validated by three real sites under SecAgg+
    from client.site.handlers import local_validation, prepare

    run = RunConfig.from_run_config(
        {"secagg.enabled": True, "batch-size": 8, "operating-point-bins": 20}
    )
    inner, _ = _sites(tmp_path, run)
    grid = SecAggGrid(inner, params=run.secagg, run_dir=tmp_path, secure_validation=True)
    torch.manual_seed(0)
    final = state_to_record(get_model("cnn"))
    messages = _evaluate_messages(grid, final, server_round=3)
    # what each site's histogram would be, by the site's own validation code
    own = {}
    for msg in messages:
        node = msg.metadata.dst_node_id
        job = prepare(msg.content, inner.contexts[node], policy=SitePolicy.default())
        own[node] = local_validation(job).secure_sum[secure_sum.SCORE_HISTOGRAM]
    # Execute
    replies = list(grid.send_and_receive(messages, timeout=60))
    # Assert: evaluate replies with each site's validation count and val-* metrics ...
    assert sorted(r.metadata.src_node_id for r in replies) == NODES
    assert all(not r.has_error() and r.metadata.message_type == "evaluate" for r in replies)
    for r in replies:
        metrics = r.content["metrics"]
        assert metrics["num-examples"] == 6
        assert 0.0 <= metrics["val-balanced-accuracy"] <= 1.0
        assert "val-num-examples" not in metrics and "train-loss" not in metrics
    # ... the pooled histogram exactly, on one reply only ...
    carrying = [r for r in replies if secure_sum.RECORD in r.content]
    assert len(carrying) == 1
    got = carrying[0].content[secure_sum.RECORD][secure_sum.SCORE_HISTOGRAM].numpy()
    np.testing.assert_array_equal(got, sum(own.values()))
    assert got.sum() == 18  # every validation image counted once
    # ... while only masked vectors left the sites, and nothing was trained
    for reply in inner.replies:
        assert secure_sum.RECORD not in reply.content
        for ar in reply.content.array_records.values():
            assert list(ar) == ["vector"] and ar["vector"].dtype == "uint32"
    assert run.dp.enabled and not any(
        (tmp_path / f"state-{n}").exists() and any((tmp_path / f"state-{n}").iterdir())
        for n in NODES
    ), "a validate-only round must not train (no privacy ledger written)"
    lines = (tmp_path / "secagg.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"purpose": "validate"' in lines[0]


def test_evaluate_passes_through_without_secure_validation(tmp_path):
    # Prepare: SecAgg+ without an operating point: evaluate messages are plain
    run = RunConfig.from_run_config(
        {"secagg.enabled": True, "batch-size": 8, "operating-point": "none"}
    )
    inner, _ = _sites(tmp_path, run)
    grid = SecAggGrid(inner, params=run.secagg, run_dir=tmp_path)
    messages = _evaluate_messages(grid, state_to_record(get_model("cnn")), server_round=1)
    # Execute
    replies = list(grid.send_and_receive(messages, timeout=60))
    # Assert: one plain reply per site and no secure round
    assert len(replies) == 3 and not (tmp_path / "secagg.jsonl").exists()
    assert all(secure_sum.RECORD not in r.content for r in replies)
