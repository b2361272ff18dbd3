"""Typed run and node configuration, parsed once from Flower's flat dictionaries.

Configuration flows one way (DESIGN section 4): ``pyproject.toml``
``[tool.flwr.app.config]`` defaults -> ``flwr run --run-config`` overrides ->
``context.run_config`` -> :meth:`RunConfig.from_run_config` at the top of each app.
Site-specific values come only from ``context.node_config`` -> :class:`NodeConfig`.

Every key is kebab-case; errors name the key, the rule and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from common.errors import ConfigError, did_you_mean

ConfigScalar = bool | int | float | str | bytes
Check = Callable[[Any], str | None]


def _option(default: Any, key: str, help_: str, check: Check | None = None) -> Any:
    """Declare a dataclass field for the flat config ``key`` (its help and value check)."""
    return field(default=default, metadata={"key": key, "help": help_, "check": check})


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _fraction(v: Any) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


def _half_open(low: float, high: float) -> Check:
    """Check that a value lies in ``[low, high)``."""

    def check(v: Any) -> str | None:
        return None if low <= v < high else f"must be in [{low:g}, {high:g})"

    return check


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


#: Largest run ``seed``. Its narrowest consumer bounds it: NumPy seeds (the partitioners'
#: ``default_rng(seed)``, ``seed + 1``, ``seed + site``; ``client/faults.py``'s
#: ``default_rng([seed, round, site])``) must be non-negative, and the site's round seed
#: ``seed * 1_000_003 + round * 1_009 + site`` (+ 7 for reproducible DP noise,
#: ``client/site/handlers.py``) goes to ``torch.Generator.manual_seed``, which takes
#: values below 2**64. ``[0, 2**32 - 1]`` (also NumPy's legacy ``RandomState`` range)
#: keeps that sum below 2**53 for any realistic number of rounds.
MAX_SEED = 2**32 - 1

#: Most classes a model may predict (``num-classes``): beyond it the model's output
#: layer alone would take gigabytes; also the limit :mod:`common.checkpoint` accepts.
MAX_NUM_CLASSES = 10_000

#: What a ``project`` name may look like: it travels inside Flower's ``--run-config``
#: TOML, is recorded in every site's audit log and is matched against site
#: policies, so no quotes, spaces, newlines or path separators (the same rule the site
#: worker uses to write a name verbatim into its audit log).
PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: Largest ``--config`` TOML file read (a run config is a few hundred bytes).
MAX_CONFIG_FILE_BYTES = 1 << 20


def _seed(v: Any) -> str | None:
    if 0 <= v <= MAX_SEED:
        return None
    return (
        f"must be in [0, {MAX_SEED}] (2**32 - 1): NumPy and torch seed every site's "
        "generators from it; pick a smaller non-negative seed"
    )


def _num_classes(v: Any) -> str | None:
    if 1 <= v <= MAX_NUM_CLASSES:
        return None
    return f"must be in [1, {MAX_NUM_CLASSES}]"


def _project(v: Any) -> str | None:
    if PROJECT_RE.match(v):
        return None
    bad = sorted({c for c in v if not re.match(r"[A-Za-z0-9._-]", c)})
    what = f"; it contains {', '.join(repr(c) for c in bad[:5])}" if bad else ""
    return (
        "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
        f"(e.g. 'chest-xray-2025'){what}"
    )


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        if v in choices:
            return None
        return f"must be one of {list(choices)}.{did_you_mean(str(v), choices)}"

    return check


#: Learning tasks (registry with loss, metrics and dataset checks: common/tasks.py).
TASKS = ("classification", "segmentation", "tabular")
STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "scaffold",
)
#: Strategies whose aggregation is not a weighted mean: they need each site's plaintext
#: update, which secure aggregation hides by design (the server sees only the sum).
NONLINEAR_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")
ACCOUNTANTS = ("rdp", "prv")
#: Where class weights come from (common/imbalance.py): ``auto`` (``site`` for the
#: classification tasks, ``none`` for segmentation), none, the site's own training
#: labels, or the federation's securely summed class counts.
CLASS_WEIGHTINGS = ("auto", "none", "site", "federation")
#: Training-time augmentation presets (client/augment.py ``PRESETS``, checked by tests).
AUGMENTATIONS = ("none", "light", "medium")


def _max_weight(v: Any) -> str | None:
    return None if v >= 1.0 else "must be >= 1 (1 turns class weighting off)"


#: ``model-selection-metric`` that lets the task decide (server/selection.py).
AUTO_SELECTION = "auto"


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Coerce a TOML scalar to ``typ`` (int -> float allowed; nothing else)."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"config key {key!r} must be of type {typ.__name__}, got {value!r} "
            f"({type(value).__name__}); fix it in [tool.flwr.app.config] or your --run-config."
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}.")
    return value


#: Images (or rows) per forward pass whenever a model is only evaluated (site validation,
#: the server's held-out evaluation, baselines, ``medfed evaluate``): run config
#: ``eval-batch-size``. It sets memory use only, never a metric.
EVAL_BATCH_SIZE = 64

#: SecAgg+ fixed-point rounding (``secagg.quantisation``; common/secagg/encoding.py).
QUANTISATIONS = ("deterministic", "stochastic")


def _check_keyed_fields(obj: Any) -> None:
    """Coerce and check every field of ``obj`` that carries a config key."""
    for f in dataclasses.fields(obj):
        if "key" not in f.metadata:
            continue
        value = _coerce(f.metadata["key"], getattr(obj, f.name), _field_type(f))
        object.__setattr__(obj, f.name, value)
        check = f.metadata["check"]
        if check is not None and (problem := check(value)) is not None:
            raise ConfigError(f"config key {f.metadata['key']!r}={value!r} {problem}")


class _Group:
    """A frozen group of run-config keys: validated on construction, copied by ``replace``."""

    def __post_init__(self) -> None:
        _check_keyed_fields(self)

    def replace(self, **changes: Any) -> Self:
        """Return a copy with fields (snake_case names) replaced and re-validated."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_Group):
    """Local training at every site (``run.train``; top-level keys)."""

    local_epochs: int = _option(1, "local-epochs", "local epochs per round", _positive)
    batch_size: int = _option(32, "batch-size", "local (logical) batch size", _positive)
    learning_rate: float = _option(0.05, "learning-rate", "local SGD learning rate", _positive)
    momentum: float = _option(0.9, "momentum", "local SGD momentum", _half_open(0.0, 1.0))
    weight_decay: float = _option(0.0, "weight-decay", "local SGD L2 penalty", _non_negative)
    amp: bool = _option(
        False,
        "amp",
        "mixed precision (bfloat16 autocast) for local training; only with dp.enabled=false",
    )
    class_weighting: str = _option(
        "auto",
        "class-weighting",
        "class-weighted cross-entropy: 'auto' ('site' for classification, 'none' for "
        "segmentation), 'none', 'site' (inverse frequency of the site's own training "
        "labels) or 'federation' (of the federation's label counts, summed before round "
        "1 without any site revealing its own: under SecAgg+ when it is on)",
        _one_of(*CLASS_WEIGHTINGS),
    )
    class_weight_max: float = _option(
        10.0, "class-weight-max", "cap on any class weight (rare classes), >= 1", _max_weight
    )
    augment: str = _option(
        "none",
        "augment",
        "training-time image augmentation at each site (MONAI affine, intensity, "
        "noise): 'none', 'light' or 'medium'",
        _one_of(*AUGMENTATIONS),
    )


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig(_Group):
    """How global models are evaluated and the best one picked (``run.evaluation``)."""

    in_train: bool = _option(
        True,
        "evaluate-in-train",
        "sites evaluate the received global model on their validation split inside the "
        "train message (no separate evaluate exchange per round); the evaluate message "
        "then runs only for the final model",
    )
    selection_metric: str = _option(
        AUTO_SELECTION,
        "model-selection-metric",
        "aggregated site validation metric that picks best_model.pt: 'auto' "
        "(val-balanced-accuracy for classification, the task's headline metric "
        "otherwise) or val-<metric> of the run's task; a metric ending in 'loss' is "
        "minimised, any other maximised",
    )
    batch_size: int = _option(
        EVAL_BATCH_SIZE,
        "eval-batch-size",
        "images per forward pass when a model is only evaluated (site validation, "
        "server-side and baseline evaluation); memory only, never a metric",
        _positive,
    )


@dataclass(frozen=True, kw_only=True)
class OperatingPointConfig(_Group):
    """Decision threshold of a binary classifier (``run.operating_point``)."""

    method: str = _option(
        "youden",
        "operating-point",
        "decision threshold of a binary classifier, chosen on the pooled ROC of the "
        "sites' securely summed validation score histograms: 'youden' (max "
        "sensitivity + specificity - 1), 'sensitivity' (the highest threshold reaching "
        "operating-point-sensitivity) or 'none' (argmax, 0.5)",
        _one_of("youden", "sensitivity", "none"),
    )
    sensitivity: float = _option(
        0.9,
        "operating-point-sensitivity",
        "target sensitivity of operating-point='sensitivity', in (0, 1]",
        lambda v: None if 0.0 < v <= 1.0 else "must be in (0, 1]",
    )
    bins: int = _option(
        100,
        "operating-point-bins",
        "score histogram bins per class (threshold resolution 1/bins), 2..1000",
        lambda v: None if 2 <= v <= 1000 else "must be in 2..1000",
    )


@dataclass(frozen=True, kw_only=True)
class FederationConfig(_Group):
    """Who takes part in a round and how long the coordinator waits (``run.federation``)."""

    min_sites: int = _option(3, "min-sites", "sites that must connect before round 1", _positive)
    fraction_train: float = _option(
        1.0, "fraction-train", "fraction of sites per train round", _fraction
    )
    fraction_evaluate: float = _option(
        1.0, "fraction-evaluate", "fraction of sites per evaluate round", _fraction
    )
    connect_timeout: float = _option(
        120.0, "connect-timeout", "seconds to wait for min-sites to connect", _positive
    )
    round_timeout: float = _option(
        300.0, "round-timeout", "seconds a round waits for site replies", _positive
    )
    min_replies: int = _option(
        1,
        "min-replies",
        "quorum: sites that must reply for a round to aggregate (else the run fails)",
        _positive,
    )
    max_site_examples: int = _option(
        1_000_000,
        "max-site-examples",
        "largest num-examples a site may claim (its FedAvg weight); a site's first "
        "accepted claim is its registered count for the run and later claims may not "
        "exceed it (server/claims.py)",
        _positive,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fraction_train == 0.0:
            raise ConfigError("config key 'fraction-train' must be > 0: no site would train.")
        if self.min_replies > self.min_sites:
            raise ConfigError(
                f"config key 'min-replies'={self.min_replies} exceeds 'min-sites'="
                f"{self.min_sites}: no round could reach the quorum; lower 'min-replies'."
            )


@dataclass(frozen=True, kw_only=True)
class StrategyConfig(_Group):
    """The aggregation strategy and its hyper-parameters (``run.strategy``).

    ``name`` is the key ``strategy``; the others are the ``strategy-args.`` table (TOML
    cannot make ``strategy`` a value and a table).
    """

    name: str = _option("fedavg", "strategy", "aggregation strategy", _one_of(*STRATEGIES))
    proximal_mu: float = _option(
        0.01, "strategy-args.proximal-mu", "FedProx: weight mu of the proximal term", _non_negative
    )
    server_lr: float = _option(
        0.1, "strategy-args.server-lr", "FedAdam/FedYogi: server learning rate", _positive
    )
    trim_beta: float = _option(
        0.2,
        "strategy-args.trim-beta",
        "FedTrimmedAvg: fraction cut from each end",
        _half_open(0.0, 0.5),
    )
    krum_byzantine: int = _option(
        0,
        "strategy-args.krum-byzantine",
        "Krum: number of malicious sites tolerated",
        _non_negative,
    )


@dataclass(frozen=True, kw_only=True)
class DPConfig(_Group):
    """Differential privacy at every site, Opacus DP-SGD (``run.dp``; keys ``dp.*``)."""

    enabled: bool = _option(True, "dp.enabled", "DP-SGD (Opacus) at every site")
    target_epsilon: float = _option(
        8.0, "dp.target-epsilon", "epsilon each site reaches after all planned rounds", _positive
    )
    noise_multiplier: float = _option(
        0.0, "dp.noise-multiplier", "fixed noise multiplier; 0 = derive from target", _non_negative
    )
    max_grad_norm: float = _option(
        1.0, "dp.max-grad-norm", "per-sample gradient clipping norm C", _positive
    )
    accountant: str = _option("rdp", "dp.accountant", "Opacus accountant", _one_of(*ACCOUNTANTS))
    reproducible_noise: bool = _option(
        False,
        "dp.reproducible-noise",
        "simulation only, NOT PRIVATE: seed DP noise and sampling from 'seed' so a run "
        "repeats exactly; refused by every site outside simulation",
    )
    max_physical_batch_size: int = _option(
        128, "dp.max-physical-batch-size", "memory cap per forward/backward pass", _positive
    )


@dataclass(frozen=True, kw_only=True)
class SecAggConfig(_Group):
    """Secure aggregation, SecAgg+ (``run.secagg``; keys ``secagg.*``).

    The protocol is SecAgg+ (Bell et al., CCS 2020, Algorithm 2; see
    :mod:`common.secagg.params`), run by ``server/secagg.py`` and ``client/secagg_mod.py``.

    Attributes
    ----------
    enabled : bool
        ``secagg.enabled``: the coordinator sees only the weighted sum of the updates.
    neighbours : int
        ``secagg.neighbours``: size ``k`` of each site's neighbourhood in the k-regular
        communication graph (Bell et al. 2020, section 3.1). ``0`` means every other
        sampled site (the complete graph of Bonawitz et al. 2017). A ``k`` smaller than
        ``n - 1`` is rounded up to even (Harary-style ring graph).
    threshold : float
        ``secagg.threshold``: fraction in ``[0.5, 1)``. A secret shared among ``m``
        holders (the ``k`` neighbours and the site itself) needs
        ``t = floor(threshold * m) + 1`` shares to be rebuilt (:meth:`shares_needed`), a
        strict majority at 0.5, so ``m - t`` holders may drop after sending their masked
        input.
    clip_range : float
        ``secagg.clip-range``: bound ``c`` on ``|delta|`` per coordinate, where ``delta``
        is the site's trained float weights minus the received global weights. A site
        whose delta leaves ``[-c, c]`` refuses to send (``ClipRangeError``); nothing is
        clipped silently.
    quantisation : str
        ``secagg.quantisation``: ``"deterministic"`` (round to nearest) or
        ``"stochastic"`` (unbiased randomized rounding).
    sum_spec : dict[str, tuple[int, ...]]
        Derived, not a key: the run's secure-sum arrays (:func:`common.secure_sum.spec`,
        e.g. the validation score histogram), appended to every site's masked delta so
        that only their sum over the survivors is revealed. :class:`RunConfig` fills it
        from the whole run; empty for none (and in a group built on its own).

    """

    enabled: bool = _option(
        True, "secagg.enabled", "secure aggregation: the server sees only the sum"
    )
    neighbours: int = _option(
        0, "secagg.neighbours", "neighbours per site in SecAgg+; 0 = all", _non_negative
    )
    threshold: float = _option(
        0.5,
        "secagg.threshold",
        "fraction of a neighbourhood (> it) needed to unmask",
        _half_open(0.5, 1.0),
    )
    clip_range: float = _option(
        4.0, "secagg.clip-range", "largest |weight change| per round", _positive
    )
    quantisation: str = _option(
        "deterministic", "secagg.quantisation", "fixed-point rounding", _one_of(*QUANTISATIONS)
    )
    sum_spec: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False)

    def shares_needed(self, holders: int) -> int:
        """Reconstruction threshold ``t`` for a secret with ``holders`` share holders.

        ``t = floor(threshold * holders) + 1`` (capped at ``holders``), at least 2 so no
        single holder ever learns a secret.

        Raises
        ------
        SecAggAbortedError
            If ``holders < 2``: one site alone cannot hide its update.

        """
        from common.secagg.errors import SecAggAbortedError

        if holders < 2:
            raise SecAggAbortedError(
                f"secure aggregation needs at least 2 sites per neighbourhood, got {holders}"
            )
        return max(2, min(holders, math.floor(self.threshold * holders) + 1))


@dataclass(frozen=True, kw_only=True)
class FaultsConfig(_Group):
    """Injected faults, honoured in simulation only (``run.faults``; keys ``faults.*``)."""

    dropout: float = _option(
        0.0,
        "faults.dropout",
        "simulation only: probability a site drops out of a round",
        _half_open(0.0, 1.0),
    )
    slow_site: int = _option(
        -1, "faults.slow-site", "simulation only: partition-id of a slow site; -1 none"
    )
    slow_seconds: float = _option(
        0.0, "faults.slow-seconds", "simulation only: extra seconds per round", _non_negative
    )
    slow_round: int = _option(
        1, "faults.slow-round", "simulation only: round from which the slow site is slow", _positive
    )
    crash_site: int = _option(
        -1, "faults.crash-site", "simulation only: partition-id of a site that crashes; -1 none"
    )
    crash_round: int = _option(
        1, "faults.crash-round", "simulation only: round from which it crashes", _positive
    )
    drop_site: int = _option(
        -1,
        "faults.drop-site",
        "simulation only: partition-id of a site that stops answering at a SecAgg+ stage; -1 none",
    )
    drop_stage: str = _option(
        "unmask",
        "faults.drop-stage",
        "simulation only: the SecAgg+ stage at which faults.drop-site stops answering",
        _one_of("advertise-keys", "share-keys", "masked-input", "unmask"),
    )


@dataclass(frozen=True, kw_only=True)
class PathsConfig(_Group):
    """Where the run reads and writes (``run.paths``; top-level keys)."""

    run_dir: str = _option("", "run-dir", "where the server writes logs and checkpoints")
    sites_dir: str = _option(
        "", "sites-dir", "simulation only: folder of site-<partition-id> datasets"
    )
    eval_dataset_dir: str = _option(
        "", "eval-dataset-dir", "optional server-side held-out site dataset"
    )
    site_policy: str = _option(
        "",
        "site-policy",
        "simulation only: site policy TOML every virtual site applies (a real site "
        "uses its own worker's policy and ignores this key)",
    )
    resume_from: str = _option(
        "",
        "resume-from",
        "a run directory the ServerApp can read: resume that run after its last "
        "finished round (server/resume.py); `medfed simulate --resume` sets it",
    )


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Federation-wide settings chosen by the coordinator or researcher, in frozen groups.

    Flower's run config is one flat dictionary of kebab-case keys; here the keys are
    grouped by concern. Every key keeps its flat name (:meth:`from_run_config` /
    :meth:`to_run_config` round-trip it); ``python -c "from common.config import
    RunConfig; print(RunConfig.keys())"`` lists them with their help.

    Attributes
    ----------
    task, model, num_classes, num_server_rounds, seed, project
        Keys ``task``, ``model``, ``num-classes``, ``num-server-rounds``, ``seed`` and
        ``project``.
    train : TrainConfig
        Local training: ``local-epochs``, ``batch-size``, ``learning-rate``,
        ``momentum``, ``weight-decay``, ``amp``, ``class-weighting``,
        ``class-weight-max``, ``augment``.
    evaluation : EvaluationConfig
        ``evaluate-in-train`` (``in_train``), ``model-selection-metric``
        (``selection_metric``) and ``eval-batch-size`` (``batch_size``, default
        :data:`EVAL_BATCH_SIZE` = 64: the images per forward pass of every evaluation,
        at the sites, on the server and in the baselines).
    operating_point : OperatingPointConfig
        ``operating-point`` (``method``), ``operating-point-sensitivity``,
        ``operating-point-bins``.
    federation : FederationConfig
        ``min-sites``, ``min-replies``, ``fraction-train``, ``fraction-evaluate``,
        ``connect-timeout``, ``round-timeout``, ``max-site-examples``.
    strategy : StrategyConfig
        ``strategy`` (``name``) and the ``strategy-args.*`` table.
    dp : DPConfig
        The ``dp.*`` table.
    secagg : SecAggConfig
        The ``secagg.*`` table, plus the derived ``sum_spec``.
    faults : FaultsConfig
        The ``faults.*`` table (simulation only).
    paths : PathsConfig
        ``run-dir``, ``sites-dir``, ``eval-dataset-dir``, ``site-policy``,
        ``resume-from``.

    Construct with :meth:`from_run_config` (flat keys); direct construction, with group
    objects (``RunConfig(dp=DPConfig(enabled=False))``), also validates. :meth:`override`
    returns a copy with some flat keys changed.

    Raises
    ------
    ConfigError
        On unknown keys (with a "did you mean"), wrong types or out-of-range values.

    """

    task: str = _option(
        "classification", "task", "learning task of the site datasets", _one_of(*TASKS)
    )
    model: str = _option("cnn", "model", "registered model name")
    num_classes: int = _option(
        2,
        "num-classes",
        "classes the model predicts (segmentation: incl. background; 2 = background/vessel)",
        _num_classes,
    )
    num_server_rounds: int = _option(10, "num-server-rounds", "federated rounds", _positive)
    seed: int = _option(42, "seed", f"seed for model init and sampling, 0..{MAX_SEED}", _seed)
    project: str = _option(
        "medfed-demo",
        "project",
        "study name (letters, digits, '.', '_', '-'); sites allow-list it in their policy",
        _project,
    )
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"group": TrainConfig})
    evaluation: EvaluationConfig = field(
        default_factory=EvaluationConfig, metadata={"group": EvaluationConfig}
    )
    operating_point: OperatingPointConfig = field(
        default_factory=OperatingPointConfig, metadata={"group": OperatingPointConfig}
    )
    federation: FederationConfig = field(
        default_factory=FederationConfig, metadata={"group": FederationConfig}
    )
    strategy: StrategyConfig = field(
        default_factory=StrategyConfig, metadata={"group": StrategyConfig}
    )
    dp: DPConfig = field(default_factory=DPConfig, metadata={"group": DPConfig})
    secagg: SecAggConfig = field(default_factory=SecAggConfig, metadata={"group": SecAggConfig})
    faults: FaultsConfig = field(default_factory=FaultsConfig, metadata={"group": FaultsConfig})
    paths: PathsConfig = field(default_factory=PathsConfig, metadata={"group": PathsConfig})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if "group" in f.metadata and not isinstance(getattr(self, f.name), f.metadata["group"]):
                raise ConfigError(
                    f"RunConfig({f.name}=...) takes a {f.metadata['group'].__name__}, got "
                    f"{getattr(self, f.name)!r}; build a RunConfig from flat keys with "
                    "RunConfig.from_run_config."
                )
        _check_keyed_fields(self)
        self._check_combinations()
        # Validate the model name here so a typo fails before any round starts.
        from common.models import check_model_name

        check_model_name(self.model)
        self._check_selection_metric()
        from common import secure_sum

        object.__setattr__(
            self, "secagg", dataclasses.replace(self.secagg, sum_spec=secure_sum.spec(self))
        )

    def _check_combinations(self) -> None:
        """Refuse settings that are valid alone but not together (across groups)."""
        train, strategy = self.train, self.strategy.name
        if train.amp and self.dp.enabled:
            raise ConfigError(
                "config key 'amp'=true needs 'dp.enabled'=false: per-sample gradient clipping "
                "under reduced precision is not validated in medfed; turn one of them off."
            )
        if train.class_weighting in ("site", "federation") and self.task == "segmentation":
            raise ConfigError(
                f"config key 'class-weighting'={train.class_weighting!r} needs an image-level "
                "classification task; the segmentation loss takes no class weights: set "
                "class-weighting='none'."
            )
        if train.augment != "none" and self.task != "classification":
            raise ConfigError(
                f"config key 'augment'={train.augment!r} needs task='classification': the "
                "presets warp images only (segmentation masks would need the same warp; "
                "tabular features are not images); set augment='none'."
            )
        if strategy == "scaffold" and (self.dp.enabled or self.secagg.enabled):
            raise ConfigError(
                "config key 'strategy'='scaffold' needs 'dp.enabled'=false and "
                "'secagg.enabled'=false: Opacus overwrites the gradient the drift correction "
                "is added to, and each site's control-variate delta would leave unmasked."
            )
        if strategy == "scaffold" and train.momentum != 0.0:
            raise ConfigError(
                "config key 'strategy'='scaffold' needs plain local SGD ('momentum'=0): its "
                "control-variate update (x - y) / (K * learning-rate) assumes it "
                "(Karimireddy et al. 2020, option II); set momentum=0."
            )
        if strategy == "fedprox" and self.dp.enabled:
            raise ConfigError(
                "config key 'strategy'='fedprox' with 'dp.enabled'=true is not supported: "
                "Opacus privatises only the per-sample gradients, so the proximal term's "
                "gradient would be silently dropped; set dp.enabled=false for FedProx."
            )
        if self.secagg.enabled and strategy in NONLINEAR_STRATEGIES:
            raise ConfigError(
                f"config key 'strategy'={strategy!r} aggregates each site's update "
                "non-linearly (median / trimmed mean / Krum), but 'secagg.enabled'=true lets "
                "the server see only the sum of updates; set secagg.enabled=false for this "
                "strategy (the sites' updates are then visible to the coordinator) or use a "
                "weighted-mean strategy (fedavg, fedprox, fedadam, fedyogi)."
            )

    def _check_selection_metric(self) -> None:
        """Refuse a ``model-selection-metric`` the run's sites would never report.

        The sites report ``val-`` + the keys of the task's metrics
        (:func:`common.wire.task_metric_names`); ``auto`` needs no check (and no import).

        Raises
        ------
        ConfigError
            Naming the valid metrics, with a "did you mean".
        """
        metric = self.evaluation.selection_metric
        if metric == AUTO_SELECTION:
            return
        from common.wire import VAL_PREFIX, task_metric_names

        names = sorted(VAL_PREFIX + n for n in task_metric_names(self.task, self.num_classes))
        if metric not in names:
            raise ConfigError(
                f"config key 'model-selection-metric'={metric!r} is not a validation metric "
                f"the sites report for task {self.task!r}.{did_you_mean(metric, names)} "
                f"Use {AUTO_SELECTION!r} or one of {names}."
            )

    @classmethod
    def _key_fields(cls) -> dict[str, tuple[str | None, dataclasses.Field[Any]]]:
        """Map every config key to its group attribute (``None``: top level) and field."""
        out: dict[str, tuple[str | None, dataclasses.Field[Any]]] = {}
        for f in dataclasses.fields(cls):
            if "group" in f.metadata:
                for g in dataclasses.fields(f.metadata["group"]):
                    if "key" in g.metadata:
                        out[g.metadata["key"]] = (f.name, g)
            else:
                out[f.metadata["key"]] = (None, f)
        return out

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Map every config key to its one-line help."""
        return {key: f.metadata["help"] for key, (_, f) in cls._key_fields().items()}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, ConfigScalar]) -> RunConfig:
        """Parse Flower's flat ``context.run_config``.

        Parameters
        ----------
        run_config : Mapping[str, bool | int | float | str | bytes]
            Kebab-case keys as in ``[tool.flwr.app.config]``.

        Returns
        -------
        RunConfig

        Raises
        ------
        ConfigError
            Unknown key (names the closest valid key), wrong type or invalid value.

        """
        by_key = cls._key_fields()
        top: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {}
        for key, value in run_config.items():
            if key not in by_key:
                raise ConfigError(
                    f"unknown config key {key!r}.{did_you_mean(key, by_key)} "
                    f"Valid keys: {sorted(by_key)}."
                )
            group, f = by_key[key]
            (top if group is None else groups.setdefault(group, {}))[f.name] = value
        types = {
            f.name: f.metadata["group"] for f in dataclasses.fields(cls) if "group" in f.metadata
        }
        return cls(**top, **{name: types[name](**values) for name, values in groups.items()})

    def to_run_config(self) -> dict[str, ConfigScalar]:
        """Return the flat kebab-case dictionary (inverse of :meth:`from_run_config`)."""
        return {
            key: getattr(self if group is None else getattr(self, group), f.name)
            for key, (group, f) in self._key_fields().items()
        }

    def override(self, changes: Mapping[str, ConfigScalar]) -> RunConfig:
        """Return a copy with the flat kebab-case keys in ``changes`` replaced, re-validated.

        Example: ``run.override({"dp.enabled": False, "amp": True})``.
        """
        return RunConfig.from_run_config({**self.to_run_config(), **changes})

    def replace(self, **changes: Any) -> RunConfig:
        """Return a copy with top-level fields or whole groups replaced and re-validated."""
        return dataclasses.replace(self, **changes)

    def class_weight_source(self) -> str:
        """``class-weighting`` with ``auto`` resolved: ``"none"`` or ``"site"``.

        ``auto`` is ``"site"`` for the classification tasks (``classification``,
        ``tabular``) and ``"none"`` for ``segmentation``, whose Dice + cross-entropy
        loss takes no class weights.
        """
        if self.train.class_weighting == "auto":
            return "none" if self.task == "segmentation" else "site"
        return self.train.class_weighting

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`common.models.get_model` derived from this config."""
        return {"num_classes": self.num_classes}


def _field_type(f: dataclasses.Field[Any]) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]


DEVICES_HELP = "'auto', 'cpu', 'cuda' or 'cuda:N'"


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """Settings that belong to one site, from the SuperNode's ``--node-config``.

    Attributes
    ----------
    dataset_dir : Path or None
        The site dataset directory (deployment: ``dataset-dir``).
    partition_id : int or None
        Simulation only: Flower's ``partition-id``; the dataset is
        ``<sites-dir>/site-<partition-id>``.
    state_dir : Path or None
        Where the site keeps its own state (``state-dir``).
    device : str
        ``device`` key: 'auto', 'cpu', 'cuda' or 'cuda:N'; default ``auto``.
    site_id : str
        Human-readable site name (``site-id``); never leaves the site.

    The site's privacy limits (epsilon ceiling, delta, noise floor) are not node config:
    they live in the site policy the worker reads (client/site/policy.py).
    """

    dataset_dir: Path | None = None
    partition_id: int | None = None
    state_dir: Path | None = None
    device: str = "auto"
    site_id: str = ""

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, ConfigScalar]) -> NodeConfig:
        """Parse Flower's ``context.node_config``.

        Raises
        ------
        ConfigError
            When a value has the wrong type or the device string is invalid.

        """

        def opt_path(key: str) -> Path | None:
            v = node_config.get(key)
            if v in (None, ""):
                return None
            return Path(str(_coerce(key, v, str))).expanduser()

        pid = node_config.get("partition-id")
        for moved in ("dp-max-epsilon", "dp-delta"):
            if moved in node_config:
                raise ConfigError(
                    f"node config {moved!r} is no longer read: the site's privacy limits "
                    "live in its site policy (medfed site policy init; keys max-epsilon "
                    "and delta)"
                )
        device = str(_coerce("device", node_config.get("device", "auto"), str))
        if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
            raise ConfigError(f"node config key 'device'={device!r} must be {DEVICES_HELP}.")
        return cls(
            dataset_dir=opt_path("dataset-dir"),
            partition_id=None if pid is None else int(_coerce("partition-id", pid, int)),
            state_dir=opt_path("state-dir"),
            device=device,
            site_id=str(_coerce("site-id", node_config.get("site-id", ""), str)),
        )

    def resolve_state_dir(self, run: RunConfig) -> Path:
        """Return the directory where this site keeps its own state (privacy ledger).

        Deployment: node config ``state-dir``. Simulation: ``<sites-dir>/../state/
        site-<partition-id>``, one folder per virtual site.

        Raises
        ------
        ConfigError
            When neither is available.
        """
        if self.state_dir is not None:
            return self.state_dir
        if run.paths.sites_dir and self.partition_id is not None:
            return Path(run.paths.sites_dir).parent / "state" / f"site-{self.partition_id}"
        raise ConfigError(
            "this node has no state directory: set node config 'state-dir' (e.g. "
            "flower-supernode --node-config \"state-dir='/var/lib/medfed'\")."
        )

    def resolve_dataset_dir(self, run: RunConfig) -> Path:
        """Return the site dataset directory for this node.

        Raises
        ------
        ConfigError
            When neither ``dataset-dir`` (node config) nor ``sites-dir`` (run config)
            with a ``partition-id`` tells where the data is.

        """
        if self.dataset_dir is not None:
            return self.dataset_dir
        if run.paths.sites_dir and self.partition_id is not None:
            return Path(run.paths.sites_dir) / f"site-{self.partition_id}"
        raise ConfigError(
            "this node has no data: set node config 'dataset-dir' (deployment, e.g. "
            "flower-supernode --node-config \"dataset-dir='/data/site'\") or run config "
            "'sites-dir' (simulation)."
        )


def read_toml_file(path: Path, *, name: str, max_bytes: int, hint: str) -> dict[str, Any]:
    """Read a small TOML file a user names, with a clear error for every way it can fail.

    Parameters
    ----------
    path : pathlib.Path
        The file.
    name : str
        How the messages call it (e.g. ``"--config"``, ``"site policy file"``).
    max_bytes : int
        Largest accepted size, checked before reading.
    hint : str
        What to do instead, appended to the messages (e.g. how to write a default).

    Returns
    -------
    dict[str, Any]
        The parsed TOML document (``tomllib``).

    Raises
    ------
    ConfigError
        If the file does not exist, cannot be read, is not a regular file, is larger
        than ``max_bytes``, is not UTF-8 text or is not valid TOML.

    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{name} {path}: no such file; {hint}.") from None
    except OSError as exc:
        raise ConfigError(f"{name} {path}: cannot read it ({exc.strerror}).") from None
    if not path.is_file():
        raise ConfigError(f"{name} {path} is not a regular file; {hint}.")
    if st.st_size > max_bytes:
        raise ConfigError(
            f"{name} {path} is {st.st_size} bytes, above the {max_bytes} byte limit; "
            "is it the right file?"
        )
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{name} {path} is not UTF-8 text; {hint}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name} {path} is not valid TOML: {exc}. Fix that line.") from None
    except OSError as exc:
        raise ConfigError(f"{name} {path}: cannot read it ({exc.strerror}).") from None


def flatten_tables(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as dotted run-config keys.

    ``{"dp": {"enabled": False}}`` -> ``{"dp.enabled": False}`` (TOML reads the dotted key
    ``dp.enabled = false`` as that nested table, TOML 1.0 "Keys").
    """
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out |= flatten_tables(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_config_file(path: Path, *, option: str = "--config") -> dict[str, Any]:
    """Read a TOML file of run-config keys given on the command line.

    Parameters
    ----------
    path : pathlib.Path
        The file named by ``option``.
    option : str
        The command-line option, for the messages.

    Returns
    -------
    dict[str, Any]
        The parsed TOML document (keys are validated later by :class:`RunConfig`).

    Raises
    ------
    ConfigError
        As :func:`read_toml_file`, with at most :data:`MAX_CONFIG_FILE_BYTES`.

    """
    return read_toml_file(
        path,
        name=option,
        max_bytes=MAX_CONFIG_FILE_BYTES,
        hint="pass a TOML file of run-config keys (e.g. a file with the line  local-epochs = 2)",
    )


def check_writable_dir(
    path: Path, *, what: str = "run directory", option: str = "--run-dir"
) -> None:
    """Check that ``path`` is, or can be created as, a directory this process can write.

    Nothing is created: the check probes ``path`` itself when it exists, else its nearest
    existing ancestor, with a temporary file that is deleted at once (so file modes,
    ACLs, read-only mounts and a regular file in the way are all caught, also as root).

    Parameters
    ----------
    path : pathlib.Path
        The directory the command will write.
    what, option : str
        How the messages name it.

    Raises
    ------
    ConfigError
        If ``path`` or an ancestor is a regular file (or a broken link), or the
        directory that would hold the output is not writable.

    """
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise ConfigError(
                f"{what} {path} cannot be created: {probe} is a broken symbolic link; "
                f"remove it or choose another {option}."
            )
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"{what} {path} cannot be created: {probe} is not a directory; choose another {option}."
        )
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{what} {path} is not writable ({probe}: {exc.strerror}); choose a folder you "
            f"can write to with {option}, or fix its permissions. Nothing was started."
        ) from None
