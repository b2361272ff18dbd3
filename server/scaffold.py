"""SCAFFOLD at the coordinator: FedAvg plus the server control variate.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, Algorithm 1, with global step size 1: the global model is FedAvg's weighted
mean of the sites' models, and the server control variate moves by the mean of the
sites' variate deltas scaled by the participating fraction::

    c <- c + (|S| / N) * mean_{i in S} delta_c_i

The variate travels to the sites as an extra ``ArrayRecord`` (``scaffold-c``) in every
train message; each site replies with ``scaffold-dc`` (client/scaffold.py). Flower 1.41
ships no SCAFFOLD, so this wraps its ``FedAvg``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

log = logging.getLogger(__name__)

SERVER_RECORD = "scaffold-c"
DELTA_RECORD = "scaffold-dc"


class Scaffold(FedAvg):
    """FedAvg that maintains and distributes SCAFFOLD's server control variate.

    Parameters
    ----------
    parameter_names : Iterable[str]
        Names of the model's trainable parameters (the variate's keys); buffers such
        as GroupNorm statistics have none.
    **kwargs
        :class:`flwr.serverapp.strategy.FedAvg` arguments.
    """

    def __init__(self, *, parameter_names: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parameter_names = list(parameter_names)
        self.c: dict[str, np.ndarray] | None = None
        self._num_nodes = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, each carrying the server control variate."""
        if self.c is None:  # zero variate shaped like the parameters
            self.c = {
                k: np.zeros_like(arrays[k].numpy(), dtype=np.float32) for k in self.parameter_names
            }
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._num_nodes = len(list(grid.get_node_ids()))
        for m in messages:
            m.content[SERVER_RECORD] = ArrayRecord({k: Array(v) for k, v in self.c.items()})
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Update the server variate from the sites' deltas, then FedAvg the models."""
        replies = list(replies)
        deltas: list[dict[str, np.ndarray]] = []
        for r in replies:
            if r.has_error() or DELTA_RECORD not in r.content.array_records:
                continue
            record = r.content.array_records[DELTA_RECORD]
            deltas.append({k: record[k].numpy() for k in self.parameter_names})
            del r.content[DELTA_RECORD]  # FedAvg expects exactly one ArrayRecord
        if deltas and self.c is not None and self._num_nodes:
            frac = len(deltas) / self._num_nodes
            for k in self.parameter_names:
                mean = np.mean([d[k] for d in deltas], axis=0)
                self.c[k] = (self.c[k] + frac * mean).astype(np.float32)
        return super().aggregate_train(server_round, replies)
