"""Shared assertion for CLI tests: a command refused its input with a clear error."""

from __future__ import annotations

from click.testing import Result


def assert_refused(result: Result, *phrases: str) -> None:
    """A clear error: non-zero exit, no exception escaped, each phrase in the message."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for phrase in phrases:
        assert phrase in text, text
