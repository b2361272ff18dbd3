"""The site trains with class weights from its own label counts (issue 13, item 1)."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from client.site.handlers import prepare, site_class_weights, train_content
from client.site.simulated import research_policy
from common import secure_sum
from common.errors import DataError
from common.imbalance import balanced_class_weights
from common.models import get_model
from common.records import state_to_record
from common.site_dataset import SiteDataset
from tests.sites import tiny_site


@pytest.fixture
def site(tmp_path):
    return tiny_site(tmp_path / "sites" / "site-0", train=32, val=8, seed=3)


def _job(site, config=None, **run):
    torch.manual_seed(0)
    content = RecordDict(
        {
            "arrays": state_to_record(get_model("cnn")),
            "config": ConfigRecord({"server-round": 1, **(config or {})}),
        }
    )
    context = Context(
        run_id=7,
        node_id=1,
        node_config={"dataset-dir": str(site), "state-dir": str(site.parent / "state")},
        state=RecordDict(),
        run_config={"batch-size": 8, "dp.enabled": False, "secagg.enabled": False, **run},
    )
    return prepare(content, context, policy=research_policy())


def test_site_weights_are_the_balanced_weights_of_the_sites_own_train_labels(site):
    # Prepare: the site's own training labels
    labels = SiteDataset(site).load("train").labels
    counts = np.bincount(labels, minlength=2)
    # Execute
    got = {
        mode: site_class_weights(_job(site, **{"class-weighting": mode}), labels)
        for mode in ("auto", "site", "none")
    }
    # Assert: "auto" is "site" for classification; float32 on the job's device
    expected = torch.as_tensor(balanced_class_weights(counts), dtype=torch.float32)
    torch.testing.assert_close(got["site"], expected)
    torch.testing.assert_close(got["auto"], expected)
    assert got["none"] is None
    capped = site_class_weights(_job(site, **{"class-weight-max": 1.0}), labels)
    torch.testing.assert_close(capped, torch.ones(2))


def test_federation_weights_come_from_the_summed_counts_in_the_train_config(site):
    # Prepare: the federation's counts (from the census) differ from this site's
    labels = SiteDataset(site).load("train").labels
    federation = [900.0, 100.0]
    key = secure_sum.FEDERATION_COUNTS_KEY
    # Execute
    weights = site_class_weights(
        _job(site, {key: federation}, **{"class-weighting": "federation"}), labels
    )
    before_census = site_class_weights(_job(site, **{"class-weighting": "federation"}), labels)
    # Assert: weights of the federation's counts; the site's own as the fallback
    expected = balanced_class_weights(np.array(federation))
    torch.testing.assert_close(weights, torch.as_tensor(expected, dtype=torch.float32))
    own = balanced_class_weights(np.bincount(labels, minlength=2))
    torch.testing.assert_close(before_census, torch.as_tensor(own, dtype=torch.float32))
    with pytest.raises(DataError, match=key):
        _job(site, {key: [1.0, -2.0]}, **{"class-weighting": "federation"})


def _update(site, **run):
    reply = train_content(_job(site, **run))
    state = reply.array_records["arrays"].to_torch_state_dict()
    return torch.cat([v.flatten().float() for v in state.values()])


def test_training_uses_the_weights(site):
    # Execute: non-DP rounds are deterministic (run-config shuffling), so the only
    # difference between these updates is the loss
    weighted = _update(site, **{"class-weighting": "site"})
    again = _update(site, **{"class-weighting": "site"})
    plain = _update(site, **{"class-weighting": "none"})
    # Assert
    torch.testing.assert_close(weighted, again, rtol=0, atol=0)
    assert not torch.allclose(weighted, plain)
