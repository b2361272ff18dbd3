"""Per-round observability: a strategy wrapper that writes the round log and checkpoints.

:class:`RecordingStrategy` wraps any Flower Message-API strategy (DESIGN section 9,
rule 7: add behaviour by wrapping). It notes which sites were sampled, which replied,
which failed (with the reason they gave) and which dropped (no reply before the round
deadline), the per-site and aggregated metrics, bytes on the wire and wall times, and
after every round appends one JSON line to ``rounds.jsonl`` and saves a checkpoint.

With a ``selection_metric`` it also does federated model selection (server/selection.py):
every round it attributes the sites' aggregated validation to the global models it
describes, keeps the best and writes it to ``best_model.pt``, and adds a
``model-selection`` entry to the round's line. For a binary classifier it also takes the
sites' summed validation score histograms out of the replies (:mod:`common.secure_sum`),
chooses each validated model's decision threshold on the pooled ROC
(:mod:`common.operating_point`), logs it under ``model-selection.operating-point`` and
stores the best model's in ``best_model.pt``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from numpy.typing import NDArray

from common import secure_sum
from common.checkpoint import Checkpoint, save_checkpoint
from common.errors import DataError, FederationError
from common.operating_point import OperatingPoint, choose_threshold
from common.wire import array_spec, screen_replies
from server.census import take_secure_sums
from server.claims import ClaimRegistry
from server.selection import BEST_MODEL, Selection, attribute, is_minimised, select_best

log = logging.getLogger(__name__)

ROUNDS_FILE = "rounds.jsonl"
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def record_nbytes(arrays: ArrayRecord) -> int:
    """Return the serialized size of an ``ArrayRecord``'s array payloads (bytes)."""
    return sum(len(a.data) for a in arrays.values())


def _json_number(v: Any) -> Any:
    """JSON-safe metric value: NaN and infinities -> None."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _clean(metrics: MetricRecord | Mapping[str, Any] | None) -> dict[str, Any]:
    """JSON-safe copy of a metric record (NaN -> None)."""
    return {k: _json_number(v) for k, v in (metrics or {}).items()}


@dataclass
class _Phase:
    sampled: list[int] = field(default_factory=list)
    replied: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    per_site: dict[int, dict[str, Any]] = field(default_factory=dict)
    aggregated: dict[str, Any] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0
    started: float = 0.0
    seconds: float = 0.0

    @property
    def dropped(self) -> list[int]:
        return sorted(set(self.sampled) - set(self.replied) - set(self.failed))

    def as_json(self) -> dict[str, Any]:
        return {
            "sampled": sorted(self.sampled),
            "replied": sorted(self.replied),
            "failed": {str(k): v for k, v in sorted(self.failed.items())},
            "dropped": self.dropped,
            "metrics": _clean(self.aggregated),
            "sites": {str(k): _clean(v) for k, v in sorted(self.per_site.items())},
            "bytes-down": self.bytes_down,
            "bytes-up": self.bytes_up,
            "seconds": round(self.seconds, 3),
        }


#: ``dp-noise`` of a round line: DP noise drawn from each site's own OS entropy.
DP_NOISE_SECRET = "site-secret"
#: ``dp-noise`` of a round line under ``dp.reproducible-noise`` (simulation only).
DP_NOISE_REPRODUCIBLE = "reproducible (NOT PRIVATE)"
#: ``dp-noise`` of a round line without DP.
DP_NOISE_OFF = "off"
DP_NOISE_LABELS = (DP_NOISE_SECRET, DP_NOISE_REPRODUCIBLE, DP_NOISE_OFF)


def dp_noise_label(*, dp_enabled: bool, reproducible: bool) -> str:
    """Return the ``dp-noise`` label of a run's round lines (see :class:`RecordingStrategy`)."""
    if not dp_enabled:
        return DP_NOISE_OFF
    return DP_NOISE_REPRODUCIBLE if reproducible else DP_NOISE_SECRET


class RecordingStrategy(Strategy):
    """Wrap ``inner`` and record every round to ``run_dir``.

    Parameters
    ----------
    inner : Strategy
        The strategy that decides sampling and aggregation.
    run_dir : pathlib.Path
        Receives ``rounds.jsonl`` and ``checkpoints/round-NNN.pt``.
    checkpoint_meta : dict
        ``Checkpoint`` fields other than ``state_dict``/``round``/``metrics`` (model
        name and kwargs, task, label names, run config), so each checkpoint is
        self-describing.
    dp_noise : str
        Written as ``dp-noise`` on every round line: :data:`DP_NOISE_SECRET`,
        :data:`DP_NOISE_REPRODUCIBLE` (simulation research, not private) or
        :data:`DP_NOISE_OFF`.
    selection_metric : str or None
        The aggregated site validation metric that picks ``best_model.pt``
        (``server.selection.resolve_metric``); None: no model selection.
    operating_point : str
        ``operating-point``: how a binary classifier's decision threshold is chosen from
        the pooled validation score histogram (:mod:`common.operating_point`):
        ``youden``, ``sensitivity`` or ``none``.
    target_sensitivity : float
        ``operating-point-sensitivity`` for the ``sensitivity`` method.
    claims : server.claims.ClaimRegistry, optional
        Bounds each site's ``num-examples`` claim (its FedAvg weight): a train reply it
        refuses is left out of aggregation and listed under the round's ``failed``.

    Attributes
    ----------
    scores : dict[int, dict[str, float]]
        ``{round: aggregated val metrics}`` of every global model the sites validated; a
        model scored twice keeps its first score.
    best : server.selection.Selection or None
        The best model so far (written to ``best_model.pt``); None until one has a score.
    histograms : dict[int, numpy.ndarray]
        ``{round: (2, B) score-histogram counts}`` summed over the sites that validated
        that round's global model (:mod:`common.secure_sum`; attributed to rounds as the
        ``val-*`` metrics are, :func:`server.selection.attribute`).

    """

    def __init__(
        self,
        inner: Strategy,
        *,
        run_dir: Path,
        checkpoint_meta: dict[str, Any],
        dp_noise: str = "off",
        selection_metric: str | None = None,
        operating_point: str = "none",
        target_sensitivity: float = 0.9,
        claims: ClaimRegistry | None = None,
    ) -> None:
        if dp_noise not in DP_NOISE_LABELS:
            raise ValueError(f"dp_noise={dp_noise!r} must be one of {DP_NOISE_LABELS}")
        self.dp_noise = dp_noise
        self.inner = inner
        self.run_dir = run_dir
        self.checkpoint_meta = checkpoint_meta
        self._train = _Phase()
        self._evaluate = _Phase()
        self._round_start = time.perf_counter()
        self.history: list[dict[str, Any]] = []
        self.selection_metric = selection_metric
        self.scores: dict[int, dict[str, float]] = {}
        self.best: Selection | None = None
        self.operating_point = operating_point
        self.target_sensitivity = target_sensitivity
        self.claims = claims
        #: Added to every train message's config (e.g. the census's federation class
        #: counts, ``common.secure_sum.FEDERATION_COUNTS_KEY``).
        self.extra_train_config: dict[str, Any] = {}
        self.histograms: dict[int, NDArray[np.float64]] = {}
        self._sums: dict[str, dict[str, NDArray[np.float64]]] = {"train": {}, "evaluate": {}}
        # Models that may still become the best: the initial one (the fallback) and the
        # last round's (round r's train replies validate round r - 1's model).
        self._candidates: dict[int, ArrayRecord] = {}
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / ROUNDS_FILE).write_text("")  # a run's log starts empty

    # ------------------------------------------------------------- delegation + notes
    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, and note the sampled sites and bytes sent down."""
        self._round_start = time.perf_counter()
        self._train = _Phase(started=time.perf_counter())
        self._evaluate = _Phase()  # a round without an evaluate exchange validates nothing
        self._sums = {"train": {}, "evaluate": {}}
        self._train_spec = array_spec(arrays)  # what a train reply's model record must be
        for key, value in self.extra_train_config.items():
            config[key] = value
        try:
            messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        except FederationError as exc:
            self._fail_round(server_round, exc)
            raise
        self._train = self._begin(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Note replies, failures and per-site metrics, then delegate."""
        replies, refused = self._bound_claims(server_round, list(replies))
        spec = getattr(self, "_train_spec", None)
        if spec is not None:  # a reply that would break aggregation is refused (common.wire)
            replies, malformed = screen_replies(replies, spec=spec)
            refused |= malformed
        self._sums["train"] = take_secure_sums(replies)
        self._collect(self._train, replies)
        self._train.failed |= refused
        try:
            arrays, metrics = self.inner.aggregate_train(server_round, replies)
        except FederationError as exc:
            self._fail_round(server_round, exc)
            raise
        self._train.aggregated = dict(metrics or {})
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, and note the sampled sites."""
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self._evaluate = self._begin(messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Note replies and per-site metrics, then delegate."""
        replies = list(replies)
        self._sums["evaluate"] = take_secure_sums(replies)
        self._collect(self._evaluate, replies)
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        self._evaluate.aggregated = dict(metrics or {})
        return metrics

    def _bound_claims(
        self, server_round: int, replies: list[Message]
    ) -> tuple[list[Message], dict[int, str]]:
        """Split train replies by their ``num-examples`` claim (:mod:`server.claims`).

        Returns the replies whose claim is accepted (and error replies) and
        ``{node: reason}`` of those refused.
        """
        if self.claims is None:
            return replies, {}
        kept: list[Message] = []
        refused: dict[int, str] = {}
        for r in replies:
            if r.has_error():
                kept.append(r)
                continue
            node = r.metadata.src_node_id
            claims = [m.get("num-examples") for m in r.content.metric_records.values()]
            why = self.claims.check(
                node, claims[0] if len(claims) == 1 else None, server_round=server_round
            )
            if why is None:
                kept.append(r)
            else:
                refused[node] = why
        return kept, refused

    @staticmethod
    def _begin(messages: list[Message]) -> _Phase:
        phase = _Phase(started=time.perf_counter())
        for m in messages:
            phase.sampled.append(m.metadata.dst_node_id)
            for ar in m.content.array_records.values():
                phase.bytes_down += record_nbytes(ar)
        return phase

    @staticmethod
    def _collect(phase: _Phase, replies: list[Message]) -> None:
        phase.seconds = time.perf_counter() - phase.started
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error() and r.error.code == ErrorCode.NODE_UNAVAILABLE:
                # The SuperLink answers for a site it lost: a drop, not a site's error.
                log.warning("site %d dropped: %s", node, r.error.reason)
                continue
            if r.has_error():
                phase.failed[node] = r.error.reason or f"error code {r.error.code}"
                log.warning("site %d failed: %s", node, r.error.reason)
                continue
            phase.replied.append(node)
            for ar in r.content.array_records.values():
                phase.bytes_up += record_nbytes(ar)
            for mr in r.content.metric_records.values():
                phase.per_site[node] = dict(mr)
        if phase.dropped:
            log.warning("sites %s sent no reply before the round deadline", phase.dropped)

    # ----------------------------------------------------------------- round closing
    def make_evaluate_fn(self, central: EvaluateFn | None) -> EvaluateFn:
        """Return the ``evaluate_fn`` for ``Strategy.start``.

        Flower calls it before round 1 (round 0) and at the end of every round, after
        aggregation: the right moment to run the optional server-side evaluation, save
        the checkpoint and append the round's line to the log.
        """

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            metrics = central(server_round, arrays) if central else None
            self._close_round(server_round, arrays, metrics)
            return metrics

        return evaluate_fn

    def _fail_round(self, server_round: int, exc: FederationError) -> None:
        """Append a line for a round that failed (e.g. no quorum) before re-raising."""
        line: dict[str, Any] = {
            "round": server_round,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "error": str(exc),
            "dp-noise": self.dp_noise,
            "wall-seconds": round(time.perf_counter() - self._round_start, 3),
            "train": self._train.as_json(),
        }
        log.error("round %d failed: %s", server_round, exc)
        with (self.run_dir / ROUNDS_FILE).open("a") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
        self.history.append(line)

    def _close_round(
        self, server_round: int, arrays: ArrayRecord, central: MetricRecord | None
    ) -> None:
        line: dict[str, Any] = {
            "round": server_round,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "global": _clean(central),
            "dp-noise": self.dp_noise,
        }
        if server_round > 0:
            line["wall-seconds"] = round(time.perf_counter() - self._round_start, 3)
            line["train"] = self._train.as_json()
            line["evaluate"] = self._evaluate.as_json()
            ckpt = Checkpoint(
                state_dict=arrays.to_torch_state_dict(),
                round=server_round,
                metrics={k: float(v) for k, v in (central or {}).items()},  # type: ignore[arg-type]
                **self.checkpoint_meta,
            )
            save_checkpoint(self.run_dir / "checkpoints" / f"round-{server_round:03d}.pt", ckpt)
        if self.selection_metric is not None:
            line["model-selection"] = self._select(server_round, arrays, self.selection_metric)
        with (self.run_dir / ROUNDS_FILE).open("a") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
        self.history.append(line)

    def _select(self, server_round: int, arrays: ArrayRecord, metric: str) -> dict[str, Any]:
        """Score the models this round's validation describes; keep the best.

        Writes ``best_model.pt`` (atomically) whenever the best round changes, and
        returns the round line's ``model-selection`` entry: the metric and its goal,
        ``validated`` (``{round: value}`` of the models this round's val metrics
        describe, see :func:`server.selection.attribute`) and the best so far.
        """
        self._candidates[server_round] = arrays
        validated = attribute(
            server_round, train=self._train.aggregated, evaluate=self._evaluate.aggregated
        )
        for rnd, metrics in validated.items():
            self.scores.setdefault(rnd, metrics)
        for rnd, hist in self._validated_histograms(server_round).items():
            self.histograms.setdefault(rnd, hist)
        best = select_best(self.scores, metric=metric)
        if best is not None and (self.best is None or best.round != self.best.round):
            self._write_best(best, self._candidates[best.round])
            self.best = best
        self._candidates = {r: a for r, a in self._candidates.items() if r in (0, server_round)}
        entry = {
            "metric": metric,
            "goal": "min" if is_minimised(metric) else "max",
            "validated": {str(r): _json_number(m.get(metric)) for r, m in validated.items()},
            "best-round": None if best is None else best.round,
            "best-value": None if best is None else _json_number(best.value),
        }
        points = {
            str(r): op.as_dict()
            for r in validated
            if (op := self.operating_point_of(r)) is not None
        }
        if points:
            entry["operating-point"] = points
        return entry

    def _validated_histograms(self, server_round: int) -> dict[int, NDArray[np.float64]]:
        """Return this round's summed histograms keyed by the round whose model they describe."""
        out: dict[int, NDArray[np.float64]] = {}
        train = self._sums["train"].get(secure_sum.SCORE_HISTOGRAM)
        if train is not None and server_round >= 1:
            out[server_round - 1] = train
        evaluated = self._sums["evaluate"].get(secure_sum.SCORE_HISTOGRAM)
        if evaluated is not None:
            out[server_round] = evaluated
        return out

    def operating_point_of(self, server_round: int) -> OperatingPoint | None:
        """Return the decision threshold for round ``server_round``'s global model, if any.

        Chosen by ``operating-point`` on the pooled score histogram of the sites'
        validation of that model (:func:`common.operating_point.choose_threshold`);
        None when the run picks none, no histogram reached the coordinator for that
        model (e.g. the final model's evaluate exchange under SecAgg+, which carries no
        histogram), or the histogram lacks a class.
        """
        hist = self.histograms.get(server_round)
        if self.operating_point == "none" or hist is None:
            return None
        try:
            return choose_threshold(
                hist,
                method=self.operating_point,
                target_sensitivity=self.target_sensitivity,
                server_round=server_round,
            )
        except DataError as exc:
            log.warning("round %d: no operating point: %s", server_round, exc)
            return None

    def _write_best(self, best: Selection, arrays: ArrayRecord) -> None:
        """Save round ``best.round``'s global model as ``best_model.pt`` (atomic replace).

        The checkpoint is that round's model with ``metrics`` = its aggregated site
        validation and ``selected_round`` / ``selection_metric`` saying why it was chosen.
        """
        op = self.operating_point_of(best.round)
        ckpt = Checkpoint(
            state_dict=arrays.to_torch_state_dict(),
            round=best.round,
            metrics=dict(best.metrics),
            selected_round=best.round,
            selection_metric=best.metric,
            operating_point=None if op is None else op.as_dict(),
            **self.checkpoint_meta,
        )
        save_checkpoint(self.run_dir / BEST_MODEL, ckpt)
        log.info(
            "best model so far: round %d (%s %.4f) -> %s",
            best.round,
            best.metric,
            best.value,
            BEST_MODEL,
        )

    # ------------------------------------------------------------------- resume
    def resume_state(self) -> dict[str, Any]:
        """Return what :meth:`restore` needs to go on after a restart (JSON-safe).

        server/resume.py saves it in the run's resume state after every round: the round
        log so far (``history``), the sites' validation ``scores``, the summed score
        ``histograms`` (operating points), the registered ``claims`` and the ``best``
        model so far.
        """
        best = self.best
        return {
            "history": list(self.history),
            "scores": {str(r): dict(m) for r, m in self.scores.items()},
            "histograms": {str(r): h.tolist() for r, h in self.histograms.items()},
            "claims": None
            if self.claims is None
            else {str(n): c for n, c in self.claims.registered.items()},
            "best": None
            if best is None
            else {
                "round": best.round,
                "metric": best.metric,
                "value": best.value,
                "metrics": dict(best.metrics),
            },
        }

    def restore(
        self, state: Mapping[str, Any], *, arrays: ArrayRecord, initial_arrays: ArrayRecord
    ) -> None:
        """Go on from :meth:`resume_state`, saved after the run's last committed round.

        Rewrites ``rounds.jsonl`` atomically with the saved lines (the constructor emptied
        it; a round lost in the crash has no line among them), and ``best_model.pt`` with
        the saved best (a lost round may have replaced it), or removes it if none was.

        Parameters
        ----------
        state : Mapping
            From :meth:`resume_state`.
        arrays : ArrayRecord
            The global model of the last committed round (the last saved line's round).
        initial_arrays : ArrayRecord
            The round-0 model.

        Raises
        ------
        ValueError
            If ``state`` is not what :meth:`resume_state` returns.
        common.errors.DataError
            If the best round's checkpoint cannot be read.

        """
        from common.checkpoint import load_checkpoint
        from common.fsutil import atomic_write

        try:
            history = [dict(line) for line in state["history"]]
            last = int(history[-1]["round"])
            scores = {
                int(r): {str(k): float(v) for k, v in m.items()} for r, m in state["scores"].items()
            }
            histograms = {
                int(r): np.asarray(h, dtype=np.float64)
                for r, h in state.get("histograms", {}).items()
            }
            claims = {int(n): float(c) for n, c in (state.get("claims") or {}).items()}
            saved = state["best"]
            best = (
                None
                if saved is None
                else Selection(
                    round=int(saved["round"]),
                    metric=str(saved["metric"]),
                    value=float(saved["value"]),
                    metrics={str(k): float(v) for k, v in saved["metrics"].items()},
                )
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a RecordingStrategy resume state: {exc!r}") from None
        self.history, self.scores, self.best = history, scores, best
        self.histograms = histograms
        if self.claims is not None:
            self.claims.registered.update(claims)
        self._candidates = {0: initial_arrays, last: arrays}
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in history).encode()
        atomic_write(self.run_dir / ROUNDS_FILE, lambda fh: fh.write(text))
        if best is None:
            (self.run_dir / BEST_MODEL).unlink(missing_ok=True)
            return
        source = self._candidates.get(best.round)
        if source is None:
            ckpt = load_checkpoint(self.run_dir / "checkpoints" / f"round-{best.round:03d}.pt")
            source = ArrayRecord(ckpt.state_dict)
        self._write_best(best, source)
