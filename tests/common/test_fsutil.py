"""common/fsutil.py: private modes whatever the umask, atomic writes, replace only our own."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.errors import DataError
from common.fsutil import (
    MARKER,
    UnsafeOutputError,
    atomic_write,
    atomic_write_bytes,
    check_disjoint,
    check_replaceable,
    discard,
    marker_kind,
    open_private,
    private_mkdir,
    set_aside,
    swap_dir,
    write_dir_atomically,
    write_marker,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o000, 0o022, 0o277], ids=["umask000", "umask022", "umask277"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def ours(path: Path) -> str | None:
    return None if (path / "OURS").is_file() or not any(path.iterdir()) else "not ours"


def test_private_dirs_and_files_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    # Execute
    d = private_mkdir(tmp_path / "a" / "b")
    atomic_write_bytes(d / "f.bin", b"x")
    atomic_write_bytes(tmp_path / "new" / "g.bin", b"y")  # parent created too
    fd = open_private(d / "log", os.O_WRONLY | os.O_APPEND)
    os.close(fd)
    # Assert: exact modes, not merely "at most"
    for p in (tmp_path / "a", d, tmp_path / "new"):
        assert mode(p) == 0o700, (p, oct(mode(p)))
    for p in (d / "f.bin", tmp_path / "new" / "g.bin", d / "log"):
        assert mode(p) == 0o600, (p, oct(mode(p)))


def test_existing_paths_keep_their_mode(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir(mode=0o750)
    (tmp_path / "shared").chmod(0o750)
    (tmp_path / "shared" / "log").write_text("")
    (tmp_path / "shared" / "log").chmod(0o640)
    private_mkdir(tmp_path / "shared")
    os.close(open_private(tmp_path / "shared" / "log", os.O_WRONLY | os.O_APPEND))
    assert mode(tmp_path / "shared") == 0o750
    assert mode(tmp_path / "shared" / "log") == 0o640


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write_bytes(target, b"old")

    def boom(fh: object) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_marker_round_trip(tmp_path: Path) -> None:
    assert marker_kind(tmp_path) is None
    write_marker(tmp_path, "run")
    assert marker_kind(tmp_path) == "run"
    (tmp_path / MARKER).write_text('{"format": "something-else", "kind": "run"}')
    assert marker_kind(tmp_path) is None


def test_check_disjoint_resolves_symlinks(tmp_path: Path) -> None:
    export = tmp_path / "export"
    (export / "sub").mkdir(parents=True)
    labels = tmp_path / "labels.csv"
    labels.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(export)
    inputs = {"DICOM export": export, "labels file": labels}
    for out, words in [
        (export, "is the DICOM export itself"),
        (link, "is the DICOM export itself"),  # a symlink to it is it
        (tmp_path, "is inside --out"),  # its parent contains it
        (export / "sub" / "site", "is inside the DICOM export"),
        (link / "site", "is inside the DICOM export"),
    ]:
        with pytest.raises(UnsafeOutputError, match=words):
            check_disjoint(out, inputs)
    with pytest.raises(UnsafeOutputError, match=r"labels file .* is inside --out"):
        check_disjoint(tmp_path, {"labels file": labels})
    check_disjoint(tmp_path / "site", inputs)  # a sibling is fine
    assert issubclass(UnsafeOutputError, DataError)


def test_check_replaceable(tmp_path: Path) -> None:
    def check(p: Path, *, overwrite: bool) -> str:
        return check_replaceable(p, overwrite=overwrite, why_not_ours=ours, what="thing")

    assert check(tmp_path / "none", overwrite=False) == "absent"
    (tmp_path / "empty").mkdir()
    assert check(tmp_path / "empty", overwrite=False) == "empty"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "OURS").write_text("")
    with pytest.raises(UnsafeOutputError, match=r"already exists\. Pass --force"):
        check(mine, overwrite=False)
    assert check(mine, overwrite=True) == "ours"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data").write_text("precious")
    with pytest.raises(UnsafeOutputError, match=r"refusing to replace .*not ours"):
        check(foreign, overwrite=True)
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(UnsafeOutputError, match="symbolic link"):
        check(tmp_path / "link", overwrite=True)


def test_write_dir_atomically_replaces_ours_and_restores_on_a_failed_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"

    def fill(content: str) -> Callable[[Path], str]:
        def _fill(d: Path) -> str:
            (d / "OURS").write_text("")
            (d / "data").write_text(content)
            return content

        return _fill

    assert write_dir_atomically(out, fill("v1"), overwrite=False, why_not_ours=ours, what="t")
    assert mode(out) == 0o700
    # a failing rename of the new directory puts the old one back
    real_rename = os.rename

    def rename(src: object, dst: object) -> None:
        if ".tmp-" in Path(str(src)).name:
            raise OSError("power cut")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="power cut"):
        write_dir_atomically(out, fill("v2"), overwrite=True, why_not_ours=ours, what="t")
    monkeypatch.undo()
    assert (out / "data").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp, no aside
    write_dir_atomically(out, fill("v3"), overwrite=True, why_not_ours=ours, what="t")
    assert (out / "data").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_swap_dir_refuses_a_foreign_target(tmp_path: Path) -> None:
    new = tmp_path / "new"
    new.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_text("keep")
    with pytest.raises(UnsafeOutputError):
        swap_dir(new, out, why_not_ours=ours)
    assert (out / "precious").read_text() == "keep" and new.is_dir()


def test_set_aside_then_discard(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "OURS").write_text("")
    with pytest.raises(UnsafeOutputError, match="already exists"):
        set_aside(run, overwrite=False, why_not_ours=ours, what="run directory")
    aside = set_aside(run, overwrite=True, why_not_ours=ours, what="run directory")
    assert aside is not None and (aside / "OURS").is_file() and not run.exists()
    discard(aside)
    assert not aside.exists()
    assert set_aside(run, overwrite=True, why_not_ours=ours, what="run directory") is None
