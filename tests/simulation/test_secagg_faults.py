"""Faults under secure aggregation (issue 14, item 6): drop after masking, crash, late site.

The fast tests run the coordinator's real SecAgg+ code (server/secagg.py) against
virtual sites that are the real simulated site service (client/site/service.py as
client/site/simulated.py ``simulated_service`` mounts it: request and policy checks,
``faults.*`` injection from client/faults.py, ``secagg_mod``, the egress guard, the
audit log). Only local training is replaced, by a deterministic stand-in (a seeded
change of the global model per site and round), so the expected global model is computed
independently here: the plain weighted mean of the surviving sites' trained models,
without secure aggregation. Each message runs on its own thread, as in Flower's
simulation engine (``vce_api.worker``), which also turns a ClientApp exception into an
error reply the same way. The stage deadline passes once every site that is not delayed
has answered: the slow site's injected ``time.sleep`` (client/faults.py) blocks until
then, and its reply, which comes after, is lost. So the late site is late by
construction, whatever the load on the machine, and no test waits for a clock (the slow
test uses real seconds).

The slow tests run ``medfed simulate`` on real data: SecAgg+ with a crash and a drop
after masking against the same sites without secure aggregation (same global model), and
SecAgg+ with a site past the round timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from types import SimpleNamespace

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

import client.faults
import client.site.service as site_service
from client.faults import REASON_CRASH, REASON_DROPOUT
from client.site.simulated import research_policy, simulated_service
from common.checkpoint import load_checkpoint
from common.config import RunConfig
from common.errors import ConfigError
from common.models import get_model
from common.records import state_to_record
from common.secagg.encoding import mean_error_bound
from common.secagg.errors import SecAggAbortedError
from common.secagg.params import ADVERTISE, MASKED_INPUT, SHARE_KEYS, UNMASK
from server.runlog import RecordingStrategy
from server.secagg import (
    FAULT_DROPPED,
    FAULT_FAILED,
    FAULT_LATE,
    SecAggGrid,
    SecAggRound,
)
from simulation.research.report import secagg_fault_rows, write_run_report
from tests.server.messages import new_message

#: The strategy's round timeout (s) and the slow site's injected delay (s); the fast
#: tests' deadline is the moment every site that is not delayed has answered.
DEADLINE = 1.0
SLOW = 2.5


def node_of(pid: int) -> int:
    """Opaque Flower node id of virtual site ``pid`` (not its partition id)."""
    return 7000 + 131 * pid


def fake_training(msg: Message, context: Context) -> Message:
    """Stand-in for local training: a seeded change of every float array.

    Deterministic in (partition id, round, global model), so the test can recompute what
    each site would send without secure aggregation; weight ``num-examples = 10 + 7 pid``.
    """
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content.config_records["config"]["server-round"])
    trained = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
    rng = np.random.default_rng([pid, server_round])
    for k, v in trained.items():
        if v.dtype.kind == "f":
            trained[k] = (v + rng.normal(0.0, 0.01, v.shape)).astype(v.dtype)
    metrics = MetricRecord({"num-examples": 10 + 7 * pid, "train-loss": 1.0 / server_round})
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in trained.items()})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def plain_mean(pids: list[int], arrays: ArrayRecord, server_round: int) -> dict[str, np.ndarray]:
    """What FedAvg would make of these sites' plaintext updates (float64)."""
    replies = {}
    for pid in pids:
        ctx = Context(
            run_id=1, node_id=node_of(pid), node_config={"partition-id": pid},
            state=RecordDict(), run_config={},
        )  # fmt: skip
        msg = new_message(train_content(arrays, server_round), MessageType.TRAIN, node_of(pid), "")
        replies[pid] = fake_training(msg, ctx).content
    total = sum(float(r["metrics"]["num-examples"]) for r in replies.values())
    return {
        k: sum(
            float(r["metrics"]["num-examples"]) / total * r["arrays"][k].numpy().astype(np.float64)
            for r in replies.values()
        )
        for k in arrays
    }


def train_content(arrays: ArrayRecord, server_round: int) -> RecordDict:
    return RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})


def flower_error(exc: Exception) -> Error:
    """The error reply Flower's simulation worker makes of a ClientApp exception."""
    return Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>")


_local = threading.local()


def injected_sleep(seconds: float) -> None:
    """``client.faults``' ``time.sleep``: the slow site sleeps past the stage deadline."""
    grid: VirtualSites = _local.grid
    grid.slept.append(seconds)
    with grid.lock:
        grid.delayed.add(_local.message_id)
    _local.deadline.wait()


class VirtualSites(Grid):
    """Virtual sites behind the real site service; one thread per message, a deadline."""

    def __init__(self, sites: int, run: RunConfig) -> None:
        self.config = run
        self.service = simulated_service(research_policy())  # with the fault mods
        self.contexts = {
            node_of(p): Context(
                run_id=1,
                node_id=node_of(p),
                node_config={"partition-id": p, "num-partitions": sites},
                state=RecordDict(),
                run_config=run.to_run_config(),
            )
            for p in range(sites)
        }
        self.pool = ThreadPoolExecutor(max_workers=2 * sites)
        self.uploads: list[Message] = []
        self.lock = threading.Lock()
        self.delayed: set[str] = set()  # message ids of requests held by injected_sleep
        self.slept: list[float] = []

    def _deliver(self, msg: Message, deadline: threading.Event) -> Message:
        _local.grid, _local.message_id, _local.deadline = self, msg.metadata.message_id, deadline
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            reply = self.service.handle(msg, context)
        except Exception as exc:  # as Flower's simulation worker does
            return Message(flower_error(exc), reply_to=msg)
        self.uploads.append(reply)
        return reply

    def send_and_receive(self, messages, *, timeout=None):
        deadline = threading.Event()
        futures = {self.pool.submit(self._deliver, m, deadline): m for m in messages}
        while True:  # until each request has its reply or is held by an injected sleep
            done, pending = wait(futures, timeout=0.01)
            with self.lock:
                if all(futures[f].metadata.message_id in self.delayed for f in pending):
                    break
        deadline.set()  # the deadline passes; a delayed site wakes and answers too late
        return [f.result() for f in futures if f in done]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return new_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return list(self.contexts)

    def set_run(self, run_id):  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - not used
        raise NotImplementedError


@pytest.fixture
def sites(monkeypatch, tmp_path) -> Iterator:
    """``make(n, {run-config key: value}) -> VirtualSites``; waits for late sites at the end."""
    monkeypatch.setattr(site_service, "make_handler", lambda policy, **_: fake_training)
    monkeypatch.setattr(client.faults, "time", SimpleNamespace(sleep=injected_sleep))
    made: list[VirtualSites] = []

    def make(n: int, keys: dict | None = None) -> VirtualSites:
        run = RunConfig.from_run_config(
            {
                "secagg.enabled": True,
                "dp.enabled": False,
                "evaluate-in-train": False,
                "sites-dir": str(tmp_path / "sites"),  # state (audit log): tmp_path/state
                "run-dir": str(tmp_path / "run"),
                **(keys or {}),
            }
        )
        made.append(VirtualSites(n, run))
        return made[-1]

    yield make
    for grid in made:
        grid.pool.shutdown(wait=True)  # a late site finishes before tmp_path goes


def secure_round(grid: VirtualSites, arrays: ArrayRecord, server_round: int = 1) -> SecAggRound:
    """A SecAggRound whose transport is ``grid`` (as SecAggGrid's), deadline DEADLINE."""

    def transport(stage, contents):
        msgs = [
            grid.create_message(c, MessageType.TRAIN, n, str(server_round))
            for n, c in contents.items()
        ]
        return {
            r.metadata.src_node_id: (r.error if r.has_error() else r.content)
            for r in grid.send_and_receive(msgs, timeout=DEADLINE)
        }

    return SecAggRound(
        params=grid.config.secagg,
        server_round=server_round,
        global_arrays=arrays,
        transport=transport,
    )


def initial_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    return state_to_record(get_model("cnn"))


def run_secure_round(grid: VirtualSites, pids: range):
    arrays = initial_arrays()
    rnd = secure_round(grid, arrays)
    result = rnd.run({node_of(p): train_content(arrays, 1) for p in pids})
    return arrays, rnd, result


def assert_is_plain_mean(arrays, rnd, result, in_sum: list[int], server_round: int = 1):
    """The unmasked mean delta is the survivors' plain weighted mean, within the bound."""
    expected = plain_mean(in_sum, arrays, server_round)
    exp_delta = np.concatenate(
        [(expected[k] - arrays[k].numpy().astype(np.float64)).ravel() for k in arrays]
    )
    bound = mean_error_bound(
        sites=len(in_sum), step=rnd.report.step, total_weight=rnd.report.total_weight
    )
    assert result.survivors == sorted(node_of(p) for p in in_sum)
    assert result.total_weight == sum(10 + 7 * p for p in in_sum)
    assert 0 < bound < 1e-8
    assert np.max(np.abs(result.mean_delta - exp_delta)) <= bound
    # a model without a site differs by far more than the bound: the test can tell
    assert np.max(np.abs(exp_delta)) > 1e3 * bound


def faults_by_pid(report_json: dict) -> dict[int, dict]:
    pid_of = {node_of(p): p for p in range(10)}
    return {pid_of[f["site"]]: f for f in report_json["faults"]}


# ------------------------------------------------------------------- (a) drop after masking
@pytest.mark.parametrize(
    ("stage", "in_sum"),
    [
        (UNMASK, [0, 1, 2, 3]),  # sent its masked input: a survivor, self-mask rebuilt
        (MASKED_INPUT, [0, 1, 3]),  # left before: its pairwise masks are removed
        (SHARE_KEYS, [0, 1, 3]),
        (ADVERTISE, [0, 1, 3]),
    ],
)
def test_site_that_stops_answering_at_a_stage_leaves_the_right_sum(sites, stage, in_sum):
    # Prepare: 4 virtual sites; site 2 stops answering at `stage`
    grid = sites(4, {"faults.drop-site": 2, "faults.drop-stage": stage})
    # Execute
    arrays, rnd, result = run_secure_round(grid, range(4))
    # Assert: the model is the plain weighted mean of the sites in the sum
    assert_is_plain_mean(arrays, rnd, result, in_sum)
    line = rnd.report.as_json()
    assert line["status"] == "ok"
    assert faults_by_pid(line) == {
        2: {
            "site": node_of(2),
            "stage": stage,
            "kind": FAULT_DROPPED,
            "reason": REASON_DROPOUT,
            "in-sum": stage == UNMASK,
        }
    }
    # the site that went away keeps no round secrets
    assert "medfed.secagg" not in grid.contexts[node_of(2)].state.config_records or (
        not grid.contexts[node_of(2)].state.config_records["medfed.secagg"].get("seed")
    )


def test_too_many_sites_gone_at_unmask_aborts_loudly(sites):
    # Prepare: 2 sites need both shares (t = 2): nobody may go at unmask
    grid = sites(2, {"faults.drop-site": 1, "faults.drop-stage": UNMASK})
    arrays = initial_arrays()
    rnd = secure_round(grid, arrays)
    # Execute / Assert
    with pytest.raises(SecAggAbortedError, match="aborted at unmask"):
        rnd.run({node_of(p): train_content(arrays, 1) for p in range(2)})
    assert rnd.report.as_json()["faults"][0]["stage"] == UNMASK


# ---------------------------------------------------------------- (b) crash while training
def test_site_that_crashes_while_training_is_left_out(sites):
    # Prepare: site 1 trains, then crashes before replying (advertise-keys stage)
    grid = sites(4, {"faults.crash-site": 1})
    # Execute
    arrays, rnd, result = run_secure_round(grid, range(4))
    # Assert
    assert_is_plain_mean(arrays, rnd, result, [0, 2, 3])
    fault = faults_by_pid(rnd.report.as_json())[1]
    assert fault["stage"] == ADVERTISE and fault["kind"] == FAULT_FAILED
    assert REASON_CRASH in fault["reason"] and not fault["in-sum"]


# --------------------------------------------------------------- (c) slow past the deadline
def test_site_slower_than_the_deadline_is_left_out(sites):
    # Prepare: site 0 sleeps SLOW s before training, past the stage deadline
    grid = sites(4, {"faults.slow-site": 0, "faults.slow-seconds": SLOW})
    # Execute
    arrays, rnd, result = run_secure_round(grid, range(4))
    # Assert
    assert_is_plain_mean(arrays, rnd, result, [1, 2, 3])
    fault = faults_by_pid(rnd.report.as_json())[0]
    assert fault == {
        "site": node_of(0),
        "stage": ADVERTISE,
        "kind": FAULT_LATE,
        "reason": "no reply before the deadline",
        "in-sum": False,
    }
    assert grid.slept == [SLOW]  # the fault asked for its delay, and missed the deadline


# ------------------------------------------------ all three, through the round log and report
def test_all_three_faults_in_one_run_are_logged_reported_and_the_model_is_right(
    sites, tmp_path, server_identity
):
    # Prepare: 6 sites; 0 is late, 1 crashes while training, 2 goes away at unmask
    grid = sites(
        6,
        {
            "faults.slow-site": 0,
            "faults.slow-seconds": SLOW,
            "faults.crash-site": 1,
            "faults.drop-site": 2,
            "faults.drop-stage": UNMASK,
        },
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run = grid.config
    (run_dir / "config.json").write_text(json.dumps(run.to_run_config()))
    secure = SecAggGrid(grid, params=run.secagg, run_dir=run_dir)
    strategy = RecordingStrategy(
        FedAvg(min_available_nodes=6, fraction_evaluate=0.0),
        run_dir=run_dir,
        checkpoint_meta={"model": "cnn", "model_kwargs": {}, "task": "classification"},
    )
    initial = initial_arrays()
    # Execute: two rounds of Flower's FedAvg over the secure grid
    result = strategy.start(
        grid=secure,
        initial_arrays=initial,
        num_rounds=2,
        timeout=DEADLINE,
        evaluate_fn=strategy.make_evaluate_fn(None),
    )
    page = write_run_report(run_dir).read_text()
    # Assert: each round's model is the plain weighted mean of sites 2..5 (2 is in the sum)
    survivors = [2, 3, 4, 5]
    previous = initial
    for server_round in (1, 2):
        ckpt = load_checkpoint(run_dir / "checkpoints" / f"round-{server_round:03d}.pt")
        got = {k: v.numpy() for k, v in ckpt.state_dict.items()}
        expected = plain_mean(survivors, previous, server_round)
        for k in initial:
            tol = 1e-8 + np.finfo(np.float32).eps * float(np.max(np.abs(expected[k])))
            np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=tol)
        previous = ArrayRecord({k: Array(v) for k, v in got.items()})
    final = result.arrays.to_torch_state_dict()
    assert all(np.array_equal(final[k].numpy(), previous[k].numpy()) for k in initial)
    # Assert: secagg.jsonl names each fault with its stage
    lines = [json.loads(x) for x in (run_dir / "secagg.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["ok", "ok"]
    for line in lines:
        faults = faults_by_pid(line)
        assert sorted(faults) == [0, 1, 2]
        assert (faults[0]["stage"], faults[0]["kind"]) == (ADVERTISE, FAULT_LATE)
        assert (faults[1]["stage"], faults[1]["kind"]) == (ADVERTISE, FAULT_FAILED)
        assert REASON_CRASH in faults[1]["reason"]
        assert (faults[2]["stage"], faults[2]["kind"]) == (UNMASK, FAULT_DROPPED)
        assert [f["in-sum"] for f in (faults[0], faults[1], faults[2])] == [False, False, True]
        assert line["survivors"] == [node_of(p) for p in survivors]
    # Assert: rounds.jsonl sees the late site as dropped, the crash as failed, and site 2
    # as replied (its update is in the model)
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    for r in rounds[1:]:
        assert r["train"]["dropped"] == [node_of(0)]
        assert list(r["train"]["failed"]) == [str(node_of(1))]
        assert REASON_CRASH in r["train"]["failed"][str(node_of(1))]
        assert r["train"]["replied"] == [node_of(p) for p in survivors]
    # Assert: the report shows each fault with its stage
    assert "Secure aggregation faults" in page
    for words in (
        "late: no reply before the deadline",
        "failed: " + REASON_CRASH,
        "gone at unmask after sending its masked input (in the sum)",
    ):
        assert words in page, words


def test_report_rows_name_stage_kind_and_an_aborted_round():
    # Prepare: two secagg.jsonl lines (one aborted) as server/secagg.py writes them
    lines = [
        {
            "round": 1,
            "status": "ok",
            "faults": [
                {"site": 5, "stage": SHARE_KEYS, "kind": FAULT_LATE, "reason": "no reply before "
                 "the deadline", "in-sum": False},
                {"site": 9, "stage": UNMASK, "kind": FAULT_DROPPED, "reason": REASON_DROPOUT,
                 "in-sum": True},
            ],
        },
        {"round": 2, "status": "failed", "reason": "aborted at unmask: 1 shares", "faults": []},
    ]  # fmt: skip
    # Execute
    rows = secagg_fault_rows(lines, {"5": "site A", "9": "site B"})
    # Assert
    assert rows == [
        [1, "site A", SHARE_KEYS, "late: no reply before the deadline", "no"],
        [
            1,
            "site B",
            UNMASK,
            "gone at unmask after sending its masked input (in the sum): " + REASON_DROPOUT,
            "yes",
        ],
        [2, "-", "-", "round aborted: aborted at unmask: 1 shares", "-"],
    ]


def test_drop_stage_config_names_the_stages():
    with pytest.raises(ConfigError, match=r"faults\.drop-stage"):
        RunConfig.from_run_config({"faults.drop-stage": "unmasking"})


def test_real_sites_never_inject_a_drop(sites):
    # Prepare: the same drop config at a node with its own dataset dir (a hospital)
    grid = sites(3, {"faults.drop-site": 1, "faults.drop-stage": UNMASK})
    ctx = grid.contexts[node_of(1)]
    ctx.node_config["dataset-dir"] = "/nonexistent/site"
    from client.faults import stage_fault_injection

    msg = new_message(
        RecordDict({"secagg": ConfigRecord({"stage": UNMASK, "round": 1})}),
        MessageType.TRAIN,
        node_of(1),
        "1",
    )
    # Execute
    reply = stage_fault_injection(msg, ctx, lambda m, c: Message(RecordDict(), reply_to=m))
    # Assert: passed through, no injected error
    assert not reply.has_error()


# ------------------------------------------------------------------------ real simulation
MEDFED = str(Path(sys.executable).parent / "medfed")


def _simulate(run_dir: Path, data_dir: Path, *sets: str) -> list[dict]:
    """Run ``medfed simulate`` (6 breastmnist sites, 2 rounds, no DP); return rounds.jsonl."""
    env = {**os.environ, "MEDFED_DATA_DIR": str(data_dir), "FLWR_TELEMETRY_ENABLED": "0"}
    args = [
        MEDFED, "simulate", "--sites", "6", "--partition", "iid", "--rounds", "2",
        "--dataset", "breastmnist", "--run-dir", str(run_dir), "--seed", "7",
    ]  # fmt: skip
    common = [
        "dp.enabled=false", "evaluate-in-train=false", "fraction-evaluate=0.0",
        "min-sites=6", "min-replies=1", "local-epochs=1",
    ]  # fmt: skip
    for s in [*common, *sets]:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


def _faults(run_dir: Path) -> list[list[tuple[str, str, bool]]]:
    """Per secure round: sorted (stage, kind, in-sum) of every site that left it."""
    lines = [json.loads(x) for x in (run_dir / "secagg.jsonl").read_text().splitlines()]
    lines = [x for x in lines if x["purpose"] == "train"]  # not the final validation
    assert [x["status"] for x in lines] == ["ok", "ok"]
    return [sorted((f["stage"], f["kind"], f["in-sum"]) for f in x["faults"]) for x in lines]


GONE_AT_UNMASK = (UNMASK, FAULT_DROPPED, True)


@pytest.mark.slow
@pytest.mark.integration
def test_simulation_crash_and_drop_after_masking_match_plain_fedavg(tmp_path, shared_data_dir):
    # Prepare / Execute: SecAgg+ where site 1 crashes while training in round 2 and site
    # 2 goes away at unmask every round, and the same sites without secure aggregation
    # (the drop is a SecAgg+ stage fault, so there site 2 simply takes part). The round
    # timeout is never reached: Ray's cold start on a busy machine can take minutes.
    crash = ["faults.crash-site=1", "faults.crash-round=2", "round-timeout=1200"]
    secure, plain = tmp_path / "secure", tmp_path / "plain"
    s_rounds = _simulate(
        secure, shared_data_dir, "secagg.enabled=true", "faults.drop-site=2",
        "faults.drop-stage=unmask", *crash,
    )  # fmt: skip
    p_rounds = _simulate(plain, shared_data_dir, "secagg.enabled=false", *crash)
    # Assert: the same sites in each round's model ...
    for rounds in (s_rounds, p_rounds):
        assert [len(r["train"]["replied"]) for r in rounds[1:]] == [6, 5]
        assert REASON_CRASH in next(iter(rounds[2]["train"]["failed"].values()))
    assert _faults(secure) == [[GONE_AT_UNMASK], [(ADVERTISE, FAULT_FAILED, False), GONE_AT_UNMASK]]
    # ... and the same global model, up to the quantisation step and float32
    got = load_checkpoint(secure / "final_model.pt").state_dict
    want = load_checkpoint(plain / "final_model.pt").state_dict
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=0, atol=1e-5)
    page = write_run_report(secure).read_text()
    assert "gone at unmask after sending its masked input (in the sum)" in page
    assert "failed: " + REASON_CRASH in page


@pytest.mark.slow
@pytest.mark.integration
def test_simulation_site_past_the_round_timeout_is_late_and_left_out(tmp_path, shared_data_dir):
    # Prepare / Execute: from round 2, site 0 sleeps 300 s before training; each SecAgg+
    # stage waits round-timeout = 240 s (long enough for Ray's cold start in round 1)
    run_dir = tmp_path / "secure"
    rounds = _simulate(
        run_dir, shared_data_dir, "secagg.enabled=true", "round-timeout=240",
        "faults.slow-site=0", "faults.slow-seconds=300", "faults.slow-round=2",
    )  # fmt: skip
    # Assert: round 2 went on without it; the round log and the report say so
    assert [len(r["train"]["replied"]) for r in rounds[1:]] == [6, 5]
    assert len(rounds[2]["train"]["dropped"]) == 1
    assert _faults(run_dir) == [[], [(ADVERTISE, FAULT_LATE, False)]]
    assert "late: no reply before the deadline" in write_run_report(run_dir).read_text()
