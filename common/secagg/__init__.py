"""Secure aggregation (SecAgg+) pieces shared by sites and the coordinator.

The coordinator learns only the weighted sum of the sites' model deltas. See
:mod:`common.secagg.params` for the protocol and its sources, :mod:`common.secagg.crypto`
for the vetted primitives used, :mod:`common.secagg.encoding` for the fixed-point
encoding and its error bound, and :mod:`common.secagg.schema` for the stage messages.
The site side is ``client/secagg_mod.py`` (a Flower mod); the coordinator side is
``server/secagg.py`` (a ``Grid`` wrapper).
The settings (``secagg.*`` keys) are the run config's group
:class:`common.config.SecAggConfig` (``run.secagg``).
"""

from common.secagg.errors import (
    ClipRangeError,
    SecAggAbortedError,
    SecAggError,
    SecAggProtocolError,
)

__all__ = [
    "ClipRangeError",
    "SecAggAbortedError",
    "SecAggError",
    "SecAggProtocolError",
]
