"""One exception tree for medfed (DESIGN section 9, rule 3), and its one code table.

Every medfed error subclasses :class:`MedfedError` and, where it refines a builtin, that
builtin too, so callers can catch either ``MedfedError`` or e.g. ``ValueError``.

Codes. An error becomes a number in two places: the exit status of a ``medfed`` command
(:class:`ExitCode`) and the code of a site's error reply to the coordinator
(:class:`common.replies.ReplyCode`, 1001 and up, clear of Flower's own
``flwr.common.constant.ErrorCode``, which medfed uses only for what Flower means by it:
a node that went away, a ClientApp that raised). :data:`CODES` maps each error class to
both, and :func:`exit_code` / :func:`reply_code` read it for an exception (its nearest
class in the table). The classes are named, not imported, so the table stays here while
the site's errors (privacy ledger, policy, audit log) live in ``client``.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable

from common.replies import ReplyCode


class ExitCode(enum.IntEnum):
    """Exit status of every ``medfed`` command."""

    #: The command did what was asked.
    OK = 0
    #: The command ran and found a problem: PHI findings, a broken audit chain, no
    #: usable image in an export.
    FINDINGS = 1
    #: The command refused its input (bad option, file, config or state; what typer/click
    #: use for usage errors too): any :class:`MedfedError` not listed otherwise.
    USAGE = 2
    #: Stopped by Ctrl-C (128 + SIGINT).
    INTERRUPTED = 130


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


#: Error class name -> (exit status of a command that stops on it, code of a site's
#: error reply refusing a request with it). An exception takes the entry of the first
#: class of its MRO found here; anything else is ``(USAGE, INTERNAL)`` if a
#: :class:`MedfedError`, else unexpected (``INTERNAL``; a command lets it raise).
CODES: dict[str, tuple[ExitCode, ReplyCode]] = {
    "MedfedError": (ExitCode.USAGE, ReplyCode.INTERNAL),
    "ConfigError": (ExitCode.USAGE, ReplyCode.BAD_REQUEST),
    "DataError": (ExitCode.USAGE, ReplyCode.DATA),
    "ModelError": (ExitCode.USAGE, ReplyCode.DATA),
    "SecAggError": (ExitCode.USAGE, ReplyCode.SECAGG),  # common/secagg/errors.py
    "PrivacyError": (ExitCode.USAGE, ReplyCode.PRIVACY_LEDGER),  # client/privacy.py
    "PrivacyBudgetError": (ExitCode.USAGE, ReplyCode.PRIVACY_BUDGET),  # client/privacy.py
    "PolicyRefusal": (ExitCode.USAGE, ReplyCode.POLICY),  # client/site/policy.py
    "AuditChainError": (ExitCode.FINDINGS, ReplyCode.INTERNAL),  # client/site/audit.py
}


def _codes(exc: BaseException) -> tuple[ExitCode, ReplyCode]:
    for cls in type(exc).__mro__:
        if cls.__name__ in CODES and (cls is MedfedError or issubclass(cls, MedfedError)):
            return CODES[cls.__name__]
    return ExitCode.USAGE, ReplyCode.INTERNAL


def exit_code(exc: BaseException) -> ExitCode:
    """Exit status of a command that stops on ``exc`` (see :data:`CODES`)."""
    return _codes(exc)[0]


def reply_code(exc: BaseException) -> ReplyCode:
    """Code of a site's error reply refusing a request with ``exc`` (see :data:`CODES`)."""
    return _codes(exc)[1]
