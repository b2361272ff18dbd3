"""Fixed reasons of site error replies (common/replies.py)."""

import pytest

from common.replies import ReplyCode, fixed_reason, parse_reason


def test_a_fixed_reason_parses_back_to_its_detail():
    assert parse_reason(ReplyCode.POLICY, fixed_reason(ReplyCode.POLICY, "require-dp")) == (
        "require-dp"
    )
    assert parse_reason(ReplyCode.INTERNAL, fixed_reason(ReplyCode.INTERNAL)) == ""


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (ReplyCode.POLICY, "site policy refuses the request: /var/lib/medfed/ledger"),
        (ReplyCode.POLICY, "ledger at /var/lib/medfed is broken"),
        (ReplyCode.EGRESS, fixed_reason(ReplyCode.POLICY, "require-dp")),  # another code's
        (2, "secagg: something"),  # not a medfed code
    ],
)
def test_free_text_or_a_path_is_not_a_fixed_reason(code, reason):
    assert parse_reason(code, reason) is None
