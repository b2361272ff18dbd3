"""The one code table: each error class maps to one exit status and one reply code."""

from __future__ import annotations

import pytest

from client.privacy import PrivacyBudgetError, PrivacyError
from client.site.audit import AuditChainError, AuditError
from client.site.policy import PolicyRefusal
from common.errors import (
    CODES,
    ChecksumError,
    ConfigError,
    DataError,
    ExitCode,
    MedfedError,
    ModelError,
    exit_code,
    reply_code,
)
from common.replies import ReplyCode
from common.secagg.errors import SecAggError, SecAggProtocolError

CLASSES = [
    MedfedError,
    ConfigError,
    DataError,
    ModelError,
    SecAggError,
    PrivacyError,
    PrivacyBudgetError,
    PolicyRefusal,
    AuditChainError,
]


def test_every_name_in_the_table_is_a_medfed_error_class():
    assert sorted(c.__name__ for c in CLASSES) == sorted(CODES)
    assert all(issubclass(c, MedfedError) for c in CLASSES)


@pytest.mark.parametrize(
    ("exc", "exit_status", "reply"),
    [
        (ConfigError("x"), ExitCode.USAGE, ReplyCode.BAD_REQUEST),
        (ChecksumError("x"), ExitCode.USAGE, ReplyCode.DATA),  # via DataError
        (ModelError("x"), ExitCode.USAGE, ReplyCode.DATA),
        (PrivacyBudgetError("x"), ExitCode.USAGE, ReplyCode.PRIVACY_BUDGET),
        (PrivacyError("x"), ExitCode.USAGE, ReplyCode.PRIVACY_LEDGER),
        (PolicyRefusal("x", rule="require-dp"), ExitCode.USAGE, ReplyCode.POLICY),
        (SecAggProtocolError("x"), ExitCode.USAGE, ReplyCode.SECAGG),
        (AuditChainError(3, "edited"), ExitCode.FINDINGS, ReplyCode.INTERNAL),
        (AuditError("x"), ExitCode.USAGE, ReplyCode.INTERNAL),  # via MedfedError
        (RuntimeError("x"), ExitCode.USAGE, ReplyCode.INTERNAL),  # not medfed's
    ],
)
def test_codes_of_an_exception_come_from_its_nearest_class(exc, exit_status, reply):
    assert exit_code(exc) == exit_status
    assert reply_code(exc) == reply
