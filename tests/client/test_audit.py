"""The site's hash-chained audit log, and ``medfed site audit verify/show``."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from client.privacy import PrivacyLedger, ledger_key
from client.privacy_cli import register as register_budget
from client.site.audit import GENESIS, AuditChainError, AuditError, AuditLog, canonical
from client.site_cli import register as register_site


def _log_with(tmp_path, n=4):
    audit = AuditLog(tmp_path)
    for i in range(n):
        audit.append("request", kind="train", number=i)
    return audit


def _lines(tmp_path):
    return (tmp_path / "audit.jsonl").read_bytes().splitlines(keepends=True)


def test_entries_chain_by_sha256_of_canonical_json(tmp_path):
    # Execute
    first = AuditLog(tmp_path).append("request", kind="train", images=3)
    second = AuditLog(tmp_path).append("refusal", rule="max-epsilon")
    # Assert: hand-checkable chain
    body = {k: v for k, v in first.items() if k != "hash"}
    assert first["hash"] == hashlib.sha256(canonical(body)).hexdigest()
    assert first["seq"] == 0 and first["prev"] == GENESIS
    assert second["seq"] == 1 and second["prev"] == first["hash"]
    assert first["time"].endswith("+00:00")
    audit = AuditLog(tmp_path)
    assert audit.verify() == 2
    assert audit.entries() == [first, second]
    assert audit.last("request") == first and audit.last("nothing") is None
    head = json.loads((tmp_path / "audit.head").read_text())
    assert head == {"seq": 1, "hash": second["hash"]}


def test_empty_or_missing_log_verifies_with_no_entries(tmp_path):
    assert AuditLog(tmp_path / "absent").verify() == 0


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"seq": 5}, "reserved"),
        ({"hash": "x"}, "reserved"),
        ({"where": Path("/data/patient-1.dcm")}, "a path"),
        ({"blob": b"raw"}, "bytes"),
        ({"loss": float("nan")}, "not plain JSON"),
    ],
)
def test_entries_refuse_paths_bytes_nan_and_reserved_fields(tmp_path, fields, match):
    with pytest.raises(AuditError, match=match):
        AuditLog(tmp_path).append("request", **fields)
    assert AuditLog(tmp_path).verify() == 0


def test_event_name_must_be_kebab_case(tmp_path):
    with pytest.raises(AuditError, match="kebab-case"):
        AuditLog(tmp_path).append("Train Request")


def _edit(tmp_path):
    lines = _lines(tmp_path)
    entry = json.loads(lines[1])
    entry["number"] = 99
    lines[1] = canonical(entry) + b"\n"
    return lines, 1, "edited"


def _reorder(tmp_path):
    lines = _lines(tmp_path)
    lines[1], lines[2] = lines[2], lines[1]
    return lines, 1, "reordered"


def _delete_middle(tmp_path):
    lines = _lines(tmp_path)
    del lines[2]
    return lines, 2, "deleted"


def _partial_last_line(tmp_path):
    lines = _lines(tmp_path)
    lines[3] = lines[3][:20]
    return lines, 3, "partial last line"


def _cut_tail(tmp_path):
    return _lines(tmp_path)[:2], 2, "cut off"


def _not_json(tmp_path):
    lines = _lines(tmp_path)
    lines[0] = b"{oops\n"
    return lines, 0, "not valid JSON"


@pytest.mark.parametrize(
    "damage", [_edit, _reorder, _delete_middle, _partial_last_line, _cut_tail, _not_json]
)
def test_verify_names_the_first_bad_entry(tmp_path, damage):
    # Prepare
    _log_with(tmp_path)
    lines, index, reason = damage(tmp_path)
    # Execute
    (tmp_path / "audit.jsonl").write_bytes(b"".join(lines))
    # Assert
    with pytest.raises(AuditChainError, match=reason) as info:
        AuditLog(tmp_path).verify()
    assert info.value.index == index
    assert f"entry {index}" in str(info.value)
    assert str(tmp_path) not in str(info.value)


def test_deleted_log_is_caught_by_its_head(tmp_path):
    _log_with(tmp_path)
    (tmp_path / "audit.jsonl").unlink()
    with pytest.raises(AuditChainError, match="cut off") as info:
        AuditLog(tmp_path).verify()
    assert info.value.index == 0


def test_nothing_is_appended_to_a_broken_chain(tmp_path):
    _log_with(tmp_path)
    lines, _, _ = _edit(tmp_path)
    (tmp_path / "audit.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(AuditChainError):
        AuditLog(tmp_path).append("request", kind="train")
    assert len(_lines(tmp_path)) == 4


def test_appends_from_concurrent_processes_keep_one_chain(tmp_path):
    # Prepare: two real processes, 25 appends each
    code = (
        "import sys; from pathlib import Path; from client.site.audit import AuditLog; "
        "log = AuditLog(Path(sys.argv[1]))\n"
        "for i in range(25): log.append('request', worker=sys.argv[2], number=i)"
    )
    # Execute
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), name]) for name in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    # Assert
    audit = AuditLog(tmp_path)
    assert audit.verify() == 50
    assert sorted(e["worker"] for e in audit.entries()) == ["a"] * 25 + ["b"] * 25


# ------------------------------------------------------------------------ the CLI
@pytest.fixture
def cli():
    app = typer.Typer()
    register_site(app)
    register_budget(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _anchored_ledger(state_dir, writes=2):
    """A ledger written ``writes`` times (each write anchored in the audit log)."""
    ledger = PrivacyLedger(state_dir)
    key = ledger_key("fp0123")
    for i in range(writes):
        ledger.update(key, {"history": [[1.0, 0.1, 10 * (i + 1)]], "plans": {}, "delta": 1e-3})
    return key


def test_cli_verify_passes_an_intact_log_and_ledger(tmp_path, cli):
    _log_with(tmp_path)
    _anchored_ledger(tmp_path)
    result = cli("site", "audit", "verify", tmp_path)
    assert result.exit_code == 0, result.output
    assert "intact: 6 entries" in result.output


@pytest.mark.parametrize("damage", [_edit, _reorder, _delete_middle, _partial_last_line, _cut_tail])
def test_cli_verify_fails_naming_the_first_bad_entry(tmp_path, cli, damage):
    _log_with(tmp_path)
    lines, index, _ = damage(tmp_path)
    (tmp_path / "audit.jsonl").write_bytes(b"".join(lines))
    result = cli("site", "audit", "verify", tmp_path)
    assert result.exit_code == 1
    assert f"entry {index}" in result.output
    assert "Traceback" not in result.output


def test_cli_verify_catches_a_rolled_back_ledger(tmp_path, cli):
    # Prepare: keep the signed ledger after write 1, then write again, then restore it
    ledger = PrivacyLedger(tmp_path)
    key = ledger_key("fp0123")
    ledger.update(key, {"history": [[1.0, 0.1, 10]], "plans": {}})
    old = (tmp_path / "privacy-ledger.json").read_bytes()
    ledger.update(key, {"history": [[1.0, 0.1, 20]], "plans": {}})
    (tmp_path / "privacy-ledger.json").write_bytes(old)
    # Execute
    result = cli("site", "audit", "verify", tmp_path)
    # Assert
    assert result.exit_code == 1
    assert "rolled back" in result.output


def test_cli_show_prints_a_table_of_entries(tmp_path, cli):
    _log_with(tmp_path, n=2)
    key = _anchored_ledger(tmp_path, writes=1)
    result = cli("site", "audit", "show", tmp_path)
    assert result.exit_code == 0, result.output
    for text in ("seq", "event", "request", "kind=train", "ledger", f"dataset={key}"):
        assert text in result.output
    assert "chain intact: 3 entries" in result.output


def test_cli_missing_state_dir_is_a_usage_error(tmp_path, cli):
    result = cli("site", "audit", "verify", tmp_path / "nope")
    assert result.exit_code == 2 and "no state dir" in result.output


def test_cli_budget_reset_needs_confirmation_then_reanchors(tmp_path, cli):
    # Prepare: a deleted ledger, which the site refuses
    key = _anchored_ledger(tmp_path)
    (tmp_path / "privacy-ledger.json").unlink()
    assert cli("budget", "show", tmp_path).exit_code == 2
    # Execute + Assert: refused without the confirmation, done with it
    assert cli("budget", "reset", tmp_path, "--dataset", key).exit_code == 2
    result = cli("budget", "reset", tmp_path, "--dataset", key, "--yes-i-understand")
    assert result.exit_code == 0, result.output
    assert cli("budget", "show", tmp_path).exit_code == 0
    assert cli("site", "audit", "verify", tmp_path).exit_code == 0
    assert AuditLog(tmp_path).last("ledger-reset")["dataset"] == key
