"""Resume a run after a coordinator crash: the resume state, its checks, round offsets.

Every run directory holds, next to the round log and the checkpoints, the **resume
state** :data:`RESUME_FILE`: what the ServerApp needs to go on after the last finished
round. It is replaced atomically (temporary file, ``fsync``, rename, ``fsync`` of the
directory: :func:`common.fsutil.atomic_write`) at the end of every round, *after* that
round's checkpoint, ``best_model.pt`` and log line, so it is the run's commit point:
a kill (SIGKILL, power loss) at any instant leaves the state of the last committed
round, and resuming

* after a kill before round ``k + 1``'s state was committed, continues with round
  ``k + 1``; what that lost round had already written is put back as it was after round
  ``k``: ``rounds.jsonl`` is rewritten from the state's copy of the log (lines ``0..k``,
  so no round is repeated or skipped), ``best_model.pt`` is rewritten from the state's
  best-model tracking, checkpoints of later rounds and ``secagg.jsonl`` lines of later
  rounds are removed, and the lost round runs again;
* after a kill before the state of round 0 (before any round ran), starts the run over in
  the same directory;
* after a kill between the last round's state and ``final_model.pt``, only writes
  ``final_model.pt``.

The state file is a ``torch.save`` file of plain containers and tensors, read with
``torch.load(weights_only=True)`` (which never runs pickled code)::

    {"format": "medfed-resume", "version": 1,
     "round": k,                        last finished round (0: the initial model)
     "run-config": "<json>",            the run's own config, the source of truth on resume
     "arrays": {name: tensor},          the global model after round k
     "strategy": {attr: {name: tensor}},  the strategy's own state (strategy_state)
     "recording": "<json>",             RecordingStrategy.resume_state()
     "central": {name: float}}          server-side evaluation of round k's model

**Round numbers.** Flower 1.41's ``Strategy.start`` (flwr/serverapp/strategy/strategy.py)
always loops ``for current_round in range(1, num_rounds + 1)`` and calls its
``evaluate_fn`` with round 0 first. :class:`RoundOffset` wraps the strategy and adds the
number of finished rounds to every round number it passes on, so the strategy (e.g.
FedAdam's bias correction), the messages' ``server-round`` (the sites' reproducible-noise
and shuffling seeds), the round log and the checkpoints all see the run's own numbers;
:class:`ResumableRun` drives it and commits the state after every round.

**Configuration.** A resumed run continues the run as it was configured: its config is the
one in the state, except ``connect-timeout`` and ``round-timeout`` (how long to wait now)
and, when given, ``sites-dir`` / ``eval-dataset-dir`` (data that moved). The model, task,
number of classes and strategy (with its ``strategy-args``) must equal the resuming
config, or resume is refused (:func:`resumed_config`); any other difference is ignored
with a warning. SecAgg+ and the quorum (``secagg.*``, ``min-sites``, ``min-replies``,
``evaluate-in-train``) are therefore the run's own.

**Privacy ledgers.** A resumed run is a new Flower run (a new run id). The sites need
nothing: a site's privacy ledger (client/privacy.py) keys the accountant history by its
dataset's fingerprint, not by run, so the cumulative epsilon of the resumed rounds
continues from everything the site ever spent, and its ceiling applies to that total.
The ledger's per-run entry (``plans``, keyed by run id) only remembers the noise
multiplier derived from ``dp.target-epsilon``: the resumed run derives it again from the
same planned training (all rounds x local epochs, the same data), so it trains with the
same sigma. A site that trained in the lost round has recorded those steps, and trains
the round again when it is repeated: epsilon is over-counted by at most that round, never
under-counted. (Per-run evaluation limits of a site policy count per run id, as for any
new run.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.fedopt import FedOpt
from numpy.typing import NDArray

from common.config import ConfigScalar, RunConfig
from common.errors import ConfigError, ModelError
from common.fsutil import atomic_write, fsync_dir
from common.records import check_state, expected_spec
from server.scaffold import Scaffold

log = logging.getLogger(__name__)

#: The resume state in the run directory.
RESUME_FILE = "resume.pt"
#: Held (``flock``) by the ServerApp for the whole run: a second one cannot resume it.
LOCK_FILE = ".run.lock"
FORMAT = "medfed-resume"
VERSION = 1
#: Largest resume state read (bytes): the global model, the strategy's state (FedAdam:
#: two more model-sized moments) and the round log.
MAX_RESUME_BYTES = 4 * 2**30

#: Run-config keys a resumed run must share with the run it resumes: the same model,
#: trained by the same strategy.
IDENTITY_KEYS = ("task", "model", "num-classes", "strategy")
IDENTITY_PREFIXES = ("strategy-args.",)
#: Keys the resuming config sets: how long to wait, and how many images one evaluation
#: pass holds (memory only, never a metric: a run resumed on a smaller GPU may lower it).
OPERATIONAL_KEYS = ("connect-timeout", "round-timeout", "eval-batch-size")
#: Data paths the resuming config sets when it gives them (data that moved).
PATH_KEYS = ("sites-dir", "eval-dataset-dir")
#: Set to the resumed directory itself.
RESUME_KEYS = ("run-dir", "resume-from")

#: Strategy attributes that carry state from round to round, by strategy class:
#: FedAdam/FedYogi's first and second moments (Reddi et al. 2021; Flower's ``FedOpt``;
#: ``current_arrays`` is reset by every ``configure_train``), SCAFFOLD's server control
#: variate (server/scaffold.py). FedAvg, FedProx, FedMedian, FedTrimmedAvg and Krum keep
#: nothing between rounds.
STATEFUL_ATTRIBUTES: tuple[tuple[type, tuple[str, ...]], ...] = (
    (FedOpt, ("m_t", "v_t")),
    (Scaffold, ("c",)),
)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
StrategyState = dict[str, dict[str, NDArray[Any]] | None]

_CHECKPOINT_RE = re.compile(r"^round-(\d+)\.pt$")
_TMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]+$")


@dataclass
class ResumeState:
    """What a run needs to go on after round ``round`` (see the module docstring).

    Attributes
    ----------
    round : int
        The last finished round; 0 when only the initial model exists.
    run_config : dict[str, ConfigScalar]
        The run's own flat config (``RunConfig.to_run_config()``).
    arrays : dict[str, torch.Tensor]
        The global model after ``round`` (its ``state_dict``, CPU tensors).
    strategy : dict[str, dict[str, numpy.ndarray] or None]
        The strategy's own state (:func:`strategy_state`).
    recording : dict[str, Any]
        ``server.runlog.RecordingStrategy.resume_state()``: the round log so far and the
        best-model tracking (JSON-safe).
    central : dict[str, float]
        The server-side evaluation of round ``round``'s model (empty without one).

    """

    round: int
    run_config: dict[str, ConfigScalar]
    arrays: dict[str, torch.Tensor]
    strategy: StrategyState = field(default_factory=dict)
    recording: dict[str, Any] = field(default_factory=dict)
    central: dict[str, float] = field(default_factory=dict)

    @property
    def num_rounds(self) -> int:
        """``num-server-rounds`` of the run."""
        return int(self.run_config["num-server-rounds"])


# ------------------------------------------------------------------------ the file
def save_state(run_dir: Path, state: ResumeState) -> None:
    """Replace ``run_dir/resume.pt`` atomically with ``state`` (write-temp, fsync, rename).

    Parameters
    ----------
    run_dir : pathlib.Path
        The run directory.
    state : ResumeState
        The state after round ``state.round``.

    Raises
    ------
    OSError
        If it cannot be written; the previous state is then unchanged.

    """
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "round": int(state.round),
        "run-config": json.dumps(state.run_config, sort_keys=True),
        "arrays": {k: v.detach().cpu().contiguous() for k, v in state.arrays.items()},
        "strategy": {
            attr: None
            if arrays is None
            else {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
            for attr, arrays in state.strategy.items()
        },
        "recording": json.dumps(state.recording, sort_keys=True),
        "central": {k: float(v) for k, v in state.central.items()},
    }
    atomic_write(run_dir / RESUME_FILE, lambda fh: torch.save(payload, fh))


def _corrupt(path: Path, what: str) -> ConfigError:
    return ConfigError(
        f"the resume state {path} is corrupt: {what}. medfed replaces it atomically after "
        "every round, so it was damaged afterwards (disk, copy, edit). Restore the run "
        "directory from a backup, or start a new run (the global model of every finished "
        "round is in its checkpoints/)."
    )


def load_state(run_dir: Path) -> ResumeState | None:
    """Read and check ``run_dir/resume.pt``; None if the run has none.

    Raises
    ------
    ConfigError
        If the file is not a readable medfed resume state of a known version, or a field
        is missing or of the wrong type (the message names it and what to do).

    """
    path = run_dir / RESUME_FILE
    if not path.exists() and not path.is_symlink():
        return None
    raw = _read_state_file(path)
    rnd = _checked_round(path, raw)
    try:
        run_config = json.loads(raw["run-config"])
        recording = json.loads(raw["recording"])
    except (KeyError, TypeError, ValueError):
        raise _corrupt(path, "'run-config' or 'recording' is not JSON text") from None
    if not isinstance(run_config, dict) or not isinstance(recording, dict):
        raise _corrupt(path, "'run-config' and 'recording' must be JSON objects")
    arrays = _tensor_table(raw.get("arrays"))
    if not arrays:
        raise _corrupt(path, "'arrays' is not a non-empty table of tensors")
    strategy = _strategy_state(path, raw.get("strategy"))
    central = raw.get("central")
    if not isinstance(central, dict) or not all(isinstance(v, float) for v in central.values()):
        raise _corrupt(path, "'central' is not a table of numbers")
    num_rounds = run_config.get("num-server-rounds")
    if not isinstance(num_rounds, int) or rnd > num_rounds:
        raise _corrupt(path, f"'round'={rnd} is beyond the run's num-server-rounds")
    return ResumeState(
        round=rnd,
        run_config=run_config,
        arrays=arrays,
        strategy=strategy,
        recording=recording,
        central={str(k): float(v) for k, v in central.items()},
    )


def _checked_round(path: Path, raw: Any) -> int:
    """Check the state's format and version; return its round."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise _corrupt(path, f"it is not a {FORMAT!r} file")
    if raw.get("version") != VERSION:
        raise _corrupt(path, f"version {raw.get('version')!r} is not {VERSION}")
    rnd = raw.get("round")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise _corrupt(path, "'round' is not an integer >= 0")
    return rnd


def _read_state_file(path: Path) -> Any:
    """``torch.load`` a regular file of bounded size with ``weights_only=True``."""
    if path.is_symlink() or not path.is_file():
        raise _corrupt(path, "it is not a regular file")
    if path.stat().st_size > MAX_RESUME_BYTES:
        raise _corrupt(path, f"it is larger than {MAX_RESUME_BYTES} bytes")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise _corrupt(path, f"it cannot be read ({type(exc).__name__})") from None


def _strategy_state(path: Path, raw_strategy: Any) -> StrategyState:
    """Return the strategy's saved state: ``{attribute: {name: array} or None}``."""
    if not isinstance(raw_strategy, dict):
        raise _corrupt(path, "'strategy' is not a table")
    strategy: StrategyState = {}
    for attr, table in raw_strategy.items():
        tensors = None if table is None else _tensor_table(table)
        if table is not None and tensors is None:
            raise _corrupt(path, f"strategy state {attr!r} is not a table of tensors")
        strategy[str(attr)] = (
            None if tensors is None else {k: t.numpy() for k, t in tensors.items()}
        )
    return strategy


def check_model(state: ResumeState, model: torch.nn.Module) -> None:
    """Check that the state's global model fits ``model`` (keys, shapes, dtypes).

    Raises
    ------
    ConfigError
        Naming the first mismatch: the state belongs to another model.

    """
    try:
        check_state(state.arrays, expected_spec(model))
    except ModelError as exc:
        raise ConfigError(
            f"the resume state's global model does not fit model {state.run_config.get('model')!r} "
            f"({exc}); the resume state belongs to another run. Start a new run."
        ) from None


def _tensor_table(value: Any) -> dict[str, torch.Tensor] | None:
    """``value`` as ``{str: tensor}``, or None if it is anything else."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        return None
    return dict(value)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's exclusive lock (:data:`LOCK_FILE`) for the whole block.

    One ServerApp at a time writes a run directory: a run still going on (e.g. under a
    SuperLink that outlived the ``medfed simulate`` that started it) is never resumed
    beside it. The lock is the kernel's (``flock``), so it goes with the process that
    held it, also on SIGKILL.

    Raises
    ------
    ConfigError
        If another process holds the lock.

    """
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"the run in {run_dir} is still going on: another process (a ServerApp) "
                "holds its lock. Wait for it to end, or stop it (`flwr stop`, or the "
                "SuperLink that runs it) before resuming."
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


# -------------------------------------------------------------------- the config
def _is_identity(key: str) -> bool:
    return key in IDENTITY_KEYS or key.startswith(IDENTITY_PREFIXES)


def resumed_config(
    saved: Mapping[str, ConfigScalar], current: RunConfig, *, run_dir: Path
) -> RunConfig:
    """Return the config of the resumed run: the run's own, with the resuming timeouts.

    Parameters
    ----------
    saved : Mapping
        The run's own flat config (from its resume state).
    current : RunConfig
        The resuming config (run config ``resume-from`` set).
    run_dir : pathlib.Path
        The run directory being resumed: becomes ``run-dir`` and ``resume-from``.

    Returns
    -------
    RunConfig
        ``saved`` with :data:`OPERATIONAL_KEYS` from ``current``, :data:`PATH_KEYS` from
        ``current`` where it sets them, and :data:`RESUME_KEYS` = ``run_dir``.

    Raises
    ------
    ConfigError
        If the model, task, number of classes or strategy (or a ``strategy-args``
        value) differ, naming each key with both values and what to do; or if the saved
        config is not valid for this medfed.

    """
    try:
        own = RunConfig.from_run_config(saved).to_run_config()
    except ConfigError as exc:
        raise ConfigError(
            f"the run in {run_dir} was configured in a way this medfed cannot run ({exc}); "
            "resume it with the medfed version that started it, or start a new run."
        ) from None
    now = current.to_run_config()
    differ = [k for k in own if _is_identity(k) and own[k] != now[k]]
    if differ:
        pairs = ", ".join(f"{k!r}: run {own[k]!r}, config {now[k]!r}" for k in differ)
        raise ConfigError(
            f"cannot resume {run_dir} with this config: a resumed run trains the same model "
            f"with the same strategy, and these differ ({pairs}). Resume with the run's own "
            f"values (they are in {run_dir / 'config.json'}), or start a new run."
        )
    merged = dict(own)
    for key in OPERATIONAL_KEYS:
        merged[key] = now[key]
    for key in PATH_KEYS:
        if now[key]:
            merged[key] = now[key]
    for key in RESUME_KEYS:
        merged[key] = str(run_dir)
    fixed = (*OPERATIONAL_KEYS, *PATH_KEYS, *RESUME_KEYS)
    ignored = sorted(k for k in own if k not in fixed and not _is_identity(k) and own[k] != now[k])
    if ignored:
        log.warning(
            "resuming %s: the run keeps its own values of %s (a resumed run continues the "
            "run as configured; start a new run to change them)",
            run_dir,
            ", ".join(ignored),
        )
    return RunConfig.from_run_config(merged)


def check_resumable(run_dir: Path, state: ResumeState | None) -> None:
    """Refuse a run that has nothing to resume, before any round.

    Parameters
    ----------
    run_dir : pathlib.Path
        A medfed run directory (``server.app.why_not_run_dir`` said so).
    state : ResumeState or None
        Its resume state (:func:`load_state`).

    Raises
    ------
    ConfigError
        If the run finished (``final_model.pt`` exists), never started (no
        ``config.json``), or has finished rounds but no resume state (a run from a
        medfed without resume).

    """
    from server.runlog import ROUNDS_FILE

    if (run_dir / "final_model.pt").exists():
        done = f"round {state.round}" if state is not None else "its last round"
        raise ConfigError(
            f"the run in {run_dir} is finished (final_model.pt, {done}); there is nothing "
            "to resume. Start a new run (e.g. from its best_model.pt) to train further."
        )
    if not (run_dir / "config.json").is_file():
        raise ConfigError(
            f"{run_dir} holds no run to resume (no config.json): it was stopped before its "
            "ServerApp started. Start a new run."
        )
    if state is None and _finished_rounds(run_dir / ROUNDS_FILE):
        raise ConfigError(
            f"the run in {run_dir} has finished rounds but no resume state ({RESUME_FILE}): "
            "it was started by a medfed without resume. Start a new run (its checkpoints/ "
            "hold the global model of every finished round)."
        )


def _finished_rounds(rounds_file: Path) -> bool:
    """Whether the round log names a round >= 1 (torn lines are ignored)."""
    if not rounds_file.is_file():
        return False
    for text in rounds_file.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            line = json.loads(text)
            if isinstance(line, dict) and isinstance(line.get("round"), int) and line["round"] > 0:
                return True
    return False


# ------------------------------------------------------------------ the strategy
def _attributes(strategy: Strategy) -> tuple[str, ...]:
    for cls, attrs in STATEFUL_ATTRIBUTES:
        if isinstance(strategy, cls):
            return attrs
    return ()


def strategy_state(strategy: Strategy) -> StrategyState:
    """Return the aggregation strategy's own state between rounds (copies).

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The innermost strategy (``server.strategy.build_strategy``), not a wrapper.

    Returns
    -------
    dict[str, dict[str, numpy.ndarray] or None]
        :data:`STATEFUL_ATTRIBUTES` of its class; ``{}`` for a stateless strategy.

    """
    out: StrategyState = {}
    for attr in _attributes(strategy):
        value = getattr(strategy, attr)
        out[attr] = None if value is None else {k: np.array(v) for k, v in value.items()}
    return out


def restore_strategy(strategy: Strategy, state: StrategyState, *, expected: Iterable[str]) -> None:
    """Put :func:`strategy_state` back into a freshly built strategy of the same class.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The innermost strategy.
    state : dict
        From the resume state.
    expected : Iterable[str]
        Names of the model's arrays; every restored table must have a subset of them.

    Raises
    ------
    ConfigError
        If the state's attributes are not the strategy's, or a table names arrays the
        model does not have (a corrupt or foreign resume state).

    """
    attrs = _attributes(strategy)
    if set(state) != set(attrs):
        raise ConfigError(
            f"the resume state holds strategy state {sorted(state)}, but "
            f"{type(strategy).__name__} keeps {sorted(attrs)}: it belongs to another "
            "strategy. Resume with the run's own strategy, or start a new run."
        )
    names = set(expected)
    for attr in attrs:
        value = state[attr]
        if value is not None and not set(value) <= names:
            raise ConfigError(
                f"the resume state's {attr!r} names arrays the model does not have; "
                "it belongs to another model. Start a new run."
            )
        setattr(
            strategy, attr, None if value is None else {k: np.array(v) for k, v in value.items()}
        )


class RoundOffset(Strategy):
    """Wrap a strategy so that Flower's rounds ``1..n`` are the run's ``offset+1..offset+n``.

    Flower 1.41's ``Strategy.start`` always counts from round 1; every round number it
    passes to ``configure_*`` / ``aggregate_*`` is shifted by ``offset`` here (DESIGN
    section 9, rule 7: add behaviour by wrapping), so a resumed run's messages, log
    and checkpoints carry the run's own round numbers. The messages' ``group_id`` is set
    to that round, as Flower's own compatibility layer does
    (flwr/server/compat/grid_client_proxy.py): ``server.secagg.SecAggGrid`` numbers its
    rounds (``secagg.jsonl``, the stage headers) by it.

    Parameters
    ----------
    inner : Strategy
        The (recording) strategy.
    offset : int
        Rounds already finished, >= 0.

    """

    def __init__(self, inner: Strategy, *, offset: int) -> None:
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self.inner = inner
        self.offset = offset

    def summary(self) -> None:
        """Log the wrapped strategy's summary and where the run resumes."""
        if self.offset:
            log.info(
                "resumed after round %d: Flower's rounds 1, 2, ... below are the run's "
                "rounds %d, %d, ...",
                self.offset,
                self.offset + 1,
                self.offset + 2,
            )
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate with the run's round number; it is the messages' ``group_id``."""
        rnd = server_round + self.offset
        return _grouped(self.inner.configure_train(rnd, arrays, config, grid), rnd)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate with the run's round number."""
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate with the run's round number; it is the messages' ``group_id``."""
        rnd = server_round + self.offset
        return _grouped(self.inner.configure_evaluate(rnd, arrays, config, grid), rnd)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate with the run's round number."""
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)


def _grouped(messages: Iterable[Message], server_round: int) -> list[Message]:
    """Return ``messages`` with ``group_id`` = ``server_round``."""
    out = list(messages)
    for m in out:
        m.metadata.group_id = str(server_round)
    return out


# ---------------------------------------------------------------- the run itself
def discard_lost_round(run_dir: Path, last_round: int) -> None:
    """Remove what rounds after ``last_round`` wrote before they were lost.

    Checkpoints ``checkpoints/round-NNN.pt`` of later rounds, ``secagg.jsonl`` lines of
    later rounds (rewritten atomically) and temporary files a kill left behind
    (``.NAME.tmp-*``). ``rounds.jsonl`` and ``best_model.pt`` are restored by
    ``RecordingStrategy.restore``.
    """
    from server.secagg import SECAGG_LOG

    checkpoints = run_dir / "checkpoints"
    for folder in (run_dir, checkpoints):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            m = _CHECKPOINT_RE.match(path.name)
            if (m and int(m.group(1)) > last_round) or _TMP_RE.match(path.name):
                log.info("removing %s (written after round %d, before the crash)", path, last_round)
                path.unlink(missing_ok=True)
    secagg_log = run_dir / SECAGG_LOG
    if secagg_log.is_file():
        kept, dropped = [], 0
        for text in secagg_log.read_text(errors="replace").splitlines():
            try:
                line = json.loads(text)
                keep = isinstance(line, dict) and int(line["round"]) <= last_round
            except (ValueError, KeyError, TypeError):
                keep = False  # a line torn by the kill
            if keep:
                kept.append(text + "\n")
            else:
                dropped += 1
        if dropped:
            data = "".join(kept).encode()
            atomic_write(secagg_log, lambda fh: fh.write(data))
            log.info("dropped %d %s line(s) of rounds after %d", dropped, SECAGG_LOG, last_round)
    if checkpoints.is_dir():
        fsync_dir(checkpoints)


@dataclass
class ResumableRun:
    """Run the remaining rounds through Flower's loop and commit the state after each.

    Parameters
    ----------
    run_dir : pathlib.Path
        The run directory.
    run : RunConfig
        The run's config.
    strategy : Strategy
        The strategy to run (the recording wrapper).
    inner : Strategy
        The innermost aggregation strategy, whose own state is saved
        (:func:`strategy_state`).
    recording : Callable[[], dict]
        Returns the recorder's state (``RecordingStrategy.resume_state``).
    start : ResumeState or None
        The state resumed from; None for a run that starts at round 0.

    """

    run_dir: Path
    run: RunConfig
    strategy: Strategy
    inner: Strategy
    recording: Callable[[], dict[str, Any]]
    start: ResumeState | None = None
    last_round: int = field(init=False, default=0)
    last_arrays: ArrayRecord | None = field(init=False, default=None)
    last_central: dict[str, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.start is not None:
            self.last_round = self.start.round
            self.last_arrays = ArrayRecord(self.start.arrays)
            self.last_central = dict(self.start.central)

    def commit(self, server_round: int, arrays: ArrayRecord, central: MetricRecord | None) -> None:
        """Save the resume state after round ``server_round`` (the commit point)."""
        self.last_round, self.last_arrays = server_round, arrays
        self.last_central = {
            k: float(v) for k, v in (central or {}).items() if isinstance(v, int | float)
        }
        save_state(
            self.run_dir,
            ResumeState(
                round=server_round,
                run_config=self.run.to_run_config(),
                arrays=arrays.to_torch_state_dict(),
                strategy=strategy_state(self.inner),
                recording=self.recording(),
                central=self.last_central,
            ),
        )

    def evaluate_fn(self, evaluate: EvaluateFn, *, offset: int) -> EvaluateFn:
        """Wrap the recorder's ``evaluate_fn``: the run's round numbers, a commit after each.

        Flower calls it with round 0 (the initial model) before its round 1: a resumed
        run has recorded that already and skips it.
        """

        def evaluate_fn(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if flower_round == 0 and self.start is not None:
                return None
            server_round = flower_round + offset if flower_round else 0
            metrics = evaluate(server_round, arrays)
            self.commit(server_round, arrays, metrics)
            return metrics

        return evaluate_fn

    def run_rounds(
        self,
        grid: Grid,
        *,
        initial_arrays: ArrayRecord,
        evaluate: EvaluateFn,
        timeout: float,
    ) -> tuple[ArrayRecord, dict[str, float]]:
        """Run rounds ``start.round + 1 .. num-server-rounds`` (all of them for a new run).

        Parameters
        ----------
        grid : Grid
            The grid to send messages over.
        initial_arrays : ArrayRecord
            The initial model (the global model of a run that starts at round 0).
        evaluate : callable
            The recorder's ``evaluate_fn`` (``RecordingStrategy.make_evaluate_fn``).
        timeout : float
            Seconds each round waits for replies (``round-timeout``).

        Returns
        -------
        tuple[ArrayRecord, dict[str, float]]
            The final global model and its server-side evaluation.

        """
        done = self.last_round
        arrays = self.last_arrays if self.last_arrays is not None else initial_arrays
        remaining = self.run.num_server_rounds - done
        if remaining <= 0:
            log.info("all %d rounds had finished; writing the final model", done)
            return arrays, self.last_central
        if self.start is not None:
            log.info("resuming after round %d: rounds %d..%d", done, done + 1, done + remaining)
        RoundOffset(self.strategy, offset=done).start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=remaining,
            timeout=timeout,
            evaluate_fn=self.evaluate_fn(evaluate, offset=done),
        )
        if self.last_round != self.run.num_server_rounds or self.last_arrays is None:
            raise RuntimeError(f"round {self.run.num_server_rounds} was never committed")
        return self.last_arrays, self.last_central
