"""A site's error reply as a Flower message: a reply code and its fixed reason.

The codes and their fixed reasons live in :mod:`common.replies` (no Flower import there,
so the minimal ingestion install can name them); this module wraps them in the
``flwr.app.Message`` that answers a coordinator's message. The relay ClientApp, the
site worker, its service and its handlers all build error replies here.
"""

from __future__ import annotations

from flwr.app import Error, Message

from common.replies import ReplyCode, fixed_reason

__all__ = ["error_message"]


def error_message(msg: Message, code: ReplyCode, detail: str = "") -> Message:
    """Return the error reply to ``msg``.

    Parameters
    ----------
    msg : flwr.app.Message
        The coordinator's message being answered (``reply_to``).
    code : ReplyCode
        Why the site does not answer with content.
    detail : str
        A name from the code's fixed vocabulary (a policy rule, a record category, a
        protocol stage), or ``""``; never exception text, values or paths.

    Returns
    -------
    flwr.app.Message
        An error reply with ``code`` and :func:`common.replies.fixed_reason`.

    Raises
    ------
    ValueError
        If ``detail`` is not in the code's vocabulary (:func:`common.replies.fixed_reason`).
    """
    return Message(Error(code=int(code), reason=fixed_reason(code, detail)), reply_to=msg)
