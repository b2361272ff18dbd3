"""Site-side DP: Opacus accounting, the persistent privacy ledger and its enforcement."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from client.privacy import (
    DPRandomness,
    PrivacyBudgetError,
    PrivacyError,
    PrivacyLedger,
    check_budget,
    epsilon_of,
    plan_round,
    private_training,
)
from client.train import make_optimizer, make_train_loader, train_epochs
from common.models import get_model
from common.site_dataset import SplitArrays

sigmas = st.floats(min_value=0.5, max_value=5.0)
rates = st.floats(min_value=0.001, max_value=0.5)


@settings(max_examples=40, deadline=None)
@given(sigma=sigmas, q=rates, a=st.integers(1, 500), b=st.integers(1, 500))
def test_epsilon_is_monotone_in_steps(sigma, q, a, b):
    lo, hi = sorted((a, b))
    e_lo = epsilon_of([(sigma, q, lo)], delta=1e-5)
    e_hi = epsilon_of([(sigma, q, hi)], delta=1e-5)
    assert e_lo <= e_hi + 1e-12


@settings(max_examples=25, deadline=None)
@given(history=st.lists(st.tuples(sigmas, rates, st.integers(1, 50)), min_size=1, max_size=4))
def test_ledger_epsilon_equals_opacus_accountant_stepped_live(history, tmp_path_factory):
    # Prepare: Opacus's own accountant, stepped one optimizer step at a time
    live = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            live.step(noise_multiplier=sigma, sample_rate=q)
    ledger = PrivacyLedger(tmp_path_factory.mktemp("state"))
    # Execute: persist the history, read it back, account from the ledger
    ledger.update("p/d", {"history": [list(h) for h in live.history], "plans": {}})
    restored = [tuple(h) for h in ledger.entry("p/d")["history"]]
    # Assert
    assert epsilon_of(restored, delta=1e-5) == pytest.approx(live.get_epsilon(delta=1e-5))


def test_noise_derived_from_target_reaches_target_after_all_rounds():
    plan = plan_round(
        num_examples=1000,
        batch_size=50,
        local_epochs=2,
        num_rounds=5,
        max_grad_norm=1.0,
        delta=1e-4,
        accountant="rdp",
        noise_multiplier=None,
        target_epsilon=4.0,
    )
    total = [(plan.noise_multiplier, plan.sample_rate, plan.steps * 5)]
    assert plan.sample_rate == pytest.approx(1 / 20) and plan.steps == 40
    assert 3.9 <= epsilon_of(total, delta=1e-4) <= 4.0 + 1e-9
    # one round alone spends much less than the whole budget: it is not a per-round target
    assert epsilon_of([(plan.noise_multiplier, plan.sample_rate, plan.steps)], delta=1e-4) < 2.5


def _tiny_split(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return SplitArrays.create(rng.random((n, 1, 28, 28)), rng.integers(0, 2, n))


def _dp_round(state_dir, *, max_epsilon=50.0, run_id=1, randomness=None):
    torch.manual_seed(0)
    model = get_model("cnn")
    split = _tiny_split()
    loader = make_train_loader(split, batch_size=10, generator=torch.Generator().manual_seed(0))
    opt = make_optimizer(model, learning_rate=0.05, momentum=0.0, weight_decay=0.0)
    plan = plan_round(
        num_examples=40,
        batch_size=10,
        local_epochs=1,
        num_rounds=3,
        max_grad_norm=1.0,
        delta=1e-3,
        accountant="rdp",
        noise_multiplier=1.0,
        target_epsilon=8.0,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ledger = PrivacyLedger(state_dir)
    with private_training(
        model=model,
        optimizer=opt,
        loader=loader,
        plan=plan,
        ledger=ledger,
        key="proj/data",
        run_id=run_id,
        max_epsilon=max_epsilon,
        max_physical_batch_size=4,
        randomness=randomness or DPRandomness.secret(torch.device("cpu")),
    ) as priv:
        train_epochs(
            priv.model, priv.loader, optimizer=priv.optimizer, epochs=1, device=torch.device("cpu")
        )
    return priv, model, before


def test_ledger_accumulates_across_rounds_and_a_second_process(tmp_path):
    # Prepare + Execute: two rounds in this process
    first, model, _ = _dp_round(tmp_path)
    second, _, _ = _dp_round(tmp_path)
    # Assert: cumulative, not per round, and the plain module's keys are unchanged
    assert 0 < first.epsilon < second.epsilon
    assert not any(k.startswith("_module") for k in model.state_dict())
    # A separate Python process (a restarted SuperNode) reads the same ledger
    code = (
        "import sys; from pathlib import Path; from client.privacy import PrivacyLedger, "
        "epsilon_of; e = PrivacyLedger(Path(sys.argv[1])).entry('proj/data'); "
        "print(epsilon_of([tuple(h) for h in e['history']], delta=1e-3))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert float(out.stdout) == pytest.approx(second.epsilon)
    history = PrivacyLedger(tmp_path).entry("proj/data")["history"]
    live = RDPAccountant()
    live.history = [tuple(h) for h in history]
    assert second.epsilon == pytest.approx(live.get_epsilon(delta=1e-3))
    # every Opacus step was recorded: 2 rounds x 4 logical batches
    assert sum(h[2] for h in history) == 8


def test_round_that_would_cross_the_ceiling_is_refused_before_any_step(tmp_path):
    first, _, _ = _dp_round(tmp_path)
    ledger_before = (tmp_path / "privacy-ledger.json").read_text()
    with pytest.raises(PrivacyBudgetError, match="dp-max-epsilon") as info:
        _dp_round(tmp_path, max_epsilon=first.epsilon + 1e-6)
    assert "refuses" in str(info.value)
    assert (tmp_path / "privacy-ledger.json").read_text() == ledger_before  # nothing spent


def test_refusal_happens_before_training_touches_the_model(tmp_path):
    model = get_model("cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_round(
        num_examples=40,
        batch_size=10,
        local_epochs=1,
        num_rounds=1,
        max_grad_norm=1.0,
        delta=1e-3,
        accountant="rdp",
        noise_multiplier=0.3,
        target_epsilon=1.0,
    )
    with pytest.raises(PrivacyBudgetError):
        check_budget([], plan, max_epsilon=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("damage", ["edit", "garbage", "delete-key"])
def test_tampered_or_corrupt_ledger_is_refused_never_reset(tmp_path, damage):
    _dp_round(tmp_path)
    path = tmp_path / "privacy-ledger.json"
    if damage == "edit":  # lower the spent steps to fake a fresh budget
        doc = json.loads(path.read_text())
        doc["entries"]["proj/data"]["history"][0][2] = 1
        path.write_text(json.dumps(doc))
    elif damage == "garbage":
        path.write_text("{not json")
    else:
        (tmp_path / "privacy-ledger.key").unlink()
    with pytest.raises(PrivacyError, match="refuses to train"):
        _dp_round(tmp_path)


def test_missing_ledger_starts_at_zero(tmp_path):
    assert PrivacyLedger(tmp_path / "new").entry("p/d")["history"] == []
