"""Resume end to end: a crashed coordinator goes on and ends where it would have.

* In one process: the real ServerApp and the real ClientApps of two virtual sites
  (``client.app.dispatch``: site service, policy, DP-SGD with Opacus, privacy ledger,
  egress guard) on tiny site datasets. The coordinator dies after the sites trained in
  round 2 (they spent privacy budget on an update that never arrived) and is resumed as a
  new run (new run id) with ``resume-from``. With ``dp.reproducible-noise`` (simulation
  only, not private) the resumed run ends at exactly the global model of an
  uninterrupted one, and every site's epsilon is at least the uninterrupted run's.
* Real processes (slow): ``medfed simulate`` killed with SIGKILL mid-round, with every
  process it started (SuperLink, ServerApp, Ray), then ``medfed simulate --resume``
  finishes the run with every round in ``rounds.jsonl`` exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client.app import dispatch
from common.checkpoint import load_checkpoint
from server.app import main
from server.resume import RESUME_FILE, load_state
from tests.server.messages import InMemoryGrid
from tests.sites import tiny_site

#: Virtual sites: (training images, validation images, signal).
SITES = ((32, 8, 0.5), (24, 12, 0.3))
ROUNDS = 3
MEDFED = str(Path(sys.executable).parent / "medfed")


class Killed(BaseException):
    """The coordinator dies here."""


class Federation(InMemoryGrid):
    """Deliver each message to a virtual site's ClientApp; replies in node order.

    ``kill_after_train`` names a round whose train messages the sites answer (they train
    and record the privacy spent) before the coordinator dies, without their replies.
    """

    def __init__(self, run_config: dict, run_id: int, kill_after_train: int | None = None):
        self.contexts = {
            100 + i: Context(
                run_id=run_id,
                node_id=100 + i,
                node_config={"partition-id": i},
                state=RecordDict(),
                run_config=run_config,
            )
            for i in range(len(SITES))
        }
        self.kill_after_train = kill_after_train
        super().__init__(self.contexts)

    def answer(self, msg: Message) -> Message:
        return dispatch(msg, self.contexts[msg.metadata.dst_node_id])

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)  # the sites answer (and train) first
        rounds = {
            m.content.config_records["config"]["server-round"]
            for m in messages
            if m.metadata.message_type == "train"
        }
        if self.kill_after_train in rounds:
            raise Killed(f"after the sites trained in round {self.kill_after_train}")
        return ids


def _config(root: Path, **changes: Any) -> dict[str, Any]:
    for i, (train, val, signal_) in enumerate(SITES):
        site = root / "sites" / f"site-{i}"
        if not site.exists():
            tiny_site(site, train=train, val=val, seed=i, signal=signal_)
    return {
        "num-server-rounds": ROUNDS, "min-sites": len(SITES), "batch-size": 4,
        "learning-rate": 0.05, "strategy": "fedadam", "dp.enabled": True,
        "dp.reproducible-noise": True, "dp.noise-multiplier": 2.0, "secagg.enabled": False,
        "connect-timeout": 5.0, "run-dir": str(root / "run"),
        "sites-dir": str(root / "sites"), **changes,
    }  # fmt: skip


def _federate(config: dict[str, Any], *, run_id: int, kill_after_train: int | None = None):
    grid = Federation(config, run_id, kill_after_train)
    main(
        grid,
        Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config),
    )


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.slow  # three runs with DP-SGD at two sites: about a minute on 2 cores
def test_a_resumed_run_ends_at_the_uninterrupted_runs_model(tmp_path, server_identity):
    # Prepare: the uninterrupted run
    _federate(_config(tmp_path / "whole"), run_id=1)
    whole = tmp_path / "whole" / "run"
    # Execute: the coordinator dies in round 2, after the sites trained; a new run resumes it
    config = _config(tmp_path / "crash")
    with pytest.raises(Killed):
        _federate(config, run_id=1, kill_after_train=2)
    crashed = tmp_path / "crash" / "run"
    assert load_state(crashed).round == 1  # type: ignore[union-attr]
    _federate({**config, "resume-from": str(crashed)}, run_id=2)
    # Assert: the same final (and best) global model, bit for bit
    a = load_checkpoint(whole / "final_model.pt").state_dict
    b = load_checkpoint(crashed / "final_model.pt").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    best_a, best_b = (load_checkpoint(d / "best_model.pt") for d in (whole, crashed))
    assert best_a.selected_round == best_b.selected_round
    assert all(torch.equal(best_a.state_dict[k], best_b.state_dict[k]) for k in a)
    # every round is in the log once, with the same aggregated metrics
    lines_a, lines_b = _rounds(whole), _rounds(crashed)
    assert [x["round"] for x in lines_b] == list(range(ROUNDS + 1))
    for la, lb in zip(lines_a[1:], lines_b[1:], strict=True):
        assert la["train"]["metrics"]["train-loss"] == lb["train"]["metrics"]["train-loss"]
        assert la["model-selection"] == lb["model-selection"]
    # the sites' ledgers went on: the lost round's spending counts, never less epsilon
    eps_a = lines_a[-1]["train"]["sites"]
    eps_b = lines_b[-1]["train"]["sites"]
    spent_a = sorted(s["epsilon"] for s in eps_a.values())
    spent_b = sorted(s["epsilon"] for s in eps_b.values())
    assert all(b > a for a, b in zip(spent_a, spent_b, strict=True))
    assert (crashed / RESUME_FILE).is_file()


# ------------------------------------------------------------------- real processes
def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _sigkill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything it started, frozen first so nothing escapes."""
    tree = [proc.pid]
    for _ in range(3):  # freeze, then look again for children started meanwhile
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        tree = [proc.pid, *_descendants(proc.pid)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in tree:  # gone (or a zombie of a killed parent, reaped by init)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_mid_round_then_resume_finishes_the_run(tmp_path, pneumonia_npz):
    # Prepare: 2 virtual sites, 3 rounds; site 0 is slowed so a round lasts seconds
    run_dir = tmp_path / "run"
    env = {**os.environ, "MEDFED_DATA_DIR": str(pneumonia_npz.parents[1]), "COLUMNS": "200"}
    args = [
        "simulate", "--sites", "2", "--partition", "iid", "--rounds", "3",
        "--run-dir", str(run_dir), "--set", "local-epochs=1", "--set", "batch-size=256",
        "--set", "faults.slow-site=0", "--set", "faults.slow-seconds=4",
        "--set", "dp.target-epsilon=4",
    ]  # fmt: skip
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([MEDFED, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    # Execute: SIGKILL everything once round 1 is committed and round 2 is under way
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        state = load_state(run_dir) if (run_dir / RESUME_FILE).is_file() else None
        if state is not None and state.round == 1:
            break
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    else:
        pytest.fail("round 1 never finished")
    time.sleep(1.5)  # inside round 2 (site 0 sleeps 4 s)
    _sigkill_tree(proc)
    assert not (run_dir / "final_model.pt").exists()
    assert [line["round"] for line in _rounds(run_dir)] == [0, 1]
    resumed = subprocess.run(
        [MEDFED, "simulate", "--resume", str(run_dir)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    # Assert: the run finished, every round logged exactly once
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "after round 1 of 3" in resumed.stdout
    assert [line["round"] for line in _rounds(run_dir)] == [0, 1, 2, 3]
    assert load_checkpoint(run_dir / "final_model.pt").round == 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "round-001.pt", "round-002.pt", "round-003.pt",
    ]  # fmt: skip
    secagg = [json.loads(x) for x in (run_dir / "secagg.jsonl").read_text().splitlines()]
    assert [x["round"] for x in secagg if x["purpose"] == "train"] == [1, 2, 3]
    # and a finished run is not resumed again
    again = subprocess.run(
        [MEDFED, "simulate", "--resume", str(run_dir)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert again.returncode == 2 and "is finished" in again.stderr


# ------------------------------------------------------ the CLI refuses before starting
@pytest.fixture
def finished_run(tmp_path, server_identity) -> Path:
    """A finished run of the in-process FakeSites federation (tests/server/test_resume.py)."""
    from tests.server.test_resume import _config as fake_config
    from tests.server.test_resume import _main as fake_main

    run_dir = tmp_path / "run"
    fake_main(fake_config(run_dir))
    return run_dir


def _simulate(*args: str):
    from typer.testing import CliRunner

    from common import cli

    cli._register_plugins()
    return CliRunner().invoke(cli.app, ["simulate", *args])


def test_simulate_resume_refuses_a_finished_run_and_new_run_options(finished_run, tmp_path):
    from tests.cli_errors import assert_refused

    assert_refused(_simulate("--resume", str(finished_run)), "is finished", "Start a new run")
    (finished_run / "final_model.pt").unlink()  # as if killed after its last round
    assert_refused(
        _simulate("--resume", str(finished_run), "--rounds", "5", "--model", "gru"),
        "with its own settings; drop --rounds, --model",
    )
    assert_refused(
        _simulate("--resume", str(finished_run), "--set", "strategy=fedyogi"),
        "these differ ('strategy': run 'fedavg', config 'fedyogi')",
    )
    assert_refused(_simulate("--resume", str(finished_run)), "virtual sites [0, 1] are missing")
    assert_refused(_simulate("--resume", str(tmp_path / "nowhere")), "not a directory")
