"""The per-message job: what one coordinator message resolves to at this site, once.

One message passes through several pieces of site code: the site service's policy and
evaluation checks (client/site/service.py), the SecAgg+ mod (client/secagg_mod.py), in
simulation the fault injection (client/faults.py), the train/evaluate handlers
(client/site/handlers.py) and the egress guard (client/egress.py). Each needs some of
the same things: the parsed run config, the site's node config, the model the run
trains and its array specs, the site's state dir and privacy-ledger key, the site
dataset. :class:`MessageJob` resolves each of them at most once per message, on first
use (a plain train message parses the run config once and builds the model once), and
every piece reads it through :func:`job_of`.

The site service builds one job per message and passes it down on the
:class:`JobContext` it hands to its mods and handlers; nothing is kept from one message
to the next (no module-level cache): the next message, possibly of another run or
after the site dataset changed, resolves everything afresh. A mod or handler called on
a plain Flower ``Context`` (outside the service, e.g. in a test) gets a fresh job.

Nothing here trusts the run config: parsing validates it (:class:`ConfigError`), and
the specs the egress guard checks replies against are taken from the model as built,
before any handler loads weights into it or trains it.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context

from common.config import NodeConfig, RunConfig
from common.wire import ArraySpec

if TYPE_CHECKING:
    from torch import nn

    from common.site_dataset import SiteDataset

__all__ = ["JobContext", "MessageJob", "job_of"]


@dataclass(frozen=True)
class _Built:
    """The message's model and its specs, taken as it was built."""

    model: nn.Module
    model_spec: ArraySpec
    parameter_spec: ArraySpec
    floats: int

    @classmethod
    def of(cls, run: RunConfig) -> _Built:
        import torch

        from common.models import get_model
        from common.records import expected_spec

        torch.manual_seed(run.seed)
        model = get_model(run.model, **run.model_kwargs())
        state = model.state_dict()
        return cls(
            model,
            types.MappingProxyType(expected_spec(model)),
            types.MappingProxyType(
                {n: (tuple(p.shape), "float32") for n, p in model.named_parameters()}
            ),
            sum(int(v.numel()) for v in state.values() if v.is_floating_point()),
        )


class MessageJob:
    """Everything one message resolves to at this site, each item resolved once, lazily.

    Parameters
    ----------
    run_config : Mapping
        The coordinator's flat run config (``context.run_config``).
    node_config : Mapping
        The site's own node config (``context.node_config``).

    Notes
    -----
    Every attribute is computed on first access and then kept for this message only. An
    attribute whose resolution raises (an invalid run config, no state dir, a missing
    site dataset) raises again on the next access; callers refuse the message on the
    first such error.
    """

    def __init__(self, *, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> None:
        self.run_config = run_config
        self.node_config = node_config
        self._made: _Built | None = None

    @classmethod
    def of(cls, context: Context) -> MessageJob:
        """Return a new job for the message that ``context`` comes with."""
        return cls(run_config=context.run_config, node_config=context.node_config)

    # --------------------------------------------------------------- configuration
    @functools.cached_property
    def run(self) -> RunConfig:
        """The parsed run config.

        Raises
        ------
        ConfigError
            Unknown key, wrong type or invalid value.
        """
        return RunConfig.from_run_config(self.run_config)

    @functools.cached_property
    def node(self) -> NodeConfig:
        """The parsed node config (the site's own).

        Raises
        ------
        ConfigError
            A value of the wrong type or an invalid device.
        """
        return NodeConfig.from_node_config(self.node_config)

    @functools.cached_property
    def state_dir(self) -> Path:
        """Where the site keeps its state: privacy ledger, SCAFFOLD variate, audit log.

        Raises
        ------
        ConfigError
            When neither node config ``state-dir`` nor (simulation) ``sites-dir`` with a
            ``partition-id`` names one.
        """
        return self.node.resolve_state_dir(self.run)

    @functools.cached_property
    def dataset(self) -> SiteDataset:
        """The site dataset (deployment: ``dataset-dir``; simulation: by ``partition-id``).

        Raises
        ------
        ConfigError, DataError
            No dataset configured, or not a readable site dataset.
        """
        from common.site_dataset import SiteDataset  # numpy only

        return SiteDataset(self.node.resolve_dataset_dir(self.run))

    @functools.cached_property
    def ledger_key(self) -> str:
        """The privacy ledger's (and SCAFFOLD's) key: the site dataset's fingerprint."""
        from client.privacy import ledger_key

        return ledger_key(self.dataset.fingerprint)

    # ----------------------------------------------------------------------- model
    @property
    def model(self) -> nn.Module:
        """The run's model, built once (float32, CPU), after seeding torch from ``seed``.

        The one model of this message: the handler loads the global weights into it and
        trains or evaluates it. Its specs (:attr:`model_spec`, :attr:`parameter_spec`,
        :attr:`masked_spec`) are recorded as it is built, before anything changes it.

        Raises
        ------
        ConfigError, ModelError
            An invalid run config or an unknown model.
        """
        return self._built().model

    def _built(self) -> _Built:
        if self._made is None:
            self._made = _Built.of(self.run)
        return self._made

    @property
    def model_spec(self) -> ArraySpec:
        """``{name: (shape, dtype)}`` of every ``state_dict`` entry of the run's model.

        As :func:`common.records.expected_spec` of a freshly built model: what the
        ``arrays`` record of a train reply must hold exactly.
        """
        return self._built().model_spec

    @property
    def parameter_spec(self) -> ArraySpec:
        """``{name: (shape, "float32")}`` of the model's trainable parameters (SCAFFOLD)."""
        return self._built().parameter_spec

    @property
    def masked_spec(self) -> ArraySpec:
        """``{vector: ((L,), "uint32")}``: the one array a masked-input reply carries.

        ``L`` counts the float entries of the model's ``state_dict`` and the run's
        secure-sum entries (:func:`common.secagg.schema.masked_spec`).
        """
        from common.secagg.schema import masked_spec

        return masked_spec(self.run, model_floats=self._built().floats)


class JobContext(Context):
    """Flower's ``Context`` of one message, carrying that message's :class:`MessageJob`.

    Shares the caller's ``node_config``, ``run_config`` and ``state`` (the same
    ``RecordDict``, so what the SecAgg+ mod keeps there persists as before); lives as
    long as the message.
    """

    def __init__(self, context: Context, job: MessageJob) -> None:
        super().__init__(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=context.node_config,
            state=context.state,
            run_config=context.run_config,
            series_id=context.series_id,
        )
        self.job = job


def job_of(context: Context) -> MessageJob:
    """Return the message's job: the one the site service put on ``context``, or a new one."""
    if isinstance(context, JobContext):
        return context.job
    return MessageJob.of(context)
