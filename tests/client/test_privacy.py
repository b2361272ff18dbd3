"""Site-side DP: Opacus accounting, the persistent privacy ledger and its enforcement."""

import contextlib
import inspect
import json
import shutil
import subprocess
import sys
import threading

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
    ledger_key,
    plan_round,
    private_training,
)
from client.site.audit import AuditLog
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


KEY = ledger_key("data")


def _dp_round(state_dir, *, max_epsilon=50.0, run_id=1, randomness=None, inside=None):
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
        key=KEY,
        run_id=run_id,
        max_epsilon=max_epsilon,
        max_physical_batch_size=4,
        randomness=randomness or DPRandomness.secret(torch.device("cpu")),
    ) as priv:
        if inside is not None:
            inside()
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
        "epsilon_of; e = PrivacyLedger(Path(sys.argv[1])).entry(sys.argv[2]); "
        "print(epsilon_of([tuple(h) for h in e['history']], delta=1e-3))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), KEY], capture_output=True, text=True, check=True
    )
    assert float(out.stdout) == pytest.approx(second.epsilon)
    history = PrivacyLedger(tmp_path).entry(KEY)["history"]
    live = RDPAccountant()
    live.history = [tuple(h) for h in history]
    assert second.epsilon == pytest.approx(live.get_epsilon(delta=1e-3))
    # every Opacus step was recorded: 2 rounds x 4 logical batches
    assert sum(h[2] for h in history) == 8


def test_round_that_would_cross_the_ceiling_is_refused_before_any_step(tmp_path):
    first, _, _ = _dp_round(tmp_path)
    ledger_before = (tmp_path / "privacy-ledger.json").read_text()
    with pytest.raises(PrivacyBudgetError, match=r"max-epsilon=.*site policy") as info:
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
        doc["entries"][KEY]["history"][0][2] = 1
        path.write_text(json.dumps(doc))
    elif damage == "garbage":
        path.write_text("{not json")
    else:
        (tmp_path / "privacy-ledger.key").unlink()
    with pytest.raises(PrivacyError, match="refuses to train"):
        _dp_round(tmp_path)


def test_missing_ledger_starts_at_zero(tmp_path):
    assert PrivacyLedger(tmp_path / "new").entry("p/d")["history"] == []


# ---------------------------------------------------------------- attacks on the ledger
def _ceiling_after(state_dir):
    """Cumulative epsilon recorded so far (the ceiling that refuses any further round)."""
    history = [tuple(h) for h in PrivacyLedger(state_dir).entry(KEY)["history"]]
    return epsilon_of(history, delta=1e-3) + 1e-6


def test_rolled_back_ledger_is_refused(tmp_path):
    # Prepare: one round, keep a validly signed copy, a second round, then the ceiling
    _dp_round(tmp_path)
    old = (tmp_path / "privacy-ledger.json").read_bytes()
    _dp_round(tmp_path)
    ceiling = _ceiling_after(tmp_path)
    with pytest.raises(PrivacyBudgetError):
        _dp_round(tmp_path, max_epsilon=ceiling)
    # Execute: restore the older copy (its HMAC is valid)
    (tmp_path / "privacy-ledger.json").write_bytes(old)
    # Assert: refused as rolled back, and the message carries no path
    with pytest.raises(PrivacyError, match="rolled back") as info:
        _dp_round(tmp_path, max_epsilon=ceiling)
    assert str(tmp_path) not in str(info.value)
    assert "medfed budget reset" in str(info.value)


@pytest.mark.parametrize("also_key", [False, True])
def test_deleted_ledger_is_refused_not_restarted_at_zero(tmp_path, also_key):
    _dp_round(tmp_path)
    (tmp_path / "privacy-ledger.json").unlink()
    if also_key:
        (tmp_path / "privacy-ledger.key").unlink()
    with pytest.raises(PrivacyError, match="deleted") as info:
        _dp_round(tmp_path)
    assert str(tmp_path) not in str(info.value)


@pytest.mark.parametrize("target", ["anchored-site", "fresh-dir"])
def test_ledger_and_key_copied_from_another_site_are_refused(tmp_path, target):
    # Prepare: site A spent one round; site B spent two
    site_a, site_b = tmp_path / "a", tmp_path / "b"
    _dp_round(site_a)
    if target == "anchored-site":
        _dp_round(site_b)
        _dp_round(site_b)
    # Execute: A's ledger and its key copied into B's state dir
    site_b.mkdir(exist_ok=True)
    for name in ("privacy-ledger.json", "privacy-ledger.key"):
        shutil.copy(site_a / name, site_b / name)
    # Assert
    with pytest.raises(PrivacyError, match="replaced") as info:
        _dp_round(site_b)
    assert str(tmp_path) not in str(info.value)


def _overlapping_rounds(state_dir, *, max_epsilon):
    """Two rounds in two threads whose training overlaps unless the ledger serialises them."""
    both_inside = threading.Barrier(2)

    def wait_for_the_other():
        # serialised: the other round waits for the lock, and the barrier times out
        with contextlib.suppress(threading.BrokenBarrierError):
            both_inside.wait(timeout=3)

    outcomes = []

    def one_round():
        try:
            _dp_round(state_dir, max_epsilon=max_epsilon, inside=wait_for_the_other)
            outcomes.append("trained")
        except PrivacyBudgetError:
            outcomes.append("refused")

    threads = [threading.Thread(target=one_round) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return sorted(outcomes)


def test_overlapping_rounds_record_every_step(tmp_path):
    # Execute
    outcomes = _overlapping_rounds(tmp_path, max_epsilon=50.0)
    # Assert: 2 rounds x 4 logical batches, none lost
    assert outcomes == ["trained", "trained"]
    history = PrivacyLedger(tmp_path).entry(KEY)["history"]
    assert sum(h[2] for h in history) == 8
    assert AuditLog(tmp_path).verify() >= 2


def test_overlapping_rounds_cannot_both_pass_the_budget_check(tmp_path):
    # Prepare: the ceiling affords exactly one more round (measured on a twin site)
    twin = tmp_path / "twin"
    _dp_round(twin)
    ceiling = _ceiling_after(twin)
    # Execute
    outcomes = _overlapping_rounds(tmp_path / "site", max_epsilon=ceiling)
    # Assert
    assert outcomes == ["refused", "trained"]
    assert sum(h[2] for h in PrivacyLedger(tmp_path / "site").entry(KEY)["history"]) == 4


def test_budget_key_is_the_dataset_whatever_the_project_is_called():
    # The coordinator names the project; the site's ceiling must not depend on it.
    assert list(inspect.signature(ledger_key).parameters) == ["dataset_fingerprint"]
    assert ledger_key("ab12") == ledger_key("ab12") != ledger_key("cd34")


def test_honest_rounds_accumulate_and_every_write_is_anchored(tmp_path):
    # Execute
    epsilons = [_dp_round(tmp_path, run_id=r)[0].epsilon for r in (1, 1, 2)]
    # Assert: cumulative epsilon, three anchors in an intact chain matching the ledger
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    audit = AuditLog(tmp_path)
    assert audit.verify() == 3
    anchors = [e for e in audit.entries() if e["event"] == "ledger"]
    assert [a["ledger_seq"] for a in anchors] == [1, 2, 3]
    assert [a["epsilon"] for a in anchors] == pytest.approx(epsilons)
    assert all(a["dataset"] == KEY for a in anchors)
    doc = json.loads((tmp_path / "privacy-ledger.json").read_text())
    assert doc["seq"] == 3 and sorted(doc["entries"][KEY]["plans"]) == ["1", "2"]
    assert str(tmp_path) not in (tmp_path / "audit.jsonl").read_text()


def test_reset_after_rollback_restarts_that_dataset_and_is_audited(tmp_path):
    # Prepare: a rolled-back ledger the site refuses
    _dp_round(tmp_path)
    old = (tmp_path / "privacy-ledger.json").read_bytes()
    _dp_round(tmp_path)
    (tmp_path / "privacy-ledger.json").write_bytes(old)
    with pytest.raises(PrivacyError):
        _dp_round(tmp_path)
    # Execute: the hospital resets explicitly
    PrivacyLedger(tmp_path).reset(KEY)
    first = _dp_round(tmp_path)[0]
    # Assert: the dataset restarted (one round of steps), and the audit log says so
    assert sum(h[2] for h in PrivacyLedger(tmp_path).entry(KEY)["history"]) == 4
    assert first.epsilon > 0
    audit = AuditLog(tmp_path)
    audit.verify()
    reset = audit.last("ledger-reset")
    assert reset is not None and reset["dataset"] == KEY


def test_interrupted_write_is_completed_on_the_next_read(tmp_path):
    # Prepare: a round, then simulate a crash after the anchor, before the rename
    _dp_round(tmp_path)
    ledger = PrivacyLedger(tmp_path)
    path = tmp_path / "privacy-ledger.json"
    before = path.read_bytes()
    ledger.update(KEY, dict(ledger.entry(KEY), history=[]))
    after = path.read_bytes()
    path.write_bytes(before)
    (tmp_path / "privacy-ledger.json.pending").write_bytes(after)
    # Execute + Assert: the anchored write wins, and nothing is left pending
    assert PrivacyLedger(tmp_path).entry(KEY)["history"] == []
    assert path.read_bytes() == after
    assert not (tmp_path / "privacy-ledger.json.pending").exists()


def test_a_legacy_ledger_is_adopted_with_projects_merged_per_dataset(tmp_path):
    # Prepare: a version-1 ledger (keyed project/dataset, no seq) signed with its key
    from client.privacy import KEY_FILE, LEDGER_FILE

    key = b"k" * 32
    (tmp_path / KEY_FILE).write_bytes(key)
    body = {
        "format": "medfed-privacy-ledger",
        "version": 1,
        "entries": {
            "p1/data": {"history": [[1.0, 0.25, 4]], "plans": {"1": 1.0}, "delta": 1e-3},
            "p2/data": {"history": [[1.0, 0.25, 8]], "plans": {"2": 1.0}, "delta": 1e-3},
        },
    }
    doc = dict(body, mac=PrivacyLedger._mac(key, body))
    (tmp_path / LEDGER_FILE).write_text(json.dumps(doc))
    # Execute
    entries = PrivacyLedger(tmp_path).read()
    # Assert: one budget per dataset, both projects' steps in it
    assert list(entries) == [ledger_key("data")]
    assert sum(h[2] for h in entries[ledger_key("data")]["history"]) == 12
