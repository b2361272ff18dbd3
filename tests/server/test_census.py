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
from common.secagg.params import SecAggParams
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
    run = RunConfig(secagg_enabled=True, class_weighting="federation", batch_size=8)
    inner, pooled = _sites(tmp_path, run)
    grid = SecAggGrid(inner, params=SecAggParams.from_run(run), run_dir=tmp_path)
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
    run = RunConfig(secagg_enabled=False, class_weighting="federation", batch_size=8)
    grid, pooled = _sites(tmp_path, run)
    counts = run_census(
        grid, initial_arrays=state_to_record(get_model("cnn")), min_replies=3, timeout=60
    )
    np.testing.assert_array_equal(counts, pooled)
