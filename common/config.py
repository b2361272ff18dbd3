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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError, did_you_mean

ConfigScalar = bool | int | float | str | bytes
Check = Callable[[Any], str | None]


def _key(name: str, help_: str, check: Check | None = None) -> dict[str, Any]:
    return {"key": name, "help": help_, "check": check}


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _fraction(v: Any) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


def _unit_interval_open(v: Any) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


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


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Federation-wide settings chosen by the coordinator or researcher.

    Construct with :meth:`from_run_config`; direct construction also validates.

    Raises
    ------
    ConfigError
        On unknown keys (with a "did you mean"), wrong types or out-of-range values.

    """

    task: str = field(
        default="classification",
        metadata=_key("task", "learning task of the site datasets", _one_of(*TASKS)),
    )
    model: str = field(default="cnn", metadata=_key("model", "registered model name"))
    num_classes: int = field(
        default=2,
        metadata=_key(
            "num-classes",
            "classes the model predicts (segmentation: incl. background; 2 = background/vessel)",
            _positive,
        ),
    )
    strategy: str = field(
        default="fedavg",
        metadata=_key("strategy", "aggregation strategy", _one_of(*STRATEGIES)),
    )
    num_server_rounds: int = field(
        default=10, metadata=_key("num-server-rounds", "federated rounds", _positive)
    )
    local_epochs: int = field(
        default=1, metadata=_key("local-epochs", "local epochs per round", _positive)
    )
    batch_size: int = field(
        default=32, metadata=_key("batch-size", "local (logical) batch size", _positive)
    )
    learning_rate: float = field(
        default=0.05, metadata=_key("learning-rate", "local SGD learning rate", _positive)
    )
    momentum: float = field(
        default=0.9, metadata=_key("momentum", "local SGD momentum", _unit_interval_open)
    )
    weight_decay: float = field(
        default=0.0, metadata=_key("weight-decay", "local SGD L2 penalty", _non_negative)
    )
    seed: int = field(default=42, metadata=_key("seed", "seed for model init and sampling"))
    amp: bool = field(
        default=False,
        metadata=_key(
            "amp",
            "mixed precision (bfloat16 autocast) for local training; only with dp.enabled=false",
        ),
    )
    evaluate_in_train: bool = field(
        default=True,
        metadata=_key(
            "evaluate-in-train",
            "sites evaluate the received global model on their validation split inside the "
            "train message (no separate evaluate exchange per round); the evaluate message "
            "then runs only for the final model",
        ),
    )
    min_sites: int = field(
        default=3, metadata=_key("min-sites", "sites that must connect before round 1", _positive)
    )
    fraction_train: float = field(
        default=1.0, metadata=_key("fraction-train", "fraction of sites per train round", _fraction)
    )
    fraction_evaluate: float = field(
        default=1.0,
        metadata=_key("fraction-evaluate", "fraction of sites per evaluate round", _fraction),
    )
    connect_timeout: float = field(
        default=120.0,
        metadata=_key("connect-timeout", "seconds to wait for min-sites to connect", _positive),
    )
    round_timeout: float = field(
        default=300.0,
        metadata=_key("round-timeout", "seconds a round waits for site replies", _positive),
    )
    min_replies: int = field(
        default=1,
        metadata=_key(
            "min-replies",
            "quorum: sites that must reply for a round to aggregate (else the run fails)",
            _positive,
        ),
    )
    project: str = field(
        default="medfed-demo",
        metadata=_key("project", "study name; keys each site's privacy ledger"),
    )
    dp_enabled: bool = field(
        default=True, metadata=_key("dp.enabled", "DP-SGD (Opacus) at every site")
    )
    dp_target_epsilon: float = field(
        default=8.0,
        metadata=_key(
            "dp.target-epsilon", "epsilon each site reaches after all planned rounds", _positive
        ),
    )
    dp_noise_multiplier: float = field(
        default=0.0,
        metadata=_key(
            "dp.noise-multiplier", "fixed noise multiplier; 0 = derive from target", _non_negative
        ),
    )
    dp_max_grad_norm: float = field(
        default=1.0,
        metadata=_key("dp.max-grad-norm", "per-sample gradient clipping norm C", _positive),
    )
    dp_accountant: str = field(
        default="rdp",
        metadata=_key("dp.accountant", "Opacus accountant", _one_of(*ACCOUNTANTS)),
    )
    dp_reproducible_noise: bool = field(
        default=False,
        metadata=_key(
            "dp.reproducible-noise",
            "simulation only, NOT PRIVATE: seed DP noise and sampling from 'seed' so a run "
            "repeats exactly; refused by every site outside simulation",
        ),
    )
    dp_max_physical_batch_size: int = field(
        default=128,
        metadata=_key(
            "dp.max-physical-batch-size", "memory cap per forward/backward pass", _positive
        ),
    )
    secagg_enabled: bool = field(
        default=True,
        metadata=_key("secagg.enabled", "secure aggregation: the server sees only the sum"),
    )
    secagg_neighbours: int = field(
        default=0,
        metadata=_key(
            "secagg.neighbours", "neighbours per site in SecAgg+; 0 = all", _non_negative
        ),
    )
    secagg_threshold: float = field(
        default=0.5,
        metadata=_key(
            "secagg.threshold",
            "fraction of a neighbourhood (> it) needed to unmask",
            lambda v: None if 0.5 <= v < 1.0 else "must be in [0.5, 1)",
        ),
    )
    secagg_clip_range: float = field(
        default=4.0,
        metadata=_key("secagg.clip-range", "largest |weight change| per round", _positive),
    )
    secagg_quantisation: str = field(
        default="deterministic",
        metadata=_key(
            "secagg.quantisation",
            "fixed-point rounding",
            _one_of("deterministic", "stochastic"),
        ),
    )
    strategy_proximal_mu: float = field(
        default=0.01,
        metadata=_key(
            "strategy-args.proximal-mu", "FedProx: weight mu of the proximal term", _non_negative
        ),
    )
    strategy_server_lr: float = field(
        default=0.1,
        metadata=_key(
            "strategy-args.server-lr", "FedAdam/FedYogi: server learning rate", _positive
        ),
    )
    strategy_trim_beta: float = field(
        default=0.2,
        metadata=_key(
            "strategy-args.trim-beta",
            "FedTrimmedAvg: fraction cut from each end",
            lambda v: None if 0.0 <= v < 0.5 else "must be in [0, 0.5)",
        ),
    )
    strategy_krum_byzantine: int = field(
        default=0,
        metadata=_key(
            "strategy-args.krum-byzantine",
            "Krum: number of malicious sites tolerated",
            _non_negative,
        ),
    )
    faults_dropout: float = field(
        default=0.0,
        metadata=_key(
            "faults.dropout",
            "simulation only: probability a site drops out of a round",
            _unit_interval_open,
        ),
    )
    faults_slow_site: int = field(
        default=-1,
        metadata=_key("faults.slow-site", "simulation only: partition-id of a slow site; -1 none"),
    )
    faults_slow_seconds: float = field(
        default=0.0,
        metadata=_key(
            "faults.slow-seconds", "simulation only: extra seconds per round", _non_negative
        ),
    )
    faults_crash_site: int = field(
        default=-1,
        metadata=_key(
            "faults.crash-site", "simulation only: partition-id of a site that crashes; -1 none"
        ),
    )
    faults_crash_round: int = field(
        default=1,
        metadata=_key(
            "faults.crash-round", "simulation only: round from which it crashes", _positive
        ),
    )
    run_dir: str = field(
        default="", metadata=_key("run-dir", "where the server writes logs and checkpoints")
    )
    sites_dir: str = field(
        default="",
        metadata=_key("sites-dir", "simulation only: folder of site-<partition-id> datasets"),
    )
    eval_dataset_dir: str = field(
        default="",
        metadata=_key("eval-dataset-dir", "optional server-side held-out site dataset"),
    )
    site_policy: str = field(
        default="",
        metadata=_key(
            "site-policy",
            "simulation only: site policy TOML every virtual site applies (a real site "
            "uses its own worker's policy and ignores this key)",
        ),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _coerce(f.metadata["key"], getattr(self, f.name), _field_type(f))
            object.__setattr__(self, f.name, value)
            check = f.metadata["check"]
            if check is not None and (problem := check(value)) is not None:
                raise ConfigError(f"config key {f.metadata['key']!r}={value!r} {problem}")
        if self.fraction_train == 0.0:
            raise ConfigError("config key 'fraction-train' must be > 0: no site would train.")
        if self.amp and self.dp_enabled:
            raise ConfigError(
                "config key 'amp'=true needs 'dp.enabled'=false: per-sample gradient clipping "
                "under reduced precision is not validated in medfed; turn one of them off."
            )
        if self.min_replies > self.min_sites:
            raise ConfigError(
                f"config key 'min-replies'={self.min_replies} exceeds 'min-sites'="
                f"{self.min_sites}: no round could reach the quorum; lower 'min-replies'."
            )
        if self.strategy == "scaffold" and (self.dp_enabled or self.secagg_enabled):
            raise ConfigError(
                "config key 'strategy'='scaffold' needs 'dp.enabled'=false and "
                "'secagg.enabled'=false: Opacus overwrites the gradient the drift correction "
                "is added to, and each site's control-variate delta would leave unmasked."
            )
        if self.strategy == "scaffold" and self.momentum != 0.0:
            raise ConfigError(
                "config key 'strategy'='scaffold' needs plain local SGD ('momentum'=0): its "
                "control-variate update (x - y) / (K * learning-rate) assumes it "
                "(Karimireddy et al. 2020, option II); set momentum=0."
            )
        if self.strategy == "fedprox" and self.dp_enabled:
            raise ConfigError(
                "config key 'strategy'='fedprox' with 'dp.enabled'=true is not supported: "
                "Opacus privatises only the per-sample gradients, so the proximal term's "
                "gradient would be silently dropped; set dp.enabled=false for FedProx."
            )
        if self.secagg_enabled and self.strategy in NONLINEAR_STRATEGIES:
            raise ConfigError(
                f"config key 'strategy'={self.strategy!r} aggregates each site's update "
                "non-linearly (median / trimmed mean / Krum), but 'secagg.enabled'=true lets "
                "the server see only the sum of updates; set secagg.enabled=false for this "
                "strategy (the sites' updates are then visible to the coordinator) or use a "
                "weighted-mean strategy (fedavg, fedprox, fedadam, fedyogi)."
            )
        # Validate the model name here so a typo fails before any round starts.
        from common.models import check_model_name

        check_model_name(self.model)

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Map every config key to its one-line help."""
        return {f.metadata["key"]: f.metadata["help"] for f in dataclasses.fields(cls)}

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
        by_key = {f.metadata["key"]: f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in by_key:
                raise ConfigError(
                    f"unknown config key {key!r}.{did_you_mean(key, by_key)} "
                    f"Valid keys: {sorted(by_key)}."
                )
            kwargs[by_key[key]] = value
        return cls(**kwargs)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`common.models.get_model` derived from this config."""
        return {"num_classes": self.num_classes}

    def to_run_config(self) -> dict[str, ConfigScalar]:
        """Return the flat kebab-case dictionary (inverse of :meth:`from_run_config`)."""
        return {f.metadata["key"]: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        """Return a copy with fields (snake_case names) replaced and re-validated."""
        return dataclasses.replace(self, **changes)


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
        if run.sites_dir and self.partition_id is not None:
            return Path(run.sites_dir).parent / "state" / f"site-{self.partition_id}"
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
        if run.sites_dir and self.partition_id is not None:
            return Path(run.sites_dir) / f"site-{self.partition_id}"
        raise ConfigError(
            "this node has no data: set node config 'dataset-dir' (deployment, e.g. "
            "flower-supernode --node-config \"dataset-dir='/data/site'\") or run config "
            "'sites-dir' (simulation)."
        )
