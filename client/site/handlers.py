"""The site's training and evaluation handlers: thin glue around client/train.py.

Run only inside the site service (client/site/service.py): in deployment in the site
worker the hospital installed (``medfed site serve``), in simulation in-process. Each
message is prepared in one shared place (:func:`prepare`), trained or evaluated with
plain PyTorch, and packaged as reply content. The node config a handler sees is the
site's own (the worker's configuration, or Flower's simulation node config), never the
coordinator's; the site policy bounds what the run config may ask.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from torch import nn
from torch.utils.data import DataLoader

from client.augment import make_augmentation
from client.privacy import (
    DPRandomness,
    PrivacyError,
    PrivacyLedger,
    PrivateTraining,
    default_delta,
    plan_round,
    private_training,
)
from client.proximal import ProximalLoss
from client.replies import error_message
from client.scaffold import DELTA_RECORD as SCAFFOLD_DELTA_RECORD
from client.scaffold import SERVER_RECORD as SCAFFOLD_SERVER_RECORD
from client.scaffold import ScaffoldRound, variate_path
from client.site.job import MessageJob, job_of
from client.site.policy import PolicyRefusal, SitePolicy
from client.train import make_optimizer, make_train_loader, train_epochs
from common import secure_sum
from common.config import NodeConfig, RunConfig
from common.device import resolve_device
from common.errors import ConfigError, DataError, reply_code
from common.evaluation import metrics_from_proba, predict_proba
from common.imbalance import balanced_class_weights, class_counts
from common.operating_point import POSITIVE, score_histogram
from common.records import load_record, record_to_state_dict, state_to_record
from common.replies import ReplyCode
from common.site_dataset import SiteDataset
from common.tasks import get_task
from common.wire import VAL_COUNT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """Everything a handler needs, built once per message by :func:`prepare`.

    ``run``, ``node``, ``data`` and ``model`` are the message's :class:`MessageJob`'s
    (client/site/job.py), which also resolves :attr:`state_dir` and :attr:`ledger_key`
    once for every reader of this message.
    """

    run: RunConfig
    node: NodeConfig
    data: SiteDataset
    model: nn.Module
    device: torch.device
    server_round: int
    run_id: int
    policy: SitePolicy
    #: FedProx's mu from the train message config (``proximal-mu``); 0 without FedProx.
    proximal_mu: float = 0.0
    #: SCAFFOLD's server control variate from the train message; None without SCAFFOLD.
    scaffold_c: dict[str, torch.Tensor] | None = None
    #: ``class-weighting = "federation"``: the federation's summed label counts ``(K,)``
    #: from the train message config; None before the census or in other modes.
    federation_counts: np.ndarray | None = None
    #: The message is the census before round 1 (:mod:`common.secure_sum`): no training.
    census: bool = False
    #: The message asks only for validation of the received model (the final model's
    #: validation under SecAgg+, :mod:`common.secure_sum`): no training.
    validate_only: bool = False
    #: The message's job: the one place its config, model, state dir and ledger key are
    #: resolved (client/site/job.py).
    message: MessageJob = field(kw_only=True, repr=False, compare=False)

    @property
    def state_dir(self) -> Path:
        """The site's state dir (privacy ledger, SCAFFOLD variate, audit log).

        Raises
        ------
        ConfigError
            If this node has none.
        """
        return self.message.state_dir

    @property
    def ledger_key(self) -> str:
        """The privacy ledger's (and SCAFFOLD's) key for this site dataset."""
        return self.message.ledger_key


def _check_dataset(run: RunConfig, data: SiteDataset) -> None:
    """Raise DataError unless the site dataset fits the run's task and model (common/tasks.py)."""
    get_task(run.task).check_dataset(data, model=run.model, num_classes=run.num_classes)


def prepare(content: RecordDict, context: Context, *, policy: SitePolicy) -> Job:
    """Parse config, open the site dataset, build the model and load the global weights.

    Shared by the train and evaluate handlers (DESIGN section 9, rule 9). Config, dataset
    and model come from the message's job (:func:`client.site.job.job_of`): resolved
    once per message, however many mods read them too.

    Parameters
    ----------
    content : RecordDict
        The server's message content: ``arrays`` (global model) and ``config``.
    context : Context
        Flower's context with ``run_config`` and the site's own ``node_config``.
    policy : SitePolicy
        The site's policy (its epsilon ceiling, delta and noise floor are used here).

    Raises
    ------
    ConfigError, DataError, ModelError
        Bad config, a site dataset that does not fit the run, or arrays that do not fit
        the model; :func:`make_handler` turns each into a fixed-reason error reply.

    """
    message = job_of(context)
    run, node, data = message.run, message.node, message.dataset
    _check_dataset(run, data)
    model = message.model  # built here, after seeding torch from run config's seed
    if "arrays" not in content.array_records or "config" not in content.config_records:
        raise DataError("a train or evaluate message needs records 'arrays' and 'config'")
    load_record(model, content.array_records["arrays"])
    device = resolve_device(node.device)
    model.to(device)
    server_round = content.config_records["config"].get("server-round", 0)
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise DataError("config 'server-round' must be an int")
    mu = content.config_records["config"].get("proximal-mu", 0.0)
    if isinstance(mu, bool) or not isinstance(mu, int | float) or not 0.0 <= mu < math.inf:
        raise DataError("config 'proximal-mu' must be a finite number >= 0")
    scaffold_c = None
    if SCAFFOLD_SERVER_RECORD in content.array_records:
        scaffold_c = record_to_state_dict(content.array_records[SCAFFOLD_SERVER_RECORD])
    config = content.config_records["config"]
    census, validate_only = (
        config.get(key, False) for key in (secure_sum.CENSUS_KEY, secure_sum.VALIDATE_KEY)
    )
    for key, value in ((secure_sum.CENSUS_KEY, census), (secure_sum.VALIDATE_KEY, validate_only)):
        if not isinstance(value, bool):
            raise DataError(f"config {key!r} must be a bool")
    return Job(
        run,
        node,
        data,
        model,
        device,
        server_round,
        context.run_id,
        policy,
        float(mu),
        scaffold_c,
        federation_counts=_federation_counts(config.get(secure_sum.FEDERATION_COUNTS_KEY), run),
        census=bool(census),
        validate_only=bool(validate_only),
        message=message,
    )


def _federation_counts(raw: object, run: RunConfig) -> np.ndarray | None:
    """Parse the train config's federation class counts: ``(K,)`` finite counts >= 0."""
    if raw is None:
        return None
    if (
        not isinstance(raw, list)
        or len(raw) != run.num_classes
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw)
    ):
        raise DataError(
            f"config {secure_sum.FEDERATION_COUNTS_KEY!r} must be {run.num_classes} numbers"
        )
    counts = np.asarray(raw, dtype=np.float64)
    if not np.all(np.isfinite(counts)) or (counts < 0).any():
        raise DataError(f"config {secure_sum.FEDERATION_COUNTS_KEY!r} must hold counts >= 0")
    return counts


def _round_seed(job: Job) -> int:
    """Seed for this site's shuffling in this round: differs per round and per site.

    Known to the coordinator (it is derived from run config), so it seeds only what
    carries no privacy guarantee: the shuffling of non-DP training, and DP randomness
    under the simulation-only ``dp.reproducible-noise`` switch (:func:`dp_randomness`).
    """
    site = job.node.partition_id if job.node.partition_id is not None else 0
    return job.run.seed * 1_000_003 + job.server_round * 1_009 + site


def dp_randomness(job: Job) -> DPRandomness:
    """Return the round's DP generators: secret site entropy, or (simulation only) reproducible.

    Raises
    ------
    PrivacyError
        If run config asks for ``dp.reproducible-noise`` on a node that is not a
        virtual site of a simulation (node config without ``partition-id``): the site
        refuses to train rather than draw noise the coordinator can predict.
    """
    if not job.run.dp.reproducible_noise:
        return DPRandomness.secret(job.device)
    if job.node.partition_id is None:
        raise PrivacyError(
            "run config 'dp.reproducible-noise'=true asks for DP noise seeded from the run "
            "config, which the coordinator knows; it exists for simulation only and this "
            "site refuses to train with it (set dp.reproducible-noise=false)"
        )
    return DPRandomness.seeded(_round_seed(job), job.device)


def augmentation_generator(job: Job, randomness: DPRandomness | None) -> torch.Generator:
    """Return the round's generator for training-time augmentation (client/augment.py).

    Under DP the round's :class:`DPRandomness` one (secret site entropy, or seeded only
    under the simulation-only ``dp.reproducible-noise``); without DP, like the shuffling,
    one seeded from :func:`_round_seed` (non-DP training carries no privacy guarantee).
    """
    if randomness is not None:
        return randomness.augmentation
    return torch.Generator(device=job.device).manual_seed(_round_seed(job) + 13)


def site_class_weights(job: Job, labels: np.ndarray) -> torch.Tensor | None:
    """Class weights for the round's loss per run config ``class-weighting``, or None.

    ``"site"`` (also what ``"auto"`` means for classification,
    :meth:`RunConfig.class_weight_source`): :func:`common.imbalance.balanced_class_weights`
    of this site's own training-label counts, capped at ``class-weight-max``. The
    weights are a function of the site's label counts, which DP-SGD's accounting does
    not cover (as with the exact ``num-examples`` every reply carries); the weights
    themselves never leave the site. ``"federation"``: the same function of the
    federation's label counts, which the coordinator learned only as a sum over sites
    (the census, :mod:`common.secure_sum`) and sends in every train message; the site's
    own counts are the fallback while those are missing (the census itself trains
    nothing).

    Parameters
    ----------
    job : Job
        The prepared message.
    labels : numpy.ndarray
        int64 ``(N,)`` training labels.

    Returns
    -------
    torch.Tensor or None
        float32 ``(K,)`` on the job's device.

    Raises
    ------
    ConfigError
        For a mode other than ``"none"``, ``"site"`` or ``"federation"``.
    """
    mode = job.run.class_weight_source()
    if mode == "none":
        return None
    if mode not in ("site", "federation"):
        raise ConfigError(f"config key 'class-weighting'={mode!r} is not available at sites")
    if mode == "federation" and job.federation_counts is not None:
        counts, source = job.federation_counts, "the federation's summed"
    else:
        if mode == "federation":
            log.warning("no federation class counts in the train message: using this site's")
        counts = class_counts(labels, num_classes=job.run.num_classes)
        source = "this site's"
    weights = balanced_class_weights(counts, max_weight=job.run.train.class_weight_max)
    log.info("class weights %s from %s training label counts", weights.round(4), source)
    return torch.as_tensor(weights, dtype=torch.float32, device=job.device)


@dataclass(frozen=True)
class Validation:
    """The site's validation of the received model (:func:`local_validation`).

    Attributes
    ----------
    metrics : dict[str, float]
        ``{"val-<metric>": value}``, before rounding.
    secure_sum : dict[str, numpy.ndarray] or None
        The counts the coordinator may learn only summed over sites
        (:func:`common.secure_sum.spec`: the per-class score histogram of a binary
        classifier when the run picks an operating point); None when the run needs none.
    """

    metrics: dict[str, float]
    secure_sum: dict[str, np.ndarray] | None = None


def local_validation(job: Job) -> Validation:
    """Evaluate the job's model on the site's ``val`` split.

    The metrics of the run's task (common/evaluation.py), before rounding; the count of
    validation images is not among them (each reply names it in its own way). For a run
    whose :func:`common.secure_sum.spec` holds the score histogram, the same predictions
    also give the ``(2, operating-point-bins)`` histogram of ``P(class 1)`` per true class
    (:func:`common.operating_point.score_histogram`).
    """
    split = job.data.load("val")
    wanted = secure_sum.spec(job.run)
    if secure_sum.SCORE_HISTOGRAM in wanted:
        probs = predict_proba(
            job.model, split.images, batch_size=job.run.evaluation.batch_size, device=job.device
        )
        labels = np.asarray(split.labels)
        metrics = metrics_from_proba(labels, probs)
        hist = score_histogram(probs[:, POSITIVE], labels, bins=job.run.operating_point.bins)
        sums: dict[str, np.ndarray] | None = {secure_sum.SCORE_HISTOGRAM: hist}
    else:
        metrics = get_task(job.run.task).evaluate(
            job.model,
            split.images,
            split.labels,
            batch_size=job.run.evaluation.batch_size,
            device=job.device,
        )
        sums = None
    values = {f"val-{k}": float(v) for k, v in metrics.items() if k != "num-examples"}
    return Validation(values, sums)


def site_secure_sums(
    job: Job, validation: Mapping[str, np.ndarray] | None, train_labels: np.ndarray
) -> dict[str, np.ndarray] | None:
    """Return the reply's secure-sum arrays: exactly the run's (``secure_sum.spec``).

    The validation score histogram (zeros if the site did not validate) and, with
    ``class-weighting = "federation"``, this site's training label counts; None when the
    run sums nothing, or when the only array would be a histogram the site did not make.
    """
    wanted = secure_sum.spec(job.run)
    part: dict[str, np.ndarray] = dict(validation or {})
    if secure_sum.CLASS_COUNTS in wanted:
        counts = class_counts(train_labels, num_classes=job.run.num_classes)
        part[secure_sum.CLASS_COUNTS] = counts.astype(np.float64)
    if not part:
        return None
    return secure_sum.complete(part, wanted)


def untrained_content(job: Job, *, validate: bool = False) -> RecordDict:
    """Answer a train message that trains nothing: the census, or a validate-only message.

    The global model goes back unchanged (a zero delta under SecAgg+) with
    ``num-examples``, the site's training count, as the weight. The reply's secure-sum
    record holds this site's training label counts when the run sums them, and, with
    ``validate``, the score histogram of the received model on the ``val`` split, whose
    ``val-*`` metrics and ``val-num-examples`` the reply carries too (as a train reply
    with ``evaluate-in-train`` does). Under SecAgg+ the record reaches the coordinator
    only inside the masked sum. Nothing is trained, so no privacy budget is spent.

    Parameters
    ----------
    job : Job
        The prepared message (``job.census`` or ``job.validate_only``).
    validate : bool
        Validate the received model (the policy's evaluation limits allow it and the
        site has a ``val`` split).
    """
    validation, sums = folded_validation(job) if validate else ({}, None)
    split = job.data.load("train")
    sums = site_secure_sums(job, sums, split.labels)
    values: dict[str, int | float] = {"num-examples": len(split), **validation}
    reply = RecordDict(
        {
            "arrays": state_to_record(job.model),
            "metrics": MetricRecord(outgoing_metrics(values, job.policy)),
        }
    )
    if sums is not None:
        reply[secure_sum.RECORD] = secure_sum.to_record(sums)
    if job.census:
        log.info("census: sent this site's label counts into the secure sum")
    else:
        log.info("round %d: validated the received model without training", job.server_round)
    return reply


def folded_validation(job: Job) -> tuple[dict[str, int | float], dict[str, np.ndarray] | None]:
    """:func:`local_validation` for a train reply, with ``val-num-examples``.

    The coordinator weights the sites' ``val-*`` metrics by their validation sizes
    (server/strategy.py); in a train reply ``num-examples`` counts training images, so
    the validation count travels as ``val-num-examples`` (an exact count). The second
    item is the validation's secure-sum counts, if the run wants any.
    """
    validation = local_validation(job)
    return {VAL_COUNT: job.data.count("val"), **validation.metrics}, validation.secure_sum


def training_criterion(job: Job, labels: np.ndarray) -> nn.Module:
    """Return the round's loss: the task's (class-weighted) loss, plus FedProx's term.

    The class weights enter the per-sample loss before DP-SGD clips each sample's
    gradient (:func:`site_class_weights`); FedProx anchors its proximal term at the global
    weights just loaded into ``job.model`` (Li et al., MLSys 2020).
    """
    task_loss = get_task(job.run.task).make_loss(class_weights=site_class_weights(job, labels))
    if job.proximal_mu > 0:
        return ProximalLoss(task_loss, model=job.model, mu=job.proximal_mu)
    return task_loss


def train_content(job: Job, *, evaluate_first: bool = False) -> RecordDict:
    """Train the global model on the site's ``train`` split; return the reply content.

    Parameters
    ----------
    job : Job
        The prepared message.
    evaluate_first : bool
        ``evaluate-in-train``: first evaluate the received global model on the site's
        ``val`` split and add its ``val-*`` metrics and ``val-num-examples`` to the
        reply, which saves the coordinator a separate evaluate exchange in this round.
    """
    validation, sums = folded_validation(job) if evaluate_first else ({}, None)
    job.model.train()  # evaluation left it in eval mode; Opacus needs training mode
    split = job.data.load("train")
    # Non-DP shuffling only: under DP, private_training replaces this generator with the
    # round's secrets-seeded one (DPRandomness).
    generator = torch.Generator().manual_seed(_round_seed(job))  # DP: secrets-seeded instead
    loader = make_train_loader(split, batch_size=job.run.train.batch_size, generator=generator)
    optimizer = make_optimizer(
        job.model,
        learning_rate=job.run.train.learning_rate,
        momentum=job.run.train.momentum,
        weight_decay=job.run.train.weight_decay,
    )
    criterion = training_criterion(job, split.labels)
    randomness = dp_randomness(job) if job.run.dp.enabled else None
    augment = make_augmentation(
        job.run.train.augment, generator=augmentation_generator(job, randomness)
    )
    scaffold = (
        None
        if job.scaffold_c is None
        else ScaffoldRound(
            job.model,
            c=job.scaffold_c,
            path=variate_path(job.state_dir, job.ledger_key),
        )
    )
    with (
        site_privacy(job, len(split), job.model, optimizer, loader, randomness=randomness) as priv,
        scaffold.correction(job.model, optimizer) if scaffold else contextlib.nullcontext(),
    ):
        stats = train_epochs(
            priv.model,
            priv.loader,
            optimizer=priv.optimizer,
            epochs=job.run.train.local_epochs,
            device=job.device,
            criterion=criterion,
            amp=job.run.train.amp,
            augment=augment,
        )
    log.info(
        "round %d: trained %d steps on %d examples in %.1f s (loss %.4f)",
        job.server_round,
        stats.steps,
        stats.examples,
        stats.seconds,
        stats.loss,
    )
    values: dict[str, int | float] = {
        "num-examples": len(split),
        "train-loss": stats.loss,
        "train-steps": stats.steps,
        "train-seconds": stats.seconds,
        **validation,
    }
    if priv.plan is not None:
        log.info(
            "round %d: cumulative epsilon %.3f (delta %.2e) for project %r",
            job.server_round,
            priv.epsilon,
            priv.plan.delta,
            job.run.project,
        )
        values |= {
            "epsilon": priv.epsilon,
            "delta": priv.plan.delta,
            "dp-noise-multiplier": priv.plan.noise_multiplier,
        }
    metrics = MetricRecord(outgoing_metrics(values, job.policy))
    reply = RecordDict({"arrays": state_to_record(job.model), "metrics": metrics})
    sums = site_secure_sums(job, sums, split.labels)
    if sums is not None:
        # summed over sites by the coordinator, or inside SecAgg+'s masked vector
        # (client/secagg_mod.py), never read one site at a time under SecAgg+
        reply[secure_sum.RECORD] = secure_sum.to_record(sums)
    if scaffold is not None:
        reply[SCAFFOLD_DELTA_RECORD] = scaffold.finish(
            job.model, steps=stats.steps, learning_rate=job.run.train.learning_rate
        )
    return reply


#: Metrics sent exactly: privacy accounting of public parameters and counts.
EXACT_METRICS = frozenset(
    {"num-examples", VAL_COUNT, "train-steps", "epsilon", "delta", "dp-noise-multiplier"}
)


def outgoing_metrics(
    values: Mapping[str, int | float], policy: SitePolicy
) -> dict[str, int | float | list[int] | list[float]]:
    """Return the metrics a reply may carry: the policy's allowed names, rounded.

    Names the policy does not allow are dropped here (the egress check refuses any that
    reach it). Every other value is rounded to the policy's ``metric-decimals``, so a
    coordinator sending crafted models cannot read training or validation images out of
    the loss or accuracy bit by bit; counts and the privacy accounting (computed from
    public parameters) are sent exactly.
    """
    allowed = policy.allowed_metric_names()
    kept = {k: v for k, v in values.items() if k in allowed}
    exact = {k: v for k, v in kept.items() if k in EXACT_METRICS}
    rounded = policy.round_metrics({k: v for k, v in kept.items() if k not in EXACT_METRICS})
    return {**rounded, **exact}


def evaluate_content(job: Job) -> RecordDict:
    """Evaluate the global model on the site's local ``val`` split; return the content.

    Metrics are rounded to the policy's ``metric-decimals`` so a coordinator evaluating
    crafted models cannot read the validation images out bit by bit.
    """
    values: dict[str, int | float] = {"num-examples": job.data.count("val")}
    validation = local_validation(job)
    values |= validation.metrics
    record = MetricRecord(outgoing_metrics(values, job.policy))
    content = RecordDict({"metrics": record})
    if validation.secure_sum is not None and not job.run.secagg.enabled:
        # Plain evaluate replies are not securely summed: under SecAgg+ the histogram
        # travels only inside train replies' masked vectors.
        content[secure_sum.RECORD] = secure_sum.to_record(validation.secure_sum)
    return content


@contextlib.contextmanager
def site_privacy(
    job: Job,
    num_examples: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    *,
    randomness: DPRandomness | None = None,
) -> Iterator[PrivateTraining | NonPrivateTraining]:
    """Wrap the round's training objects with DP-SGD, or pass them through if DP is off.

    With DP on, the site's ledger (``state-dir``) is checked against its policy's
    ceiling (``max-epsilon``) before any step and updated after (client/privacy.py);
    a noise multiplier derived from the target epsilon must clear the policy's floor.
    ``randomness`` is the round's :func:`dp_randomness` if the caller already drew it
    (its augmentation generator is used too); otherwise it is drawn here.
    """
    run = job.run
    if not run.dp.enabled:
        yield NonPrivateTraining(model, optimizer, loader)
        return
    randomness = randomness if randomness is not None else dp_randomness(job)
    if not randomness.reproducible:
        # prepare() seeded torch's global generator from run config for model init;
        # anything else drawn during a DP round must not be predictable either.
        torch.manual_seed(secrets.randbits(63))
    ledger = PrivacyLedger(job.state_dir)
    key = job.ledger_key
    stored = ledger.entry(key).get("plans", {}).get(str(job.run_id))
    plan = plan_round(
        num_examples=num_examples,
        batch_size=run.train.batch_size,
        local_epochs=run.train.local_epochs,
        num_rounds=run.num_server_rounds,
        max_grad_norm=run.dp.max_grad_norm,
        # delta below 1/N with N counted in patients (groups), not images
        delta=job.policy.delta or default_delta(job.data.group_count("train")),
        accountant=run.dp.accountant,
        noise_multiplier=run.dp.noise_multiplier or stored,
        target_epsilon=run.dp.target_epsilon,
    )
    job.policy.check_noise_multiplier(plan.noise_multiplier)
    with private_training(
        model=model,
        optimizer=optimizer,
        loader=loader,
        plan=plan,
        ledger=ledger,
        key=key,
        run_id=job.run_id,
        max_epsilon=job.policy.max_epsilon,
        max_physical_batch_size=run.dp.max_physical_batch_size,
        randomness=randomness,
    ) as session:
        yield session


@dataclass
class NonPrivateTraining:
    """Training objects passed through unchanged (``dp.enabled = false``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader[Any]
    plan: None = None
    epsilon: float = 0.0


def error_reply(msg: Message, exc: BaseException) -> Message:
    """Return the error reply for a refusal raised while handling ``msg``.

    The reply carries a :class:`~common.replies.ReplyCode` and its fixed reason (plus the
    policy rule's name): never the exception text, which may hold a path or a value and
    goes to the site's own log instead.
    """
    code = reply_code(exc)  # the one table: common.errors.CODES
    detail = exc.rule if isinstance(exc, PolicyRefusal) else ""
    if code == ReplyCode.INTERNAL:
        log.error("%s message failed", msg.metadata.message_type, exc_info=exc)
    else:
        log.warning("refusing a %s message: %s", msg.metadata.message_type, exc)
    return error_message(msg, code, detail)


def make_handler(
    policy: SitePolicy, *, may_evaluate: Callable[[Job], bool] | None = None
) -> Callable[[Message, Context], Message]:
    """Return the innermost callable of the site service's mod chain: train or evaluate.

    Parameters
    ----------
    policy : SitePolicy
        The site's policy (ceiling, delta, noise floor, metric rounding).
    may_evaluate : Callable[[Job], bool], optional
        Whether the policy's evaluation limits allow the ``evaluate-in-train``
        validation of this train message (the service counts evaluations per run);
        if it says no, the site trains and replies without ``val-*`` metrics.

    Returns
    -------
    Callable[[Message, Context], Message]
        Returns the reply content, or an error reply from :func:`error_reply`; it never
        raises.
    """

    def handle(msg: Message, context: Context) -> Message:
        try:
            job = prepare(msg.content, context, policy=policy)
            if msg.metadata.message_type == MessageType.TRAIN and job.census:
                return Message(content=untrained_content(job), reply_to=msg)
            if msg.metadata.message_type == MessageType.TRAIN:
                validate = (
                    (job.run.evaluation.in_train or job.validate_only)
                    and "val" in job.data.splits
                    and (may_evaluate is None or may_evaluate(job))
                )
                content = (
                    untrained_content(job, validate=validate)
                    if job.validate_only
                    else train_content(job, evaluate_first=validate)
                )
                return Message(content=content, reply_to=msg)
            return Message(content=evaluate_content(job), reply_to=msg)
        except Exception as exc:  # every failure becomes a fixed-reason reply
            return error_reply(msg, exc)

    return handle
