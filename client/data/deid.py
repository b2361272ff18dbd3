"""De-identification check: what in a DICOM export could identify a patient.

Reports, per attribute and count (never the values), what the DICOM PS3.15 Annex E
Basic Application Level Confidentiality Profile would remove or replace and is still
present and non-empty, at any depth: top level, file meta information, inside sequence
items (nested paths such as ``RequestAttributesSequence[0] > RequestedProcedureID``),
inside private sequences, and inside sequences encoded with VR UN. Also reported:
private data elements by block (the profile removes them, action X),
``BurnedInAnnotation = YES`` (PS3.3 C.7.6.1.1.5: identifying text drawn into the
pixels), elements whose value could not be read (they cannot be shown to be clean),
and identifiers in file or folder names (UID-, date- or record-number-like tokens, or
the file's own PatientID / PatientName / AccessionNumber).

The attribute list is not typed here: it is Table E.1-1 of DICOM PS3.15 **2026c**
as carried by the ``dicom-anonymizer`` package (KitwareMedical), module
``dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c``: tag tuples grouped
by action code (D, Z, X, U, Z/D, X/Z, X/D, X/Z/D, X/Z/U*), generated from the standard's
table by the package's scraper, plus the repeating-group rows Curve Data (50xx,xxxx),
Overlay Data (60xx,3000) and Overlay Comments (60xx,4000) as masks. The table's
private-attribute row ((gggg,eeee) with gggg odd) is applied as "every private element".
Rows whose tag pydicom 3.0 does not name yet are reported by tag number, e.g.
``(0010,0011)``.

UIDs (Annex E action U, "replace with a non-identifying UID") cannot be told apart from
replacement UIDs by looking at them; they (and the X/Z/U* sequences, kept with replaced
UIDs) are reported unless the data set declares ``PatientIdentityRemoved = YES``
(PS3.15 E.1.1, what a de-identifier must set).

Imports pydicom and the attribute table only (no torch, no flwr): runs on a minimal
hospital install.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _annex_e
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.values import convert_SQ

from client.data.dicom_read import (
    UnusableInputError,
    discover_files,
    load_bytes,
    parse_dataset,
    quiet_pydicom_logs,
)

__all__ = [
    "ANNEX_E_ACTIONS",
    "ANNEX_E_EDITION",
    "ANNEX_E_KEYWORDS",
    "ANNEX_E_SOURCE",
    "CHECK_VERSION",
    "DeidReport",
    "FileFindings",
    "annex_e_action",
    "check_dataset",
    "check_directory",
    "element_label",
    "filename_findings",
    "identifier_tokens",
    "path_shape",
    "private_block",
]

#: Edition of DICOM PS3.15 whose Table E.1-1 the attribute list comes from.
ANNEX_E_EDITION = "2026c"


def _table_source() -> str:
    try:
        version = metadata.version("dicom-anonymizer")
    except metadata.PackageNotFoundError:  # pragma: no cover - imported above
        version = "?"
    return f"dicom-anonymizer {version} ({_annex_e.__name__})"


#: The standard, table and edition the attribute list comes from, and the package that
#: carries it (shown by ``medfed deid-check`` and stored in the ingest summary).
ANNEX_E_SOURCE = (
    f"DICOM PS3.15 {ANNEX_E_EDITION} Annex E Table E.1-1 "
    "(Basic Application Level Confidentiality Profile), from " + _table_source()
)

#: Version of what :func:`check_dataset` finds; part of the ingest cache key, so a
#: changed check never reuses findings cached by an older one.
CHECK_VERSION = f"deid-check-2/PS3.15-{ANNEX_E_EDITION}"

_ACTION_OF_GROUP: dict[str, str] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


def _load_table() -> tuple[dict[int, str], tuple[tuple[int, int, str], ...]]:
    """Read Table E.1-1 as ``{tag: action}`` plus ``(value, mask, action)`` repeater rows."""
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for group_name, action in _ACTION_OF_GROUP.items():
        for row in getattr(_annex_e, group_name):
            if len(row) == 2:
                exact[(row[0] << 16) | row[1]] = action
            else:  # (group, element, group mask, element mask): 50xx / 60xx rows
                group, elem, gmask, emask = row
                masked.append(((group << 16) | elem, (gmask << 16) | emask, action))
    return exact, tuple(masked)


#: PS3.15 Table E.1-1 (:data:`ANNEX_E_EDITION`): tag -> action code (D, Z, X, U, ...).
ANNEX_E_ACTIONS, _ANNEX_E_MASKED = _load_table()

#: pydicom keywords of the :data:`ANNEX_E_ACTIONS` tags that pydicom's dictionary names.
ANNEX_E_KEYWORDS: frozenset[str] = frozenset(
    kw for tag in ANNEX_E_ACTIONS if (kw := keyword_for_tag(tag))
)

# Action U ("replace with a non-identifying UID") and X/Z/U* (sequences kept with their
# UIDs replaced): not told apart from replacements once PatientIdentityRemoved = YES.
_REPLACED_WHEN_REMOVED = frozenset(("U", "X/Z/U*"))

_MAX_DEPTH = 32  # deeper nesting is pathological; reported as unreadable
_ITEM_TAG_LE = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item, little endian (PS3.5 7.5)
_INDEX = re.compile(r"\[\d+\]")

_FILENAME_PATTERNS: dict[str, re.Pattern[str]] = {
    "uid_like": re.compile(r"(?<![\d.])\d+(?:\.\d+){3,}"),
    "date_like": re.compile(
        r"(?<!\d)(?:19|20)\d\d[-_.]?(?:0[1-9]|1[0-2])[-_.]?(?:0[1-9]|[12]\d|3[01])(?!\d)"
    ),
    "long_number": re.compile(r"\d{7,}"),
}
_TOKEN_SPLIT = re.compile(r"[^0-9a-z]+")


def annex_e_action(tag: int) -> str | None:
    """Return the action code of ``tag`` in Table E.1-1 (``None`` when not listed).

    Repeating groups (Curve Data 50xx, Overlay Data / Comments 60xx) are matched by mask.
    Private tags are not in this table: every private element counts separately.
    """
    action = ANNEX_E_ACTIONS.get(tag)
    if action is not None:
        return action
    for value, mask, masked_action in _ANNEX_E_MASKED:
        if tag & mask == value:
            return masked_action
    return None


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def element_label(tag: int) -> str:
    """Name an element in a finding: its keyword, else its tag number; never a value.

    Private elements are always named by tag number (``(0009,1010)``): their block is
    given by :func:`private_block`, the creator's name (a value) never.
    """
    if BaseTag(tag).is_private:
        return _tag_text(tag)
    return keyword_for_tag(tag) or _tag_text(tag)


def private_block(tag: int) -> str:
    """Name the private block of a private tag by tag numbers only (PS3.5 7.8.1).

    ``(0009,10xx)`` for (0009,1010) and for its creator element (0009,0010).
    """
    group, elem = tag >> 16, tag & 0xFFFF
    if 0x0010 <= elem <= 0x00FF:  # a private creator reserves block (gggg,XXxx)
        return f"({group:04X},{elem:02X}xx)"
    if elem >= 0x1000:
        return f"({group:04X},{elem >> 8:02X}xx)"
    return _tag_text(tag)  # outside any block (group length, or not valid)


def path_shape(path: str) -> str:
    """Replace a nested path's item indices by ``[*]`` (the key files are counted by)."""
    return _INDEX.sub("[*]", path)


@dataclass
class FileFindings:
    """Identifying content of one file (attribute names, paths and counts, no values).

    Attributes
    ----------
    top_level : set of str
        Table E.1-1 attributes present and non-empty in the data set itself or in its
        file meta information (keyword, or tag number when pydicom has no keyword).
    nested : dict[str, int]
        Table E.1-1 attributes present and non-empty inside sequence items: for each
        path shape (:func:`path_shape`), the first path found, with item indices, e.g.
        ``RequestAttributesSequence[0] > RequestedProcedureID`` or, inside a private
        sequence, ``(0009,1010)[0] > PatientName`` -> number of items it occurs in.
    private_elements : int
        Private data elements at any depth, private creators included.
    private_blocks : set of str
        Their blocks, e.g. ``(0009,10xx)`` (tag numbers; the creator names are values).
    unreadable : int
        Elements whose value could not be read (a sequence that does not parse, or an
        attribute of the table whose value raised): they cannot be shown to be clean.
    burned_in_annotation : bool
        ``BurnedInAnnotation`` is ``YES``.
    filename : set of str
        Kinds of identifier found in the file's relative path.

    """

    top_level: set[str] = field(default_factory=set)
    nested: dict[str, int] = field(default_factory=dict)
    private_elements: int = 0
    private_blocks: set[str] = field(default_factory=set)
    unreadable: int = 0
    burned_in_annotation: bool = False
    filename: set[str] = field(default_factory=set)

    @property
    def nested_attributes(self) -> set[str]:
        """Attributes found inside sequence items (the last step of each nested path)."""
        return {p.rsplit(" > ", 1)[-1] for p in self.nested}

    @property
    def attributes(self) -> set[str]:
        """Table E.1-1 attributes present at any depth."""
        return self.top_level | self.nested_attributes

    @property
    def only_nested(self) -> set[str]:
        """Attributes present only inside sequence items (missed by a top-level check)."""
        return self.nested_attributes - self.top_level

    @property
    def has_findings(self) -> bool:
        """Whether anything identifying (or impossible to check) was found."""
        return bool(
            self.top_level
            or self.nested
            or self.private_elements
            or self.unreadable
            or self.burned_in_annotation
            or self.filename
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (attribute names, paths and counts only)."""
        return {
            "top_level": sorted(self.top_level),
            "nested": dict(sorted(self.nested.items())),
            "private_elements": self.private_elements,
            "private_blocks": sorted(self.private_blocks),
            "unreadable": self.unreadable,
            "burned_in_annotation": self.burned_in_annotation,
            "filename": sorted(self.filename),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileFindings:
        """Inverse of :meth:`to_dict`."""
        return cls(
            top_level=set(d.get("top_level", ())),
            nested={str(k): int(v) for k, v in d.get("nested", {}).items()},
            private_elements=int(d.get("private_elements", 0)),
            private_blocks=set(d.get("private_blocks", ())),
            unreadable=int(d.get("unreadable", 0)),
            burned_in_annotation=bool(d.get("burned_in_annotation", False)),
            filename=set(d.get("filename", ())),
        )


def _non_empty(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bytes | bytearray):
        return bool(bytes(value).strip(b" \x00"))
    if isinstance(value, str):
        return bool(value.strip(" \x00"))
    try:
        return len(value) > 0
    except TypeError:
        return True


def _yes(ds: Dataset, keyword: str) -> bool:
    try:
        return str(ds.get(keyword, "") or "").strip().upper() == "YES"
    except Exception:
        return False


def check_dataset(ds: Dataset) -> FileFindings:
    """Table E.1-1 attributes, private tags and burned-in annotation of one data set.

    Every element is visited, at every depth, as :meth:`pydicom.dataset.Dataset.walk`
    visits them (sorted by tag; a sequence's items are entered after the sequence),
    with three additions: the item path is tracked; the file meta information is
    visited too; and a value with VR UN (or an unknown private tag read with implicit
    VR) that starts with an Item tag is parsed as the sequence it is (Implicit VR
    Little Endian, PS3.5 6.2.2) instead of being left as raw bytes. Sequences that
    pydicom has not parsed yet (read with a defined length, or undefined length) are
    parsed through ``Dataset.__getitem__``, as ``walk`` does. Other values are not
    converted: their raw bytes are checked for emptiness, so the check is cheap, a
    malformed value cannot stop it, and nothing later code validates is converted
    early. One element that cannot be read is counted in ``unreadable`` and the walk
    goes on (``walk`` itself would stop at the first one).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A parsed data set.

    Returns
    -------
    FileFindings
        With ``filename`` empty (see :func:`filename_findings`).

    Notes
    -----
    Source of the attribute list: DICOM PS3.15 2026c, Annex E, Table E.1-1 (see
    :data:`ANNEX_E_SOURCE`). Nothing raised by a malformed element escapes; the
    findings hold tag keywords, tag numbers and item indices, never a value.

    """
    found = FileFindings()
    shapes: dict[str, list[Any]] = {}  # path shape -> [first indexed path, occurrences]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings may quote header values
        removed = _yes(ds, "PatientIdentityRemoved")
        meta = getattr(ds, "file_meta", None)
        if isinstance(meta, Dataset):
            _walk(meta, found, shapes, removed=removed, path="", shape="", depth=0)
        _walk(ds, found, shapes, removed=removed, path="", shape="", depth=0)
        found.burned_in_annotation = _yes(ds, "BurnedInAnnotation")
    found.nested = {first: n for first, n in shapes.values()}
    return found


def _sequence_items(ds: Dataset, tag: BaseTag, vr: str | None, value: Any) -> Any:
    """Return the items of a sequence element, or ``None`` when it is no sequence.

    Raises whatever pydicom raises on a sequence that does not parse.
    """
    if vr == "SQ":
        if isinstance(value, bytes | bytearray) or value is None:
            return ds[tag].value  # parses a not yet converted sequence, as walk() does
        return value
    if (
        vr in (None, "UN")
        and isinstance(value, bytes | bytearray)
        and bytes(value[:4]) == _ITEM_TAG_LE
    ):
        try:  # PS3.5 6.2.2: a sequence with VR UN is encoded Implicit VR Little Endian
            return convert_SQ(bytes(value), True, True)
        except Exception:
            return None  # opaque bytes that merely start like an item
    return None


def _walk(
    ds: Dataset,
    found: FileFindings,
    shapes: dict[str, list[Any]],
    *,
    removed: bool,
    path: str,
    shape: str,
    depth: int,
) -> None:
    if depth > _MAX_DEPTH:
        found.unreadable += 1
        return
    for tag in sorted(ds.keys()):
        try:
            elem = ds.get_item(tag)
            vr = elem.VR
            if vr is None:  # Implicit VR, not yet converted: the dictionary's VR
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    vr = None
            value = elem.value
        except Exception:
            found.unreadable += 1
            continue
        label = element_label(tag)
        if tag.is_private:
            found.private_elements += 1
            found.private_blocks.add(private_block(tag))
            action = None
        else:
            action = annex_e_action(int(tag))
        try:
            items = _sequence_items(ds, tag, vr, value)
        except Exception:
            found.unreadable += 1  # a sequence that does not parse cannot be checked
            items = None
            if action is not None:
                _record(found, shapes, label, path, shape, depth)
            continue
        if action is not None and not (removed and action in _REPLACED_WHEN_REMOVED):
            try:
                present = _non_empty(items if items is not None else value)
            except Exception:
                present = True  # unreadable value: assume the worst
            if present:
                _record(found, shapes, label, path, shape, depth)
        for i, item in enumerate(items or ()):
            if isinstance(item, Dataset):
                _walk(
                    item,
                    found,
                    shapes,
                    removed=removed,
                    path=f"{path}{label}[{i}] > ",
                    shape=f"{shape}{label}[*] > ",
                    depth=depth + 1,
                )


def _record(
    found: FileFindings,
    shapes: dict[str, list[Any]],
    label: str,
    path: str,
    shape: str,
    depth: int,
) -> None:
    if depth == 0:
        found.top_level.add(label)
        return
    entry = shapes.setdefault(shape + label, [path + label, 0])
    entry[1] += 1


def identifier_tokens(ds: Dataset) -> set[str]:
    """Lower-case tokens of PatientID, PatientName and AccessionNumber (>= 3 chars).

    Used only to look for the same tokens in file names; identifying: hash or discard.
    """
    tokens: set[str] = set()
    with warnings.catch_warnings():
        # pydicom's validation warnings quote header values, which may be PHI.
        warnings.simplefilter("ignore")
        for kw in ("PatientID", "PatientName", "AccessionNumber", "OtherPatientIDs"):
            try:
                value = ds.get(kw, None)
            except Exception:
                continue
            if value is None:
                continue
            text = str(value).lower()
            tokens.update(t for t in _TOKEN_SPLIT.split(text) if len(t) >= 3)
            if len(text.strip()) >= 3:
                tokens.add(text.strip())
    return tokens


def _hash_token(token: str, salt: bytes) -> str:
    return hashlib.sha256(salt + token.encode("utf-8", "surrogateescape")).hexdigest()


def hash_tokens(tokens: Iterable[str], salt: bytes) -> set[str]:
    """Salted SHA-256 of each token (to cache :func:`identifier_tokens` safely)."""
    return {_hash_token(t, salt) for t in tokens}


def filename_findings(
    rel_path: str | PurePosixPath, tokens: Iterable[str] = (), *, salt: bytes | None = None
) -> set[str]:
    """Kinds of identifier in a relative path (the values are never returned).

    Parameters
    ----------
    rel_path : str or PurePosixPath
        Path relative to the export root (the root itself is chosen by the user).
    tokens : Iterable[str]
        :func:`identifier_tokens` of the file, or their salted hashes when ``salt``.
    salt : bytes, optional
        Salt the ``tokens`` were hashed with.

    Returns
    -------
    set of str
        Subset of ``{"uid_like", "date_like", "long_number", "header_identifier"}``.

    """
    text = str(rel_path).lower()
    kinds = {kind for kind, rx in _FILENAME_PATTERNS.items() if rx.search(text)}
    tokens = set(tokens)
    if tokens:
        parts = {t for t in _TOKEN_SPLIT.split(text) if t}
        parts.update(PurePosixPath(text).parts)
        parts.update(PurePosixPath(p).stem for p in PurePosixPath(text).parts)
        if salt is not None:
            parts = hash_tokens(parts, salt)
        if parts & tokens:
            kinds.add("header_identifier")
    return kinds


@dataclass
class DeidReport:
    """Counts over a directory: per attribute, path or block, the number of files.

    Attributes
    ----------
    files_seen : int
        Files found under the directory.
    files_checked : int
        Files that parsed as DICOM and were checked.
    files_with_findings : int
        Checked files with at least one finding.
    files_only_nested : int
        Checked files with at least one Table E.1-1 attribute that is present only
        inside sequence items (what a check of the top level alone misses).
    attributes : collections.Counter
        Attribute -> number of files where it is present and non-empty at any depth.
    nested_attributes : collections.Counter
        Attribute -> number of files where it is present inside a sequence item.
    only_nested : collections.Counter
        Attribute -> number of files where it is present only inside sequence items.
    nested_paths : collections.Counter
        Path shape (item indices as ``[*]``, see :func:`path_shape`) -> number of files.
    private_tag_files, private_elements : int
        Files with private tags; private elements in total (any depth).
    private_blocks : collections.Counter
        Private block (e.g. ``(0029,10xx)``) -> number of files.
    unreadable_files : int
        Files with elements that could not be read (and so not checked).
    burned_in_annotation : int
        Files declaring ``BurnedInAnnotation = YES``.
    filename : collections.Counter
        Identifier kind in file names -> number of files.

    """

    files_seen: int = 0
    files_checked: int = 0
    files_with_findings: int = 0
    files_only_nested: int = 0
    attributes: Counter[str] = field(default_factory=Counter)
    nested_attributes: Counter[str] = field(default_factory=Counter)
    only_nested: Counter[str] = field(default_factory=Counter)
    nested_paths: Counter[str] = field(default_factory=Counter)
    private_tag_files: int = 0
    private_elements: int = 0
    private_blocks: Counter[str] = field(default_factory=Counter)
    unreadable_files: int = 0
    burned_in_annotation: int = 0
    filename: Counter[str] = field(default_factory=Counter)

    def add(self, f: FileFindings) -> None:
        """Count one checked file."""
        self.files_checked += 1
        self.files_with_findings += int(f.has_findings)
        only_nested = f.only_nested
        self.files_only_nested += int(bool(only_nested))
        self.attributes.update(f.attributes)
        self.nested_attributes.update(f.nested_attributes)
        self.only_nested.update(only_nested)
        self.nested_paths.update({path_shape(p) for p in f.nested})
        self.private_tag_files += int(f.private_elements > 0)
        self.private_elements += f.private_elements
        self.private_blocks.update(f.private_blocks)
        self.unreadable_files += int(f.unreadable > 0)
        self.burned_in_annotation += int(f.burned_in_annotation)
        self.filename.update(f.filename)

    @property
    def has_findings(self) -> bool:
        """Whether any checked file could identify a patient."""
        return self.files_with_findings > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (names, paths and counts, never values)."""
        return {
            "profile": ANNEX_E_SOURCE,
            "files_seen": self.files_seen,
            "files_checked": self.files_checked,
            "files_with_findings": self.files_with_findings,
            "files_only_nested": self.files_only_nested,
            "attributes": dict(sorted(self.attributes.items())),
            "nested_attributes": dict(sorted(self.nested_attributes.items())),
            "only_nested": dict(sorted(self.only_nested.items())),
            "nested_paths": dict(sorted(self.nested_paths.items())),
            "private_tag_files": self.private_tag_files,
            "private_elements": self.private_elements,
            "private_blocks": dict(sorted(self.private_blocks.items())),
            "unreadable_files": self.unreadable_files,
            "burned_in_annotation": self.burned_in_annotation,
            "filename_identifiers": dict(sorted(self.filename.items())),
        }


def check_directory(root: str | os.PathLike[str]) -> DeidReport:
    """Check every file under ``root`` (found by content, as ``medfed ingest`` does).

    Files that are not DICOM or cannot be parsed are counted in ``files_seen`` only.
    """
    base = Path(root)
    report = DeidReport()
    with quiet_pydicom_logs():
        for path in discover_files(base):
            _check_file(base, path, report)
    return report


def _check_file(base: Path, path: Path, report: DeidReport) -> None:
    report.files_seen += 1
    try:
        ds = parse_dataset(load_bytes(path))
    except UnusableInputError:
        return
    findings = check_dataset(ds)
    findings.filename = filename_findings(path.relative_to(base).as_posix(), identifier_tokens(ds))
    report.add(findings)
