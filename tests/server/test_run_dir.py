"""The ServerApp never overwrites a run: config.json, rounds.jsonl, checkpoints stay put."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.fsutil import marker_kind, write_marker
from server.app import RUN_KIND, prepare_run_dir, why_not_run_dir


def _old_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"seed": 1}\n')
    (path / "rounds.jsonl").write_text('{"round": 0}\n')
    return path


def test_an_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    run = _old_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"already holds a run \(config.json, rounds.jsonl\)"):
        prepare_run_dir(run, {"seed": 2})
    assert json.loads((run / "config.json").read_text()) == {"seed": 1}
    assert (run / "rounds.jsonl").read_text() == '{"round": 0}\n'


def test_a_foreign_non_empty_dir_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="did not create for a run"):
        prepare_run_dir(home, {"seed": 2})
    assert sorted(p.name for p in home.iterdir()) == ["thesis.tex"]
    assert why_not_run_dir(home) is not None  # and `--force` would not delete it


def test_new_empty_and_prepared_run_dirs_are_used(tmp_path: Path) -> None:
    prepare_run_dir(tmp_path / "new", {"seed": 1})
    (tmp_path / "empty").mkdir()
    prepare_run_dir(tmp_path / "empty", {"seed": 1})
    prepared = tmp_path / "prepared"  # what `medfed simulate` creates before the engine
    (prepared / "sites").mkdir(parents=True)
    write_marker(prepared, RUN_KIND)
    prepare_run_dir(prepared, {"seed": 1})
    for d in ("new", "empty", "prepared"):
        assert json.loads((tmp_path / d / "config.json").read_text()) == {"seed": 1}
        assert marker_kind(tmp_path / d) == RUN_KIND
        assert why_not_run_dir(tmp_path / d) is None
    assert why_not_run_dir(_old_run(tmp_path / "legacy")) is None  # runs from before markers
