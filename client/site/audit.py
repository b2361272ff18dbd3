"""The site's audit log: append-only, hash-chained JSONL in the site's state dir.

Every request, decision, refusal, epsilon spent and what left the site is one line of
``<state-dir>/audit.jsonl`` (DESIGN section 5). Each entry is a JSON object with

- ``seq``: 0, 1, 2, ... (its position in the log),
- ``time``: UTC, ISO 8601, seconds,
- ``event``: a short kebab-case name (``ledger``, ``ledger-reset``, ``train``, ...),
- the event's fields, exactly as the caller passed them,
- ``prev``: the ``hash`` of the entry before (64 zeros, :data:`GENESIS`, for entry 0),
- ``hash``: hex SHA-256 of the entry's canonical JSON without ``hash`` (keys sorted,
  no whitespace, ASCII, no NaN).

Editing, reordering, inserting or deleting an entry breaks the chain at that entry. A
small head file (``audit.head``: the last ``seq`` and ``hash``, replaced atomically after
every append) catches a log whose tail was cut off, which the chain alone cannot show.
Appends from several processes are serialised by an exclusive ``flock`` on
``.audit.lock``; readers take it shared, so they never see a half-written line.

What the chain does and does not prove: it is keyless (SHA-256, not a MAC), so it shows
accidental damage and any edit made without rewriting every later entry and the head.
Someone who can write the state dir can still replace the log, its head and the ledger
together with a consistent older copy of all three (or delete the whole state dir). Keep
the state dir on storage only the site worker's account can write, and ship a copy of
each head (the site's log records it at INFO) to an append-only store if that matters.

Privacy rule: an entry holds only the field values its caller passes. Callers must pass
no PHI (no patient identifiers, names, dates of birth, DICOM header values), no file
names and no paths: use counts, codes, hashes and dataset fingerprints. :meth:`AuditLog.append`
refuses ``pathlib`` paths and bytes; it cannot recognise PHI in a string, so that part
of the rule is the caller's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import Any

from common.errors import MedfedError
from common.fsutil import atomic_write_bytes, open_private, private_mkdir

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
HEAD_FILE = "audit.head"
LOCK_FILE = ".audit.lock"
GENESIS = "0" * 64
RESERVED = frozenset({"seq", "time", "event", "prev", "hash"})
_EVENT = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_FIELD = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class AuditError(MedfedError, ValueError):
    """An audit entry cannot be written (bad event name or field), or the log is unusable."""


class AuditChainError(AuditError):
    """The audit log fails verification; ``index`` is the first bad entry (0-based).

    Parameters
    ----------
    index : int
        Position of the first entry that is wrong or missing.
    reason : str
        What is wrong with it (edited, reordered, truncated, ...).
    """

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"audit log entry {index}: {reason}")
        self.index = index
        self.reason = reason


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, ASCII, NaN/Infinity refused.

    Raises
    ------
    AuditError
        If ``obj`` holds something JSON cannot encode exactly (a path, bytes, NaN).
    """

    def refuse(value: Any) -> Any:
        kind = "a path" if isinstance(value, PurePath) else type(value).__name__
        raise TypeError(f"{kind} cannot go into the audit log")

    try:
        text = json.dumps(
            obj,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
            default=refuse,
        )
    except (TypeError, ValueError) as exc:
        raise AuditError(f"audit entry is not plain JSON: {exc}") from None
    return text.encode("ascii")


def entry_hash(entry: dict[str, Any]) -> str:
    """Hex SHA-256 of ``entry``'s canonical JSON without its ``hash`` field."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


class AuditLog:
    """The hash-chained audit log of one site, ``<state_dir>/audit.jsonl``.

    Parameters
    ----------
    state_dir : pathlib.Path
        The site's state directory; created on the first :meth:`append`.

    Notes
    -----
    Entries carry only the fields callers pass: never PHI, file names or paths (see the
    module docstring). Error messages name entries by position, never by path.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / AUDIT_FILE
        self.head_path = self.state_dir / HEAD_FILE
        self.lock_path = self.state_dir / LOCK_FILE

    # ------------------------------------------------------------------- locking
    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        if not exclusive and not self.state_dir.is_dir():
            yield  # nothing to read, nothing to lock
            return
        private_mkdir(self.state_dir)  # 0700 whatever the umask
        try:
            fd = open_private(self.lock_path, os.O_RDWR)
        except PermissionError:
            if exclusive:
                raise
            fd = os.open(self.lock_path, os.O_RDONLY)  # a reader without write access
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # ------------------------------------------------------------------ reading
    def _parse(self, raw: bytes, *, check: bool) -> list[dict[str, Any]]:
        """Parse the log's bytes; with ``check``, verify chain and head too."""
        lines = raw.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        entries: list[dict[str, Any]] = []
        prev = GENESIS
        for i, line in enumerate(complete):
            try:
                entry = json.loads(line)
            except ValueError:
                if not check:
                    continue
                raise AuditChainError(i, "is not valid JSON (edited or damaged)") from None
            if not isinstance(entry, dict) or not entry.keys() >= RESERVED:
                if not check:
                    continue
                raise AuditChainError(i, f"lacks one of the fields {sorted(RESERVED)} (edited)")
            if check:
                if entry["hash"] != entry_hash(entry):
                    raise AuditChainError(i, "its hash does not match its content (edited)")
                if entry["seq"] != i:
                    raise AuditChainError(
                        i,
                        f"has seq {entry['seq']!r} at position {i} (entries reordered, "
                        "deleted or inserted)",
                    )
                if entry["prev"] != prev:
                    raise AuditChainError(
                        i,
                        "does not chain to the entry before it (entries reordered, "
                        "deleted or inserted)",
                    )
            prev = entry["hash"]
            entries.append(entry)
        if check and tail:
            raise AuditChainError(
                len(complete),
                "is a partial last line (the log was truncated or a write was interrupted)",
            )
        if check:
            self._check_head(entries)
        return entries

    def _check_head(self, entries: list[dict[str, Any]]) -> None:
        if not self.head_path.exists():
            if entries:
                raise AuditChainError(
                    len(entries) - 1,
                    "the head file is missing, so a cut-off tail cannot be ruled out",
                )
            return
        try:
            head = json.loads(self.head_path.read_bytes())
            seq, digest = int(head["seq"]), str(head["hash"])
        except (ValueError, KeyError, TypeError):
            raise AuditChainError(len(entries), "the head file is damaged") from None
        if len(entries) <= seq:
            raise AuditChainError(
                len(entries),
                f"is missing: the head records {seq + 1} entries but the log "
                f"holds {len(entries)} (its tail was cut off, or the log was deleted)",
            )
        if entries[seq]["hash"] != digest:
            raise AuditChainError(seq, "does not match the head file (the log was replaced)")

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def entries(self, *, verify: bool = True) -> list[dict[str, Any]]:
        """Return the log's entries, oldest first.

        Parameters
        ----------
        verify : bool
            Verify the chain and the head first (default). False: return whatever lines
            parse as entries, for showing a damaged log.

        Raises
        ------
        AuditChainError
            With ``verify``, if the log fails verification (see :meth:`verify`).
        """
        with self._locked(exclusive=False):
            return self._parse(self._read(), check=verify)

    def verify(self) -> int:
        """Verify the whole chain and the head; return the number of entries.

        Raises
        ------
        AuditChainError
            Naming the first bad entry: edited (hash mismatch or not JSON), reordered,
            deleted or inserted (``seq``/``prev`` mismatch), a partial last line, a tail
            cut off (fewer entries than the head records) or a replaced log.
        """
        return len(self.entries())

    def last(self, event: str) -> dict[str, Any] | None:
        """Return the newest verified entry of ``event``, or None.

        Raises
        ------
        AuditChainError
            If the log fails verification.
        """
        entries: list[dict[str, Any]] = self.entries()
        return next((e for e in reversed(entries) if e["event"] == event), None)

    # ------------------------------------------------------------------ writing
    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one entry and return it (with ``seq``, ``time``, ``prev``, ``hash``).

        Takes an exclusive lock, verifies the existing chain, appends the line with
        ``O_APPEND`` and ``fsync``, then replaces the head file atomically.

        Parameters
        ----------
        event : str
            Kebab-case event name, e.g. ``"ledger"``.
        **fields
            The event's fields: plain JSON values (str, int, finite float, bool, None,
            lists, dicts). No PHI, no file names, no paths.

        Raises
        ------
        AuditError
            If the event name or a field name is invalid or reserved, or a value is not
            plain JSON (a path, bytes, NaN).
        AuditChainError
            If the existing log fails verification: nothing is appended to a broken chain.
        """
        if not _EVENT.match(event):
            raise AuditError(f"audit event {event!r} must be kebab-case ([a-z][a-z0-9-]*)")
        for name in fields:
            if name in RESERVED or not _FIELD.match(name):
                raise AuditError(
                    f"audit field {name!r} is reserved or not a lower-case identifier; "
                    f"reserved: {sorted(RESERVED)}"
                )
        with self._locked(exclusive=True):
            entries = self._parse(self._read(), check=True)
            entry: dict[str, Any] = {
                **fields,
                "seq": len(entries),
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
                "event": event,
                "prev": entries[-1]["hash"] if entries else GENESIS,
            }
            entry["hash"] = entry_hash(entry)
            line = canonical(entry) + b"\n"
            fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)  # created 0600
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._write_head(entry)
        log.info("audit %s seq=%d hash=%s", event, entry["seq"], entry["hash"])
        return entry

    def _write_head(self, entry: dict[str, Any]) -> None:
        atomic_write_bytes(self.head_path, canonical({"seq": entry["seq"], "hash": entry["hash"]}))
