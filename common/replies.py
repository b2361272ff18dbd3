"""Error replies a site sends: one code per kind of refusal, each with a fixed reason.

A site's error reply leaves the hospital, so it carries only a code and a reason built
from fixed text plus, at most, a name from a fixed vocabulary (a policy rule, a record
category, a protocol stage). Never exception text, values, file names or paths: those
go to the site's own log and audit log (issue 12, item 4).

The coordinator reads the code to record why a site did not take part in a round.
Codes start at 1001 to stay clear of Flower's own ``flwr.common.constant.ErrorCode``.
"""

from __future__ import annotations

import enum
import re

__all__ = ["ReplyCode", "fixed_reason", "is_site_refusal", "parse_reason"]


class ReplyCode(enum.IntEnum):
    """Error codes of site replies (``flwr.app.Error.code``)."""

    #: The round would take the site past its epsilon ceiling.
    PRIVACY_BUDGET = 1001
    #: The privacy ledger is unreadable, tampered, rolled back or missing.
    PRIVACY_LEDGER = 1002
    #: The request is outside the site policy (the reason names the rule).
    POLICY = 1003
    #: The reply would carry something the egress rules do not allow.
    EGRESS = 1004
    #: The request is outside the site API (unknown records, fields or message type).
    BAD_REQUEST = 1005
    #: The site dataset does not fit the run (task, model, classes).
    DATA = 1006
    #: A secure-aggregation message out of order, for another round, or malformed.
    SECAGG = 1007
    #: The site failed to process the request; details stay in the site's log.
    INTERNAL = 1008
    #: The site worker is not reachable from the relay ClientApp.
    WORKER_UNAVAILABLE = 1009


_REASONS: dict[ReplyCode, str] = {
    ReplyCode.PRIVACY_BUDGET: "privacy budget: the round would exceed this site's epsilon ceiling",
    ReplyCode.PRIVACY_LEDGER: "privacy ledger: the site cannot account for privacy and refuses",
    ReplyCode.POLICY: "site policy refuses the request",
    ReplyCode.EGRESS: "egress rules refuse the reply",
    ReplyCode.BAD_REQUEST: "request outside the site API",
    ReplyCode.DATA: "the site dataset does not fit the run",
    ReplyCode.SECAGG: "secure aggregation message refused",
    ReplyCode.INTERNAL: "the site could not process the request (see the site's log)",
    ReplyCode.WORKER_UNAVAILABLE: "the site worker is not reachable",
}

#: What a detail may look like: a name from a fixed vocabulary, never free text.
_DETAIL = re.compile(r"^[a-z0-9][a-z0-9.\-]{0,63}$")


def fixed_reason(code: ReplyCode, detail: str = "") -> str:
    """Return the reason text of an error reply: fixed text, and a vocabulary name.

    Parameters
    ----------
    code : ReplyCode
        The kind of refusal.
    detail : str
        Optional name from a fixed vocabulary (e.g. the policy rule ``require-dp`` or
        the stage ``share-keys``): lower-case letters, digits, ``.`` and ``-``, at most
        64 characters.

    Returns
    -------
    str
        ``"<fixed text>"`` or ``"<fixed text>: <detail>"``.

    Raises
    ------
    ValueError
        If ``detail`` is not a vocabulary name (it might carry a value or a path).
    """
    base = _REASONS[ReplyCode(code)]
    if not detail:
        return base
    if not _DETAIL.match(detail):
        raise ValueError(
            "an error reply's detail must be a vocabulary name (lower-case letters, digits, "
            "'.' and '-', at most 64 characters), never free text"
        )
    return f"{base}: {detail}"


def parse_reason(code: int, reason: str) -> str | None:
    """Return the detail of a fixed reason, or None if ``reason`` is not one.

    Parameters
    ----------
    code : int
        An error reply's code.
    reason : str
        Its reason.

    Returns
    -------
    str or None
        ``""`` for ``fixed_reason(code)``, ``detail`` for ``fixed_reason(code, detail)``,
        None for anything else (an unknown code, free text, a detail that is not a
        vocabulary name).
    """
    try:
        known = ReplyCode(code)
    except ValueError:
        return None
    base = fixed_reason(known)
    if reason == base:
        return ""
    detail = reason.removeprefix(f"{base}: ")
    if detail == reason or not _DETAIL.match(detail):
        return None
    return detail


def is_site_refusal(code: int) -> bool:
    """Return True if ``code`` is one of medfed's site reply codes."""
    return code in ReplyCode._value2member_map_
