"""The site policy: one TOML file the hospital owns that bounds what a coordinator may ask.

The site worker (``medfed site serve --policy FILE``) reads the policy once at start and
checks every request against it **before any work** (issue 12, item 3; DESIGN section 5).
A request outside it raises :class:`PolicyRefusal` whose :attr:`~PolicyRefusal.rule` is
the kebab-case name of the key it broke (``require-dp``, ``max-rounds``...): the error
reply that leaves the site carries only that name (:func:`common.replies.fixed_reason`);
the message with the values goes to the site's own log and audit log.

File layout (every key optional; an absent key takes the default shown)::

    version = 1

    [privacy]
    max-epsilon = 10.0            # cumulative epsilon ceiling per dataset
    # delta = 1e-05               # absent: 0.1 / N for N training patients
    min-noise-multiplier = 0.5    # floor on the DP-SGD noise multiplier sigma
    max-grad-norm-min = 0.1       # bounds for the clipping norm dp.max-grad-norm
    max-grad-norm-max = 10.0
    require-dp = true             # refuse runs with dp.enabled = false

    [secure-aggregation]
    require-secagg = true         # refuse runs with secagg.enabled = false
    min-secagg-sites = 3          # fewest sites in one secure aggregate

    [training]
    allowed-models = ["cnn", ...] # default: every registered model
    allowed-tasks = ["classification", "segmentation", "tabular"]
    allowed-projects = ["*"]      # "*": any project name
    max-rounds = 100              # num-server-rounds per run
    max-local-epochs = 5          # local-epochs per round

    [evaluation]
    max-evaluations-per-run = 50  # evaluate messages answered per run
    min-eval-images = 20          # fewest validation images an evaluation may use

    [egress]
    allowed-metrics = [...]       # reply metric names that may leave the site
    metric-decimals = 3           # decimals every reported float is rounded to

One rule is not configurable: ``dp.reproducible-noise`` (DP noise seeded from the run
config, so the coordinator could regenerate and subtract it) is always refused outside
simulation, under the rule name ``require-secret-noise``.

:func:`write_default_policy` writes this file with a comment per key saying what it
protects against (``medfed site policy init``). Imports neither torch nor flwr.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import numbers
import os
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import TASKS, RunConfig, read_toml_file
from common.errors import ConfigError, MedfedError, did_you_mean
from common.models import list_models
from common.replies import ReplyCode, fixed_reason

__all__ = [
    "MESSAGE_TYPES",
    "POLICY_VERSION",
    "RULES",
    "RULE_MESSAGE_TYPE",
    "RULE_SECRET_NOISE",
    "SECTIONS",
    "STANDARD_METRICS",
    "PolicyFileExistsError",
    "PolicyRefusal",
    "SitePolicy",
    "write_default_policy",
]

log = logging.getLogger(__name__)

#: Format version of the policy file (top-level ``version`` key).
POLICY_VERSION = 1
#: Largest policy file read (bytes); a policy is a few kilobytes.
MAX_POLICY_BYTES = 1 << 20
#: TOML tables of the policy file, in the order they are written.
SECTIONS = ("privacy", "secure-aggregation", "training", "evaluation", "egress")
#: Rule of the one check that is not configurable: noise seeded from the run config.
RULE_SECRET_NOISE = "require-secret-noise"
#: Rule for a message type outside the site API.
RULE_MESSAGE_TYPE = "message-type"
#: Flower message categories a site answers (``"train"`` or ``"train.<action>"``...).
MESSAGE_TYPES = ("train", "evaluate", "query")

#: Metric names medfed's sites report (client/site/handlers.py, client/app.py):
#: training statistics, the cumulative privacy spend, and local validation metrics
#: (``val-`` + the keys of :meth:`common.tasks.Task.evaluate`).
STANDARD_METRICS: tuple[str, ...] = (
    # train replies
    "num-examples",
    "train-loss",
    "train-steps",
    "train-seconds",
    # DP-SGD: cumulative epsilon at the site's delta, and the noise multiplier used
    "epsilon",
    "delta",
    "dp-noise-multiplier",
    # evaluate replies (and local evaluation folded into train replies, with the count
    # of validation images behind it: the weight of the federated mean)
    "val-num-examples",
    "val-loss",
    # classification and tabular (common.metrics.classification_metrics)
    "val-accuracy",
    "val-balanced-accuracy",
    "val-auroc",
    "val-sensitivity",
    "val-specificity",
    "val-f1",
    # segmentation (common.metrics.segmentation_metrics; per-class val-dice-<c> only with
    # more than one foreground class: add those names to allow them)
    "val-dice",
    "val-pixel-accuracy",
    # simulation only: the delay client/faults.py injects at a slow virtual site
    "fault-delay-seconds",
)

#: What a metric, project-independent rule or metric name may look like (same vocabulary
#: as :func:`common.replies.fixed_reason`): it is safe to put in an error reply.
_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{0,63}$")
#: Most decimals a reported metric may keep: more digits are more bits per metric that a
#: crafted model could read out of the validation images.
_MAX_DECIMALS = 6

Check = Callable[[Any], str | None]


# ----------------------------------------------------------------------------- checks
def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _at_least(n: int) -> Check:
    def check(v: Any) -> str | None:
        return None if v >= n else f"must be >= {n}"

    return check


def _open_unit(v: Any) -> str | None:
    if v is None or 0.0 < v < 1.0:
        return None
    return "must be in (0, 1); remove the key to use 0.1 / N for N training patients"


def _decimals(v: Any) -> str | None:
    if 0 <= v <= _MAX_DECIMALS:
        return None
    return (
        f"must be in [0, {_MAX_DECIMALS}]: each extra decimal is more bits per metric a "
        "crafted model could read out of the validation images"
    )


def _names_in(choices: Callable[[], Iterable[str]], what: str) -> Check:
    def check(names: Any) -> str | None:
        valid = sorted(choices())
        for name in names:
            if name not in valid:
                return (
                    f"names unknown {what} {name!r}.{did_you_mean(name, valid)} "
                    f"Known {what}s: {valid}"
                )
        return None

    return check


def _vocabulary(names: Any) -> str | None:
    for name in names:
        if not _NAME.match(name):
            return (
                f"holds {name!r}: a metric name is lower-case letters, digits, '.' and '-' "
                "(at most 64 characters)"
            )
    if "num-examples" not in names:
        return (
            "must include 'num-examples': the coordinator weights every update by it, so a "
            "reply without it cannot be aggregated"
        )
    return None


def _projects(names: Any) -> str | None:
    if "*" in names and len(names) > 1:
        return "mixes '*' (any project) with project names; write either ['*'] or the names"
    for name in names:
        if not name.strip():
            return "holds an empty project name"
    return None


def _meta(
    key: str, section: str, kind: str, help_: str, check: Check | None = None
) -> dict[str, Any]:
    return {"key": key, "section": section, "kind": kind, "help": help_, "check": check}


def _default_models() -> tuple[str, ...]:
    return tuple(list_models())


# ----------------------------------------------------------------------------- errors
class PolicyRefusal(MedfedError, PermissionError):  # noqa: N818 (a refusal, not a bug)
    """A request is outside the site policy; nothing was done.

    Parameters
    ----------
    message : str
        What was asked and what the policy allows, for the site's own log (may hold
        values; never sent to the coordinator).
    rule : str
        The kebab-case name of the rule it broke (a policy key such as ``require-dp``,
        or :data:`RULE_SECRET_NOISE`); the only part of the refusal that leaves the site.

    Raises
    ------
    ValueError
        If ``rule`` is not a vocabulary name (it could carry a value out of the site).
    """

    def __init__(self, message: str, *, rule: str) -> None:
        fixed_reason(ReplyCode.POLICY, rule)  # raises ValueError if not a vocabulary name
        super().__init__(message)
        self.rule = rule

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_refusal, (str(self), self.rule))

    @property
    def reply_reason(self) -> str:
        """The fixed reason an error reply may carry: fixed text and the rule name."""
        return fixed_reason(ReplyCode.POLICY, self.rule)


def _rebuild_refusal(message: str, rule: str) -> PolicyRefusal:
    return PolicyRefusal(message, rule=rule)


def _bound(key: str, value: float, rule: str, limit: float) -> None:
    """Refuse run-config ``key``'s ``value`` beyond the site's ``rule`` (``-min`` or ``max-``)."""
    below = rule.endswith("-min")
    if value < limit if below else value > limit:
        side = "below" if below else "above"
        raise PolicyRefusal(
            f"{key}={_num(value)} is {side} this site's {rule}={_num(limit)}", rule=rule
        )


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _member(what: str, value: str, rule: str, allowed: tuple[str, ...]) -> None:
    """Refuse a ``value`` that is not in the site's ``rule`` list (e.g. ``allowed-models``)."""
    if value not in allowed:
        raise PolicyRefusal(
            f"{what} {value!r} is not in this site's {rule} {list(allowed)}", rule=rule
        )


class PolicyFileExistsError(MedfedError, FileExistsError):
    """``medfed site policy init`` found something at the path; it never overwrites."""


# ----------------------------------------------------------------------------- policy
@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    """What this hospital allows any coordinator to ask of its site.

    Read by the site worker from a TOML file the hospital owns (:meth:`load`); every
    request is checked against it before any work. Construct with :meth:`load`,
    :meth:`default` or :meth:`from_dict`; direct construction (snake_case names) also
    validates.

    Attributes
    ----------
    max_epsilon : float
        ``[privacy] max-epsilon``, default 10.0: the ceiling on cumulative epsilon per
        dataset over all runs and projects; a round that would pass it is refused.
    delta : float or None
        ``[privacy] delta`` in (0, 1); absent (None): ``0.1 / N`` for ``N`` training
        patients (:meth:`delta_for`).
    min_noise_multiplier : float
        ``[privacy] min-noise-multiplier``, default 0.5: the lowest DP-SGD noise
        multiplier sigma (noise std / clipping norm) the site trains with, whether fixed
        by ``dp.noise-multiplier`` or derived from ``dp.target-epsilon``.
    max_grad_norm_min, max_grad_norm_max : float
        ``[privacy] max-grad-norm-min`` / ``max-grad-norm-max``, defaults 0.1 and 10.0:
        bounds for the per-sample clipping norm ``dp.max-grad-norm``.
    require_dp : bool
        ``[privacy] require-dp``, default true: refuse runs with ``dp.enabled = false``.
    require_secagg : bool
        ``[secure-aggregation] require-secagg``, default true: refuse runs with
        ``secagg.enabled = false``.
    min_secagg_sites : int
        ``[secure-aggregation] min-secagg-sites``, default 3 (>= 2): the fewest sites in
        one secure aggregate; fewer and the sum is close to this site's own update.
    allowed_models : tuple[str, ...]
        ``[training] allowed-models``, default every registered model
        (:func:`common.models.list_models`).
    allowed_tasks : tuple[str, ...]
        ``[training] allowed-tasks``, default every task (``common.config.TASKS``).
    allowed_projects : tuple[str, ...]
        ``[training] allowed-projects``, default ``("*",)``: any project name.
    max_rounds : int
        ``[training] max-rounds``, default 100: the largest ``num-server-rounds``.
    max_local_epochs : int
        ``[training] max-local-epochs``, default 5: the largest ``local-epochs``.
    max_evaluations_per_run : int
        ``[evaluation] max-evaluations-per-run``, default 50 (0 = never evaluate).
    min_eval_images : int
        ``[evaluation] min-eval-images``, default 20: the fewest validation images an
        evaluation may score.
    allowed_metrics : tuple[str, ...]
        ``[egress] allowed-metrics``, default :data:`STANDARD_METRICS`: the metric names
        a reply may carry; must include ``num-examples``.
    metric_decimals : int
        ``[egress] metric-decimals``, default 3, in [0, 6]: decimals every reported float
        metric is rounded to (:meth:`round_metrics`).

    Name lists are stored sorted and without duplicates, so two files that allow the
    same things compare equal and have the same :meth:`digest`.

    Raises
    ------
    ConfigError
        On a wrong type or an out-of-range value, naming the key, the rule and the fix.
    """

    max_epsilon: float = field(
        default=10.0,
        metadata=_meta(
            "max-epsilon",
            "privacy",
            "float",
            "Ceiling on cumulative epsilon per dataset, over every run and project: stops a "
            "coordinator from spending the patients' privacy budget one study at a time.",
            _positive,
        ),
    )
    delta: float | None = field(
        default=None,
        metadata=_meta(
            "delta",
            "privacy",
            "optional-float",
            "DP delta in (0, 1); leave it out for 0.1 / N (N training patients), which keeps "
            "it below 1 / N so no single patient's record can be released outright.",
            _open_unit,
        ),
    )
    min_noise_multiplier: float = field(
        default=0.5,
        metadata=_meta(
            "min-noise-multiplier",
            "privacy",
            "float",
            "Floor on the DP-SGD noise multiplier (fixed or derived from the target "
            "epsilon): stops a coordinator from asking for weak noise in few steps.",
            _non_negative,
        ),
    )
    max_grad_norm_min: float = field(
        default=0.1,
        metadata=_meta(
            "max-grad-norm-min",
            "privacy",
            "float",
            "Smallest per-sample clipping norm dp.max-grad-norm the site accepts: stops "
            "degenerate clipping that wastes the privacy budget on no learning.",
            _positive,
        ),
    )
    max_grad_norm_max: float = field(
        default=10.0,
        metadata=_meta(
            "max-grad-norm-max",
            "privacy",
            "float",
            "Largest per-sample clipping norm dp.max-grad-norm the site accepts: stops a "
            "coordinator from effectively switching clipping off.",
            _positive,
        ),
    )
    require_dp: bool = field(
        default=True,
        metadata=_meta(
            "require-dp",
            "privacy",
            "bool",
            "Refuse runs with dp.enabled = false: without DP-SGD a model update can leak "
            "individual patients' images.",
        ),
    )
    require_secagg: bool = field(
        default=True,
        metadata=_meta(
            "require-secagg",
            "secure-aggregation",
            "bool",
            "Refuse runs with secagg.enabled = false: without secure aggregation the "
            "coordinator sees this site's own update, not only the sum over sites.",
        ),
    )
    min_secagg_sites: int = field(
        default=3,
        metadata=_meta(
            "min-secagg-sites",
            "secure-aggregation",
            "int",
            "Fewest sites in one secure aggregate: with too few, the sum the coordinator "
            "learns is close to this site's own update.",
            _at_least(2),
        ),
    )
    allowed_models: tuple[str, ...] = field(
        default_factory=_default_models,
        metadata=_meta(
            "allowed-models",
            "training",
            "names",
            "Model architectures the site trains and evaluates: stops a coordinator from "
            "choosing an architecture the hospital has not reviewed.",
            _names_in(list_models, "model"),
        ),
    )
    allowed_tasks: tuple[str, ...] = field(
        default=TASKS,
        metadata=_meta(
            "allowed-tasks",
            "training",
            "names",
            "Learning tasks the site takes part in (classification, segmentation, tabular).",
            _names_in(lambda: TASKS, "task"),
        ),
    )
    allowed_projects: tuple[str, ...] = field(
        default=("*",),
        metadata=_meta(
            "allowed-projects",
            "training",
            "names",
            'Studies (run config "project") the site has agreed to join; ["*"] = any: '
            "list names to stop unapproved studies using the data.",
            _projects,
        ),
    )
    max_rounds: int = field(
        default=100,
        metadata=_meta(
            "max-rounds",
            "training",
            "int",
            "Largest num-server-rounds per run: bounds how long a coordinator may keep "
            "training on (and querying) the site's data in one run.",
            _positive,
        ),
    )
    max_local_epochs: int = field(
        default=5,
        metadata=_meta(
            "max-local-epochs",
            "training",
            "int",
            "Largest local-epochs per round: bounds the compute and the privacy spend one "
            "round may ask for.",
            _positive,
        ),
    )
    max_evaluations_per_run: int = field(
        default=50,
        metadata=_meta(
            "max-evaluations-per-run",
            "evaluation",
            "int",
            "Evaluate messages answered per run (0 = never): evaluating crafted models "
            "without limit can read the validation images out bit by bit.",
            _non_negative,
        ),
    )
    min_eval_images: int = field(
        default=20,
        metadata=_meta(
            "min-eval-images",
            "evaluation",
            "int",
            "Fewest validation images an evaluation may score: a metric over a handful of "
            "images describes those patients rather than the model.",
            _positive,
        ),
    )
    allowed_metrics: tuple[str, ...] = field(
        default=STANDARD_METRICS,
        metadata=_meta(
            "allowed-metrics",
            "egress",
            "names",
            "Metric names a reply may carry (must include num-examples): anything else "
            "is refused, so no new channel out of the site opens without the hospital.",
            _vocabulary,
        ),
    )
    metric_decimals: int = field(
        default=3,
        metadata=_meta(
            "metric-decimals",
            "egress",
            "int",
            f"Decimals every reported metric is rounded to (0 to {_MAX_DECIMALS}): fewer "
            "digits, fewer bits a crafted model can smuggle out per reply.",
            _decimals,
        ),
    )

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            meta = f.metadata
            value = _coerce(meta["key"], meta["section"], meta["kind"], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            check = meta["check"]
            if check is not None and (problem := check(value)) is not None:
                raise ConfigError(_where(meta["key"], meta["section"], value, problem))
        if self.max_grad_norm_min > self.max_grad_norm_max:
            raise ConfigError(
                f"site policy key 'max-grad-norm-min'={self.max_grad_norm_min:g} ([privacy]) "
                f"is above 'max-grad-norm-max'={self.max_grad_norm_max:g}: no clipping norm "
                "could pass; make the minimum <= the maximum."
            )

    @classmethod
    def default(cls) -> SitePolicy:
        """Return the default policy (the file ``medfed site policy init`` writes)."""
        return cls()

    @classmethod
    def key_help(cls) -> dict[str, tuple[str, str]]:
        """Map every policy key to ``(section, one-line help)``."""
        return {
            f.metadata["key"]: (f.metadata["section"], f.metadata["help"])
            for f in dataclasses.fields(cls)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SitePolicy:
        """Build a policy from parsed TOML (or :meth:`to_dict` output).

        Parameters
        ----------
        data : Mapping[str, Any]
            Top-level ``version`` and the tables of :data:`SECTIONS`, each mapping
            kebab-case keys to values. Absent keys take their defaults.

        Returns
        -------
        SitePolicy
            The validated policy (frozen).

        Raises
        ------
        ConfigError
            An unknown table or key (with a "did you mean"), a key in the wrong table, an
            unsupported ``version``, or a wrong type or value.
        """
        fields = {f.metadata["key"]: f for f in dataclasses.fields(cls)}
        known = [*fields, *SECTIONS, "version"]
        kwargs: dict[str, Any] = {}
        given: set[str] = set()
        for name, value in data.items():
            if name == "version":
                if isinstance(value, bool) or value != POLICY_VERSION:
                    raise ConfigError(
                        f"site policy 'version'={value!r} is not supported: this medfed reads "
                        f"version {POLICY_VERSION}; write `version = {POLICY_VERSION}` or "
                        "upgrade medfed."
                    )
            elif name in SECTIONS:
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        f"site policy '{name}' must be a table: write it as a [{name}] header "
                        "followed by its keys."
                    )
                for key, v in value.items():
                    f = fields.get(key)
                    if f is None:
                        raise ConfigError(
                            f"unknown site policy key {key!r} in [{name}]."
                            f"{did_you_mean(key, fields)} Valid keys: {sorted(fields)}."
                        )
                    if f.metadata["section"] != name:
                        raise ConfigError(
                            f"site policy key {key!r} belongs in [{f.metadata['section']}], "
                            f"not [{name}]; move it under that header."
                        )
                    kwargs[f.name] = v
                    given.add(key)
            elif name in fields:
                raise ConfigError(
                    f"site policy key {name!r} must be in the [{fields[name].metadata['section']}]"
                    " table, not at the top of the file; move it under that header."
                )
            else:
                raise ConfigError(
                    f"unknown site policy table or key {name!r}.{did_you_mean(name, known)} "
                    f"Valid tables: {list(SECTIONS)}."
                )
        defaulted = sorted(set(fields) - given)
        if defaulted:
            log.debug("site policy keys absent from the file take their defaults: %s", defaulted)
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SitePolicy:
        """Read and validate the site policy file.

        Parameters
        ----------
        path : str or os.PathLike
            The TOML file (at most 1 MiB, UTF-8).

        Returns
        -------
        SitePolicy
            The file's policy, validated as :meth:`from_dict` does.

        Raises
        ------
        ConfigError
            The file is missing, not a regular file, too large, not UTF-8 TOML, or holds
            an unknown key (with a "did you mean"), a key in the wrong table, or a wrong
            type or value; the message names the file, the key, the rule and the fix.
        """
        p = Path(path)
        data = read_toml_file(
            p,
            name="site policy file",
            max_bytes=MAX_POLICY_BYTES,
            hint=f"write a commented default with `medfed site policy init {p}` and edit it",
        )
        try:
            policy = cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        log.debug("site policy %s loaded (digest %s)", p, policy.digest()[:16])
        return policy

    # ------------------------------------------------------------------ display
    def to_dict(self) -> dict[str, Any]:
        """Return ``{"version": 1, section: {key: value}}`` (lists for name tuples)."""
        out: dict[str, Any] = {"version": POLICY_VERSION}
        for section in SECTIONS:
            out[section] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.metadata["section"]][f.metadata["key"]] = (
                list(value) if isinstance(value, tuple) else value
            )
        return out

    def digest(self) -> str:
        """Return the SHA-256 (hex) of the canonical form, for the audit log.

        The canonical form is :meth:`to_dict` as JSON with sorted keys and no
        whitespace; name lists are sorted, so equal policies have equal digests
        whatever their files' layout, comments or order.
        """
        canonical = json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_toml(self) -> str:
        """Render this policy as a commented TOML file (one comment per key).

        Returns
        -------
        str
            Text that :meth:`load` reads back to an equal policy.
        """
        lines = [_HEADER.rstrip("\n"), "", f"version = {POLICY_VERSION}"]
        for section in SECTIONS:
            lines += ["", f"[{section}]", *_comment(_SECTION_HELP[section])]
            for f in dataclasses.fields(self):
                if f.metadata["section"] != section:
                    continue
                lines += ["", *_comment(f.metadata["help"])]
                key, value = f.metadata["key"], getattr(self, f.name)
                if value is None:
                    lines.append(f"# {key} = 1e-05")
                else:
                    lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ checks
    def check_run(self, run: RunConfig, *, message_type: str, simulated: bool = False) -> None:
        """Refuse a run config outside the policy, before any work on a message.

        Applies to every message of the run (train, evaluate, query): a run the site
        would not train for gets nothing from it, not even an evaluation. Checks, in
        order: secret noise, ``require-dp``, ``min-noise-multiplier`` (a fixed
        ``dp.noise-multiplier``), ``max-grad-norm-min`` / ``-max``, ``require-secagg``,
        ``allowed-models``, ``allowed-tasks``, ``allowed-projects``, ``max-rounds``,
        ``max-local-epochs``. A derived noise multiplier is checked later, with
        :meth:`check_noise_multiplier`, once the site has planned the round.

        Parameters
        ----------
        run : RunConfig
            The coordinator's run config, parsed.
        message_type : str
            Flower's ``message_type``: ``train``, ``evaluate`` or ``query``, optionally
            with an action (``train.secagg``).
        simulated : bool
            True only for a virtual site that medfed's simulation runs in-process: it may
            accept ``dp.reproducible-noise`` (labelled NOT PRIVATE). Never set it from the
            run config or the message.

        Raises
        ------
        PolicyRefusal
            Naming the first rule the run breaks.
        """
        category = message_type.split(".", 1)[0]
        if category not in MESSAGE_TYPES:
            raise PolicyRefusal(
                f"message type {message_type!r} is outside the site API "
                f"(answers {list(MESSAGE_TYPES)})",
                rule=RULE_MESSAGE_TYPE,
            )
        if run.dp.reproducible_noise:
            if not simulated:
                raise PolicyRefusal(
                    "dp.reproducible-noise=true seeds DP noise and sampling from the run "
                    "config, so the coordinator could regenerate and subtract the noise; a "
                    "real site never accepts it (set dp.reproducible-noise=false)",
                    rule=RULE_SECRET_NOISE,
                )
            log.warning(
                "simulated site accepts dp.reproducible-noise: DP noise is NOT PRIVATE in this run"
            )
        if self.require_dp and not run.dp.enabled:
            raise PolicyRefusal(
                "the run has dp.enabled=false and this site's policy requires DP-SGD "
                "(require-dp=true)",
                rule="require-dp",
            )
        if run.dp.enabled:
            if run.dp.noise_multiplier > 0:
                self.check_noise_multiplier(run.dp.noise_multiplier)
            clip = run.dp.max_grad_norm
            _bound("dp.max-grad-norm", clip, "max-grad-norm-min", self.max_grad_norm_min)
            _bound("dp.max-grad-norm", clip, "max-grad-norm-max", self.max_grad_norm_max)
        if self.require_secagg and not run.secagg.enabled:
            raise PolicyRefusal(
                "the run has secagg.enabled=false and this site's policy requires secure "
                "aggregation (require-secagg=true)",
                rule="require-secagg",
            )
        _member("model", run.model, "allowed-models", self.allowed_models)
        _member("task", run.task, "allowed-tasks", self.allowed_tasks)
        if "*" not in self.allowed_projects:
            _member("project", run.project, "allowed-projects", self.allowed_projects)
        _bound("num-server-rounds", run.num_server_rounds, "max-rounds", self.max_rounds)
        _bound("local-epochs", run.train.local_epochs, "max-local-epochs", self.max_local_epochs)

    def check_noise_multiplier(self, sigma: float) -> None:
        """Refuse a DP-SGD noise multiplier below the floor.

        Call it with the multiplier the site derives from ``dp.target-epsilon`` (after
        planning, before training); :meth:`check_run` checks a fixed one.

        Parameters
        ----------
        sigma : float
            Noise standard deviation divided by the clipping norm (dimensionless).

        Raises
        ------
        PolicyRefusal
            Rule ``min-noise-multiplier`` if ``sigma`` is below the floor or not finite.
        """
        if not math.isfinite(sigma) or sigma < self.min_noise_multiplier:
            raise PolicyRefusal(
                f"noise multiplier {sigma:.4g} is below this site's min-noise-multiplier="
                f"{self.min_noise_multiplier:g} (a lower dp.target-epsilon, more sites' data "
                "per step or fewer rounds raise it)",
                rule="min-noise-multiplier",
            )

    def check_secagg_sites(self, n: int) -> None:
        """Refuse a secure aggregate over fewer sites than ``min-secagg-sites``.

        Parameters
        ----------
        n : int
            Sites in the secure aggregate, this one included (known at the share-keys
            stage).

        Raises
        ------
        PolicyRefusal
            Rule ``min-secagg-sites``.
        """
        if n < self.min_secagg_sites:
            raise PolicyRefusal(
                f"the secure aggregate has {n} site(s); this site's min-secagg-sites is "
                f"{self.min_secagg_sites}",
                rule="min-secagg-sites",
            )

    def check_evaluation(self, *, evaluations_so_far: int, num_images: int) -> None:
        """Refuse an evaluation beyond the per-run count or over too few images.

        Parameters
        ----------
        evaluations_so_far : int
            Evaluate messages this site has already answered in this run.
        num_images : int
            Validation images the evaluation would score.

        Raises
        ------
        PolicyRefusal
            Rule ``max-evaluations-per-run`` or ``min-eval-images``.
        ValueError
            If a count is negative (a bug in the caller, not a request).
        """
        if evaluations_so_far < 0 or num_images < 0:
            raise ValueError(
                f"counts must be >= 0, got evaluations_so_far={evaluations_so_far}, "
                f"num_images={num_images}"
            )
        if evaluations_so_far >= self.max_evaluations_per_run:
            raise PolicyRefusal(
                f"this run has had {evaluations_so_far} evaluation(s); this site's "
                f"max-evaluations-per-run is {self.max_evaluations_per_run}",
                rule="max-evaluations-per-run",
            )
        if num_images < self.min_eval_images:
            raise PolicyRefusal(
                f"the evaluation would score {num_images} image(s); this site's "
                f"min-eval-images is {self.min_eval_images}",
                rule="min-eval-images",
            )

    def allowed_metric_names(self) -> frozenset[str]:
        """Return the metric names a reply may carry (``allowed-metrics``)."""
        return frozenset(self.allowed_metrics)

    def round_metrics(self, values: Mapping[str, int | float]) -> dict[str, int | float]:
        """Round every float metric to ``metric-decimals``; drop nothing.

        Integers pass unchanged; floats are rounded with :func:`round`, ``-0.0``
        becomes ``0.0`` and every NaN becomes the one canonical NaN (a NaN's payload
        could carry 51 bits).

        Parameters
        ----------
        values : Mapping[str, int | float]
            Metric name -> numeric scalar.

        Returns
        -------
        dict[str, int | float]
            The same names, rounded values (Python ``int`` / ``float``).

        Raises
        ------
        PolicyRefusal
            Rule ``allowed-metrics`` for a name outside the allow list, or a value that
            is not a numeric scalar (booleans, strings and lists are not metrics).
        """
        out: dict[str, int | float] = {}
        for name, value in values.items():
            if name not in self.allowed_metrics:
                raise PolicyRefusal(
                    f"metric {name!r} is not in this site's allowed-metrics",
                    rule="allowed-metrics",
                )
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise PolicyRefusal(
                    f"metric {name!r} is a {type(value).__name__}; only numeric scalars leave",
                    rule="allowed-metrics",
                )
            if isinstance(value, numbers.Integral):
                out[name] = int(value)
                continue
            v = float(value)
            if math.isnan(v):
                out[name] = math.nan
            elif math.isinf(v):
                out[name] = v
            else:
                out[name] = round(v, self.metric_decimals) + 0.0
        return out

    def delta_for(self, num_examples: int) -> float:
        """Return the site's delta: ``delta`` if set, else ``0.1 / N``.

        Parameters
        ----------
        num_examples : int
            ``N``, training patients (or images where each patient has one).

        Raises
        ------
        ValueError
            If ``num_examples < 1`` and no ``delta`` is set.
        """
        if self.delta is not None:
            return self.delta
        if num_examples < 1:
            raise ValueError("cannot derive delta = 0.1 / N for an empty training split")
        return 0.1 / num_examples


#: Every rule name a :class:`PolicyRefusal` may carry.
RULES: frozenset[str] = frozenset(
    {f.metadata["key"] for f in dataclasses.fields(SitePolicy)}
    | {RULE_SECRET_NOISE, RULE_MESSAGE_TYPE}
)


# ----------------------------------------------------------------------------- parsing
def _where(key: str, section: str, value: Any, problem: str) -> str:
    return (
        f"site policy key {key!r}={value!r} ([{section}]) {problem}; fix it in the policy "
        "file and run `medfed site policy check FILE`."
    )


_KIND_WORDS = {
    "float": "a number (e.g. 10.0)",
    "optional-float": "a number (e.g. 1e-05)",
    "int": "a whole number (e.g. 3)",
    "bool": "true or false",
    "names": 'a list of names (e.g. ["a", "b"])',
}


def _coerce(key: str, section: str, kind: str, value: Any) -> Any:
    """Return ``value`` as the field's type; raise :class:`ConfigError` naming the key."""

    def wrong() -> ConfigError:
        return ConfigError(
            f"site policy key {key!r} ([{section}]) must be {_KIND_WORDS[kind]}, got "
            f"{value!r} ({type(value).__name__}); fix it in the policy file."
        )

    if kind == "optional-float" and value is None:
        return None
    if kind in ("float", "optional-float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong()
        if not math.isfinite(value):
            raise ConfigError(_where(key, section, value, "must be a finite number"))
        return float(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong()
        return value
    # names: a non-empty list of strings, stored sorted without duplicates
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise wrong()
    if not all(isinstance(v, str) for v in value):
        raise wrong()
    if not value:
        raise ConfigError(
            _where(
                key,
                section,
                value,
                "must list at least one name (to take part in nothing, stop the site worker)",
            )
        )
    return tuple(sorted(set(value)))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    items = [json.dumps(v) for v in value]  # JSON strings are TOML basic strings
    one_line = "[" + ", ".join(items) + "]"
    if len(one_line) <= 70:
        return one_line
    return "[\n" + "".join(f"    {item},\n" for item in items) + "]"


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, width=86)]


_HEADER = """\
# medfed site policy
#
# This hospital's limits on what any coordinator may ask of this site. The site worker
# (`medfed site serve --policy FILE`) reads it at start and checks every request against
# it before any work: a request outside it is refused with an error reply that names only
# the rule (the key below), and the refusal goes to the site's audit log.
#
# Every key is optional: an absent key takes the default written here. An unknown or
# misspelt key is an error, never silently ignored. After editing, validate with
# `medfed site policy check FILE` and restart the site worker; `medfed site policy show
# FILE` prints the effective policy and the digest the audit log records.
#
# Not configurable: dp.reproducible-noise (DP noise seeded from the run config, which the
# coordinator could regenerate and subtract) is always refused (rule require-secret-noise).
"""

_SECTION_HELP = {
    "privacy": "Differential privacy (DP-SGD with Opacus) at this site.",
    "secure-aggregation": "Secure aggregation (SecAgg+): the coordinator sees only a sum.",
    "training": "What runs this site takes part in.",
    "evaluation": "Limits on evaluate requests (each one scores a model on patient images).",
    "egress": "What may leave the site in a reply besides the model update.",
}


# ----------------------------------------------------------------------------- writing
def write_default_policy(path: str | os.PathLike[str]) -> Path:
    """Write the commented default policy to ``path``, never overwriting anything.

    The file is created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``) with mode
    ``0o640``: an existing file or a planted symbolic link (even a dangling one) at
    ``path`` is refused, never followed.

    Parameters
    ----------
    path : str or os.PathLike
        Where to write; its folder must exist.

    Returns
    -------
    Path
        ``path``; :meth:`SitePolicy.load` reads it back to :meth:`SitePolicy.default`.

    Raises
    ------
    PolicyFileExistsError
        Something already exists at ``path``.
    ConfigError
        The folder does not exist, or the file cannot be created.
    """
    p = Path(path)
    text = SitePolicy.default().to_toml()
    flags = (
        os.O_WRONLY
        | os.O_CREAT
        | os.O_EXCL
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    try:
        fd = os.open(p, flags, 0o640)
    except FileExistsError:
        raise PolicyFileExistsError(
            f"{p} already exists (a file or a link); a site policy is never overwritten: "
            f"edit it and run `medfed site policy check {p}`, or move it away first."
        ) from None
    except FileNotFoundError:
        raise ConfigError(
            f"cannot write the site policy: folder {p.parent} does not exist; create it "
            "first (e.g. mkdir -p)."
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PolicyFileExistsError(
                f"{p} is a symbolic link; a site policy is never written through a link."
            ) from None
        raise ConfigError(f"cannot create site policy {p}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o640)  # exactly 0o640, whatever the umask
            fh.write(text)
    except BaseException:
        p.unlink(missing_ok=True)
        raise
    log.info("wrote the default site policy to %s", p)
    return p
