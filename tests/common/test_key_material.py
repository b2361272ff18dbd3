"""Key material is written only where the command owns the folder (issue 16, item 5).

Every test plants what an attacker with write access to a shared folder would plant (a
symbolic link at the old fixed temporary name, at the destination, as the folder
itself) or passes a name that escapes the folder, runs the real command through typer,
and checks that the file outside is untouched and the command either refused with a
clear error or wrote safely.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import typer
from click.testing import Result
from typer.testing import CliRunner

from client.site_cli import register as register_site
from common.tls import (
    CA_KEY,
    NODE_KEY,
    TLSError,
    check_site_name,
    load_private_key,
    write_dev_certificates,
    write_node_keys,
)
from server.cli import register as register_certs
from tests.cli_errors import assert_refused

runner = CliRunner()
SECRET = b"outside file that must never change\n"


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Keep sub-command names even with few commands registered."""

    register_certs(app)
    register_site(app)
    return app


def _run(*args: str) -> Result:
    return runner.invoke(_app(), list(args))


def _owned_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    target = tmp_path / "outside" / "victim.txt"
    target.parent.mkdir()
    target.write_bytes(SECRET)
    return target


def _no_temp_files(folder: Path) -> None:
    """No random-named temporary file (``.<name>.<hex>.tmp``) is left behind."""
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("command", "key_name"),
    [(["certs"], CA_KEY), (["site", "keys"], NODE_KEY)],
    ids=["certs", "site-keys"],
)
def test_symlink_at_the_old_fixed_temp_name_is_never_written_through(
    tmp_path: Path, outside: Path, command: list[str], key_name: str
) -> None:
    # Prepare: the link the old code opened with O_CREAT | O_TRUNC and wrote the key into
    out = _owned_dir(tmp_path / "keys")
    planted = out / f"{key_name}.tmp"
    planted.symlink_to(outside)
    # Execute
    result = _run(*command, str(out))
    # Assert: written safely next to the link; the file outside never saw the key
    assert result.exit_code == 0, result.output
    assert outside.read_bytes() == SECRET
    assert planted.is_symlink() and planted.readlink() == outside
    key = out / key_name
    assert not key.is_symlink() and key.is_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    load_private_key(key)
    _no_temp_files(out)


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("dangling", [False, True], ids=["to-file", "dangling"])
def test_symlink_at_the_destination_is_refused_and_its_target_untouched(
    tmp_path: Path, outside: Path, force: bool, dangling: bool
) -> None:
    # Prepare
    out = _owned_dir(tmp_path / "certs")
    target = outside.parent / "not-yet.txt" if dangling else outside
    (out / CA_KEY).symlink_to(target)
    # Execute
    result = _run("certs", str(out), *(["--force"] if force else []))
    # Assert: nothing written, the link and its target as they were
    assert_refused(result, "symbolic link", "refusing to write key material")
    assert outside.read_bytes() == SECRET
    assert not (outside.parent / "not-yet.txt").exists()
    assert (out / CA_KEY).is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [CA_KEY]


def test_site_name_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "a" / "b" / "certs"
    # Execute
    result = _run("certs", str(out), "--site", "../../x")
    # Assert: a clear error, nothing written anywhere
    assert_refused(result, "--site '../../x' is not a valid SuperNode name", "no '/' and no '..'")
    assert not (tmp_path / "a" / "x.key").exists()
    assert not out.exists()


@pytest.mark.parametrize(
    "name",
    ["..", "../x", "a/b", "/abs", ".hidden", "a..b", "", "x" * 64, "a\nb", "ca", "server"],
)
def test_invalid_or_clashing_site_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(TLSError, match="--site"):
        write_dev_certificates(tmp_path / "c", hosts=[], ips=[], sites=[name])
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("name", ["supernode-1", "node_2.example", "A", "x" * 63])
def test_valid_site_names_pass(name: str) -> None:
    assert check_site_name(name) == name


def test_a_new_folder_is_created_0700_with_private_keys_0600(tmp_path: Path) -> None:
    # Execute
    result = _run("certs", str(tmp_path / "new" / "certs"), "--site", "supernode-1")
    # Assert
    out = tmp_path / "new" / "certs"
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {
        "ca.crt": 0o644,
        "ca.key": 0o600,
        "server.pem": 0o644,
        "server.key": 0o600,
        "supernode-1.pem": 0o644,
        "supernode-1.key": 0o600,
    }


@pytest.mark.parametrize("command", [["certs"], ["site", "keys"]], ids=["certs", "site-keys"])
def test_folder_that_is_a_symlink_is_refused(tmp_path: Path, command: list[str]) -> None:
    # Prepare: the output folder is a link to a real, otherwise acceptable folder
    real = _owned_dir(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    # Execute
    result = _run(*command, str(link))
    # Assert
    assert_refused(result, "is a symbolic link")
    assert list(real.iterdir()) == []


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702], ids=["world", "group", "other-w"])
@pytest.mark.parametrize("command", [["certs"], ["site", "keys"]], ids=["certs", "site-keys"])
def test_folder_writable_by_others_is_refused(
    tmp_path: Path, command: list[str], mode: int
) -> None:
    # Prepare
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(mode)
    # Execute
    result = _run(*command, str(out))
    # Assert
    assert_refused(result, "writable by group or others", "chmod go-w")
    assert list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder owned by another user")
@pytest.mark.parametrize("command", [["certs"], ["site", "keys"]], ids=["certs", "site-keys"])
def test_folder_owned_by_someone_else_is_refused(tmp_path: Path, command: list[str]) -> None:
    # Prepare: a private-looking folder that belongs to another user
    out = _owned_dir(tmp_path / "theirs")
    os.chown(out, 4242, 4242)
    # Execute
    result = _run(*command, str(out))
    # Assert
    assert_refused(result, "is owned by uid 4242, not by you")
    assert list(out.iterdir()) == []


def test_an_existing_safe_folder_is_kept_and_force_replaces_regular_files(
    tmp_path: Path,
) -> None:
    # Prepare: an existing folder the user owns, mode 0750 (not writable by others)
    out = tmp_path / "mine"
    out.mkdir()
    out.chmod(0o750)
    first = write_node_keys(out)
    before = first.private_key.read_bytes()
    # Execute / Assert: refused without --force, replaced with it, mode kept
    with pytest.raises(TLSError, match="already exists"):
        write_node_keys(out)
    write_node_keys(out, force=True)
    assert first.private_key.read_bytes() != before
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    _no_temp_files(out)
