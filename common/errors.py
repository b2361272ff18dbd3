"""One exception tree for medfed (DESIGN section 9, rule 3).

Every medfed error subclasses :class:`MedfedError` and, where it refines a builtin, that
builtin too, so callers can catch either ``MedfedError`` or e.g. ``ValueError``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MedfedError(Exception):
    """Base class of every error medfed raises on purpose."""


class ConfigError(MedfedError, ValueError):
    """A configuration value is missing, of the wrong type, out of range or unknown."""


class DataError(MedfedError, ValueError):
    """Input data is missing, malformed or inconsistent with what was asked."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file or directory that medfed needs does not exist."""


class ModelError(MedfedError, KeyError):
    """Unknown model name, or arrays that do not fit the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ChecksumError(DataError):
    """A downloaded or cached file does not match its published checksum."""


class FederationError(MedfedError, RuntimeError):
    """The federation cannot proceed (too few sites, a failed round, a dead SuperLink)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return a " Did you mean 'x'?" hint for a misspelt name, or an empty string.

    Parameters
    ----------
    name : str
        The name the user gave.
    choices : Iterable[str]
        The valid names.

    Returns
    -------
    str
        A sentence starting with a space, or ``""`` when nothing is close
        (``difflib.get_close_matches`` with cutoff 0.6).

    """
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
