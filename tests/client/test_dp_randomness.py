"""DP noise and Poisson sampling are secret to the site (issue 12, item 1).

The attack: a coordinator knows the run config (seed), the round and the site's
partition id. Before this change it could regenerate every Gaussian draw and batch of
a site and subtract the noise from its update. These tests play that coordinator.
"""

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from client.privacy import DPRandomness, PrivacyError
from client.site.handlers import _round_seed, dp_randomness, prepare, train_content
from client.site.service import SiteService
from client.site.simulated import research_policy
from common.models import get_model
from common.records import state_to_record
from common.replies import ReplyCode
from tests.server.messages import new_message
from tests.sites import tiny_site


@pytest.fixture
def site(tmp_path):
    return tiny_site(tmp_path / "sites" / "site-0", train=32, val=8)


def _content():
    torch.manual_seed(0)
    return RecordDict(
        {
            "arrays": state_to_record(get_model("cnn")),
            "config": ConfigRecord({"server-round": 3}),
        }
    )


def _context(site, *, simulated, **run):
    node = {"state-dir": str(site.parent.parent / "state")}
    if simulated:  # Flower's simulation engine sets partition-id; a real SuperNode does not
        node["partition-id"] = 0
        run = {"sites-dir": str(site.parent), **run}
    else:
        node["dataset-dir"] = str(site)
    return Context(
        run_id=7,
        node_id=1,
        node_config=node,
        state=RecordDict(),
        run_config={"batch-size": 8, "seed": 42, "dp.noise-multiplier": 1.0, **run},
    )


def _update(site, *, simulated=False, **run):
    job = prepare(_content(), _context(site, simulated=simulated, **run), policy=research_policy())
    reply = train_content(job)
    return reply.array_records["arrays"].to_torch_state_dict()


def _flat(state):
    return torch.cat([v.flatten().float() for v in state.values()])


def test_two_runs_with_the_same_run_config_give_different_dp_updates(site):
    # Prepare + Execute: same model, data, run config and seed, twice
    a = _flat(_update(site))
    b = _flat(_update(site))
    # Assert: the noise (and the sampled batches) differ
    assert not torch.allclose(a, b)


def test_replaying_the_generators_from_run_config_does_not_reproduce_an_update(site, monkeypatch):
    # Prepare: the honest site's update under secret randomness
    secret = _flat(_update(site, simulated=True))
    # Execute: the coordinator regenerates the site's generators from what it knows
    # (run seed, round, partition id), with the seeds medfed used before this change
    import client.site.handlers as app_module

    monkeypatch.setattr(
        app_module, "dp_randomness", lambda j: DPRandomness.seeded(_round_seed(j), j.device)
    )
    replay_1 = _flat(_update(site, simulated=True))
    replay_2 = _flat(_update(site, simulated=True))
    # Assert: the replay is deterministic (the attack works when seeds are known) but
    # it does not reproduce the site's real update
    assert torch.equal(replay_1, replay_2)
    assert not torch.allclose(secret, replay_1)


def test_reproducible_noise_repeats_exactly_in_simulation_only(site):
    # Execute: the simulation-only research switch, twice
    a = _flat(_update(site, simulated=True, **{"dp.reproducible-noise": True}))
    b = _flat(_update(site, simulated=True, **{"dp.reproducible-noise": True}))
    # Assert
    assert torch.equal(a, b)


def test_reproducible_noise_is_refused_outside_simulation(site):
    # Prepare: a coordinator asks a real site (no partition-id) for seeded noise
    ctx = _context(site, simulated=False, **{"dp.reproducible-noise": True})
    job = prepare(_content(), ctx, policy=research_policy())
    # Execute / Assert: the generators are refused ...
    with pytest.raises(PrivacyError, match="simulation only"):
        dp_randomness(job)
    # ... and a site worker's service refuses the message before any work, even under
    # a permissive policy; nothing is trained or charged
    service = SiteService(policy=research_policy(), simulated=False)
    reply = service.handle(new_message(_content(), "train", 1, "3"), ctx)
    assert reply.has_error()
    assert reply.error.code == ReplyCode.POLICY
    assert not (site.parent.parent / "state" / "privacy-ledger.json").exists()


def test_secret_generators_are_fresh():
    # Prepare / Execute: two draws of the round generators on CPU
    first = DPRandomness.secret(torch.device("cpu"))
    second = DPRandomness.secret(torch.device("cpu"))
    # Assert: independent seeds from the OS CSPRNG, not the run config's
    assert first.sampling.initial_seed() != second.sampling.initial_seed()
    assert first.noise.initial_seed() != first.sampling.initial_seed()
    assert not first.reproducible


def test_dp_optimizer_runs_in_secure_noise_mode(tmp_path):
    from tests.client.test_privacy import _dp_round

    priv, _, _ = _dp_round(tmp_path)
    # Opacus's secure_mode noise algorithm (sum of 4 draws / 2) on our generator
    assert priv.optimizer.secure_mode is True
    assert priv.optimizer.generator is not None
