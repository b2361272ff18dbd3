"""Exceptions of the secure-aggregation protocol (all :class:`~common.errors.MedfedError`)."""

from __future__ import annotations

from common.errors import MedfedError


class SecAggError(MedfedError, RuntimeError):
    """Base class of every secure-aggregation error."""


class SecAggProtocolError(SecAggError, ValueError):
    """A protocol message is malformed, out of order or inconsistent.

    On the server the sender is excluded from the round (never trusted); on a site the
    message is refused with an error reply.
    """


class SecAggAbortedError(SecAggError):
    """Too few sites survived a stage to finish the round without revealing an input.

    The round fails loudly (logged at ERROR, recorded in ``secagg.jsonl`` and as a
    failure of every sampled site in ``rounds.jsonl``); the global model is not updated.
    """


class ClipRangeError(SecAggError, ValueError):
    """A site's model delta exceeds the configured fixed-point range ``secagg.clip-range``."""
