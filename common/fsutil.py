"""Safe filesystem writes: private modes, atomic replacement, "replace only what we wrote".

Three rules every medfed writer follows (issue 16, items 1 and 6):

- **Private whatever the umask.** Site datasets, the ingest cache, the privacy ledger,
  the audit log and the site's state are patient data or guard it: files are created
  ``0600`` and directories ``0700`` (:func:`private_mkdir`, :func:`create_private`,
  :func:`open_private`). ``os.open``/``mkdir`` modes are masked by the umask, so the
  mode is set again with ``fchmod``/``chmod`` after creation. Existing files and
  directories keep the mode their owner gave them.
- **Atomic.** A file is written under a temporary name in its directory, flushed,
  ``fsync``-ed and renamed over the target (:func:`atomic_write`). A directory is
  assembled under a temporary sibling name and swapped in (:func:`write_dir_atomically`):
  the old directory is renamed aside, the new one renamed into place, then the old one
  is deleted; if the second rename fails the old one is put back.
- **Replace only what we can prove we wrote.** An existing output is replaced only with
  an explicit ``--force`` *and* when a caller-supplied proof says medfed wrote it
  (:func:`check_replaceable`): a format-tagged file (a site dataset's
  ``manifest.json``), or the :data:`MARKER` file medfed puts in every run and
  experiment directory it creates. An output must also neither contain nor lie inside
  the command's inputs (:func:`check_disjoint`). Refusals raise
  :class:`UnsafeOutputError` saying what is wrong and what to do; nothing is deleted.

This module imports the standard library only (plus :mod:`common.errors`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Literal, TypeVar

from common.errors import DataError

log = logging.getLogger(__name__)

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
#: Name of the ownership marker medfed writes into the directories it creates.
MARKER = ".medfed-owner"
MARKER_FORMAT = "medfed-owner"
MARKER_VERSION = 1

T = TypeVar("T")
#: ``why_not_ours(path)``: ``None`` when ``path`` is provably medfed's, else the reason.
Proof = Callable[[Path], str | None]
Existing = Literal["absent", "empty", "ours"]


class UnsafeOutputError(DataError):
    """An output path would overwrite or delete something medfed cannot prove it wrote."""


# ----------------------------------------------------------------- private modes
def private_mkdir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and its missing parents as ``0700`` directories, whatever the umask.

    Directories that already exist keep their mode.

    Parameters
    ----------
    path : path
        The directory.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    OSError
        If a component cannot be created (e.g. it exists and is a file).

    """
    p = Path(path)
    missing: list[Path] = []
    cur = p
    while not cur.is_dir():
        missing.append(cur)
        if cur.parent == cur:
            break
        cur = cur.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # created meanwhile by someone else: not ours to chmod
        d.chmod(PRIVATE_DIR)
    return p


def open_private(path: str | os.PathLike[str], flags: int = os.O_WRONLY) -> int:
    """Open ``path`` with ``flags``; a file this call creates is ``0600`` whatever the umask.

    Parameters
    ----------
    path : path
        The file.
    flags : int
        ``os.O_*`` access flags (``O_CREAT`` is implied; with ``O_EXCL`` an existing
        file is an error).

    Returns
    -------
    int
        An open file descriptor (close it).

    Raises
    ------
    OSError
        As ``os.open`` (``FileExistsError`` with ``O_EXCL``).

    """
    flags |= os.O_CLOEXEC
    while True:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
        else:
            try:
                os.fchmod(fd, PRIVATE_FILE)
            except BaseException:
                os.close(fd)
                raise
            return fd
        try:
            return os.open(path, flags & ~os.O_CREAT)  # exists: keep its mode
        except FileNotFoundError:
            continue  # removed between the two calls: create it


@contextlib.contextmanager
def create_private(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[BinaryIO]:
    """Create a new ``0600`` file and yield it open for binary writing.

    Parameters
    ----------
    path : path
        Must not exist.
    durable : bool
        ``fsync`` the file before closing it.

    Yields
    ------
    BinaryIO
        The open file.

    Raises
    ------
    FileExistsError
        If ``path`` exists.

    """
    fd = open_private(path, os.O_WRONLY | os.O_EXCL)
    with os.fdopen(fd, "wb") as fh:
        yield fh
        if durable:
            fh.flush()
            os.fsync(fh.fileno())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync`` a directory, so a rename or a new file in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], object],
    *,
    durable: bool = True,
    mode: int | None = PRIVATE_FILE,
    dir_fd: int | None = None,
) -> None:
    """Replace ``path`` atomically with what ``write(fh)`` writes: medfed's one file writer.

    The content goes to a new temporary file ``.NAME.tmp-HEX`` in the same directory,
    created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a planted file or link is never
    opened), flushed, ``fsync``-ed and renamed over ``path`` with ``os.replace`` (a rename
    replaces a link, it does not follow it); then the directory is ``fsync``-ed, so the
    rename survives a crash. A reader sees the old file or the new one, never a part; on
    any error the temporary file is removed and the target is unchanged.

    Parameters
    ----------
    path : path
        The target file; with ``dir_fd``, its name inside that directory.
    write : callable
        Called once with the temporary file open for binary writing.
    durable : bool
        ``fsync`` the file and its directory (``False`` only for caches that can be
        rebuilt).
    mode : int or None
        Permission bits of the new file, set with ``fchmod`` whatever the umask
        (default ``0600``; a missing parent directory is then created ``0700``). ``None``:
        ``0666`` less the umask, as ``open()`` would (missing parents are created with
        the umask too).
    dir_fd : int or None
        An open directory descriptor to write in (e.g. a key directory opened with
        ``O_NOFOLLOW``); the directory must exist and ``path`` is a plain name.

    Raises
    ------
    OSError
        If the file cannot be written; the target is then unchanged.

    """
    target = Path(path)
    if dir_fd is None:
        if mode is not None and not mode & 0o077:
            private_mkdir(target.parent)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
        dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        dfd = dir_fd
    tmp = f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o666 if mode is None else mode, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as fh:
                if mode is not None:
                    os.fchmod(fh.fileno(), mode)  # the umask may have cleared bits
                write(fh)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
            os.replace(tmp, target.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        if durable:
            os.fsync(dfd)
    finally:
        if dir_fd is None:
            os.close(dfd)


def atomic_write_bytes(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    durable: bool = True,
    mode: int | None = PRIVATE_FILE,
) -> None:
    """Replace ``path`` atomically with ``data`` (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(data), durable=durable, mode=mode)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (``hashlib.file_digest``)."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# ----------------------------------------------------------------- ownership
def write_marker(directory: str | os.PathLike[str], kind: str) -> None:
    """Mark ``directory`` as a medfed ``kind`` (e.g. ``"run"``): proof that medfed made it.

    Write it only into a directory this process created (or proved medfed's).
    """
    body = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "kind": kind}
    text = json.dumps(body, sort_keys=True) + "\n"
    atomic_write_bytes(Path(directory) / MARKER, text.encode(), durable=False)


def marker_kind(directory: str | os.PathLike[str]) -> str | None:
    """Return the ``kind`` in ``directory``'s :data:`MARKER`, or ``None`` if it has none."""
    p = Path(directory) / MARKER
    try:
        if p.is_symlink() or not p.is_file() or p.stat().st_size > 4096:
            return None
        body = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("format") != MARKER_FORMAT:
        return None
    kind = body.get("kind")
    return kind if isinstance(kind, str) else None


def check_disjoint(
    out: str | os.PathLike[str],
    protected: Mapping[str, str | os.PathLike[str] | None],
    *,
    flag: str = "--out",
) -> None:
    """Refuse an output that is, contains, or lies inside one of the command's inputs.

    Paths are compared after resolving symbolic links (``Path.resolve``).

    Parameters
    ----------
    out : path
        The output directory.
    protected : Mapping[str, path or None]
        What each input is called in the message (e.g. ``"DICOM export"``) -> its path;
        ``None`` entries are skipped.
    flag : str
        How the output is named in the message (the CLI option).

    Raises
    ------
    UnsafeOutputError
        If ``out`` equals, contains or lies inside a protected path.

    """
    o = Path(out).resolve()
    hint = (
        f"Choose a new {flag} directory that neither contains nor lies inside the command's "
        "inputs (e.g. a folder next to them); nothing was written or deleted."
    )
    for name, raw in protected.items():
        if raw is None:
            continue
        p = Path(raw).resolve()
        if o == p:
            raise UnsafeOutputError(f"{flag} {out} is the {name} itself. {hint}")
        if p.is_relative_to(o):
            raise UnsafeOutputError(
                f"the {name} ({raw}) is inside {flag} {out}: writing there would replace it. {hint}"
            )
        if o.is_relative_to(p):
            raise UnsafeOutputError(f"{flag} {out} is inside the {name} ({raw}). {hint}")


def check_replaceable(
    out: str | os.PathLike[str],
    *,
    overwrite: bool,
    why_not_ours: Proof,
    what: str,
    flag: str = "--force",
) -> Existing:
    """Say whether ``out`` may be written: absent, an empty directory, or provably ours.

    Parameters
    ----------
    out : path
        The output directory.
    overwrite : bool
        The user asked to replace an existing output (``--force``).
    why_not_ours : callable
        ``why_not_ours(out)`` returns ``None`` when ``out`` is provably a ``what``
        medfed wrote, else the reason it is not.
    what : str
        What the output is, for messages (e.g. ``"site dataset"``).
    flag : str
        The option that allows replacing, for messages.

    Returns
    -------
    {"absent", "empty", "ours"}
        ``"ours"``: an existing output that ``overwrite`` allows replacing.

    Raises
    ------
    UnsafeOutputError
        If ``out`` is a symbolic link or a file, exists without ``overwrite``, or
        cannot be proved medfed's.

    """
    p = Path(out)
    if p.is_symlink():
        raise UnsafeOutputError(
            f"{p} is a symbolic link; medfed writes a {what} only to a real directory. "
            "Give the link's target or a new directory."
        )
    if not p.exists():
        return "absent"
    if p.is_dir() and not any(p.iterdir()):
        return "empty"  # nothing to lose
    if not overwrite:
        raise UnsafeOutputError(
            f"{what} {p} already exists. Pass {flag} to replace it (only a {what} medfed "
            "wrote can be replaced), or choose a new directory."
        )
    why = why_not_ours(p)
    if why is not None:
        raise UnsafeOutputError(
            f"refusing to replace {p}: {why}. {flag} replaces only a {what} medfed wrote, "
            f"and nothing was deleted. Choose a new or empty directory for the {what}."
        )
    return "ours"


def _aside_name(path: Path, tag: str, *, hidden: bool) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    prefix = "." if hidden else ""
    return path.with_name(f"{prefix}{path.name}.{tag}-{stamp}-{uuid.uuid4().hex[:6]}")


def swap_dir(
    new: str | os.PathLike[str], out: str | os.PathLike[str], *, why_not_ours: Proof
) -> None:
    """Move directory ``new`` to ``out``, replacing a provably-ours ``out`` atomically.

    Sequence: re-check the proof, rename ``out`` aside (a hidden sibling), rename ``new``
    to ``out`` (on failure the old one is renamed back), ``fsync`` the parent, then
    delete the old directory. A crash leaves the old directory whole, either at ``out``
    or at its hidden ``.<name>.old-*`` sibling.

    Parameters
    ----------
    new : path
        The finished directory, a sibling of ``out`` (same filesystem).
    out : path
        The target.
    why_not_ours : callable
        As in :func:`check_replaceable`; checked again just before the swap.

    Raises
    ------
    UnsafeOutputError
        If ``out`` exists and cannot be proved medfed's (``new`` is left in place).
    OSError
        If a rename fails (``out`` is then as before).

    """
    src, dst = Path(new), Path(out)
    if dst.is_symlink() or (dst.exists() and not (dst.is_dir() and not any(dst.iterdir()))):
        why = "it is a symbolic link" if dst.is_symlink() else why_not_ours(dst)
        if why is not None:
            raise UnsafeOutputError(f"refusing to replace {dst}: {why}; nothing was deleted")
        old = _aside_name(dst, "old", hidden=True)
        dst.rename(old)
        try:
            src.rename(dst)
        except BaseException:
            old.rename(dst)
            raise
        fsync_dir(dst.parent)
        try:
            shutil.rmtree(old)
        except OSError as exc:
            log.warning("the replaced copy at %s could not be deleted: %s", old, exc)
        return
    src.replace(dst)  # absent, or an empty directory (rename(2) replaces it)
    fsync_dir(dst.parent)


def write_dir_atomically(
    out: str | os.PathLike[str],
    fill: Callable[[Path], T],
    *,
    overwrite: bool,
    why_not_ours: Proof,
    what: str,
    flag: str = "--force",
) -> T:
    """Build a directory with ``fill(tmp)`` in a private sibling, then swap it in.

    Parameters
    ----------
    out : path
        The target directory.
    fill : callable
        Writes the content into the (empty, ``0700``) directory it is given.
    overwrite, why_not_ours, what, flag
        As in :func:`check_replaceable`.

    Returns
    -------
    T
        What ``fill`` returned.

    Raises
    ------
    UnsafeOutputError
        As :func:`check_replaceable` (before ``fill`` runs).

    """
    target = Path(out)
    check_replaceable(target, overwrite=overwrite, why_not_ours=why_not_ours, what=what, flag=flag)
    private_mkdir(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(PRIVATE_DIR)
        result = fill(tmp)
        swap_dir(tmp, target, why_not_ours=why_not_ours)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def set_aside(
    out: str | os.PathLike[str],
    *,
    overwrite: bool,
    why_not_ours: Proof,
    what: str,
    flag: str = "--force",
) -> Path | None:
    """Free ``out`` for an output written in place (a run): move a provably-ours one aside.

    For outputs that cannot be assembled elsewhere and swapped in, because their own
    path is recorded inside them. The previous output is renamed to a visible sibling
    ``<name>.replaced-<time>-<id>``; delete it with :func:`discard` once the new output
    is complete, or keep it if the new one fails.

    Parameters
    ----------
    out : path
        The output directory.
    overwrite, why_not_ours, what, flag
        As in :func:`check_replaceable`.

    Returns
    -------
    pathlib.Path or None
        Where the previous output now is; ``None`` if there was none.

    Raises
    ------
    UnsafeOutputError
        As :func:`check_replaceable`.

    """
    target = Path(out)
    state = check_replaceable(
        target, overwrite=overwrite, why_not_ours=why_not_ours, what=what, flag=flag
    )
    if state != "ours":
        return None
    aside = _aside_name(target, "replaced", hidden=False)
    target.rename(aside)
    log.warning("%s %s moved aside to %s until the new one is complete", what, target, aside)
    return aside


def discard(aside: Path | None) -> None:
    """Delete a previous output that :func:`set_aside` moved aside (``None``: nothing)."""
    if aside is None:
        return
    shutil.rmtree(aside)
    log.info("deleted the replaced copy %s", aside)
