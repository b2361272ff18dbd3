"""Researcher commands never overwrite: `simulate --run-dir`, `experiment --out`, `export-dicom`.

The simulation engine is replaced by a stand-in that does what the ServerApp does to the
run directory (``server.app.prepare_run_dir`` + an empty round log), so these tests need
no Flower processes; the dataset check still reads the real PneumoniaMNIST file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from common import cli
from common.errors import DataError
from common.fsutil import MARKER
from common.site_dataset import SiteDataset
from server.app import RUN_KIND, prepare_run_dir
from simulation.cli import _new_run_dir
from simulation.data.export_dicom import export_site_dicom
from simulation.research.experiment import why_not_experiment_dir

runner = CliRunner()
cli._register_plugins()


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Stand-ins for site creation and the engine; returns the run dirs the engine got."""
    import simulation.data.sites
    import simulation.launch.engine

    calls: list[Path] = []

    def create_virtual_sites(npz: Path, out: Path, **kw: Any) -> list[dict[str, Any]]:
        out.mkdir(parents=True, exist_ok=True)
        return []

    def run_simulation(*, run_dir: Path, run_config: dict[str, Any], **kw: Any) -> None:
        calls.append(run_dir)
        prepare_run_dir(run_dir, run_config)  # what the ServerApp does first
        (run_dir / "rounds.jsonl").write_text("")

    monkeypatch.setattr(simulation.data.sites, "create_virtual_sites", create_virtual_sites)
    monkeypatch.setattr(simulation.launch.engine, "run_simulation", run_simulation)
    return calls


def simulate(run_dir: Path, data_dir: Path, *extra: str) -> Any:
    args = ["simulate", "--run-dir", str(run_dir), "--data-dir", str(data_dir), "--rounds", "1"]
    return runner.invoke(cli.app, [*args, *extra])


def old_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"seed": 1}\n')
    (path / "rounds.jsonl").write_text('{"round": 1}\n')
    (path / "final_model.pt").write_bytes(b"weights")
    return path


def test_simulate_refuses_an_existing_run(
    tmp_path: Path, shared_data_dir: Path, engine: list[Path]
) -> None:
    run = old_run(tmp_path / "run")
    before = snapshot(run)
    result = simulate(run, shared_data_dir)
    assert result.exit_code == 2, result.output
    assert "already exists. Pass --force" in " ".join(result.output.split())
    assert engine == [] and snapshot(run) == before


def test_simulate_force_replaces_only_a_medfed_run(
    tmp_path: Path, shared_data_dir: Path, engine: list[Path]
) -> None:
    # a folder medfed did not write is refused, even with --force
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    result = simulate(foreign, shared_data_dir, "--force")
    assert result.exit_code == 2, result.output
    assert "not a medfed run directory" in " ".join(result.output.split())
    assert snapshot(foreign) == {"thesis.tex": b"precious"} and engine == []
    # a previous medfed run is replaced: the new run in place, the old one gone
    run = old_run(tmp_path / "run")
    result = simulate(run, shared_data_dir, "--force")
    assert result.exit_code == 0, result.output
    assert engine == [run.resolve()]
    assert not (run / "final_model.pt").exists()  # the old run's files are gone
    assert (run / "config.json").is_file() and (run / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "results", "run"]


def test_default_run_dirs_never_collide(tmp_path: Path) -> None:
    base = tmp_path / "sim-20260101-000000"
    assert _new_run_dir(base) == base
    base.mkdir()
    assert _new_run_dir(base) == tmp_path / "sim-20260101-000000-2"


def test_experiment_dirs_need_proof(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "experiment.json").write_text("{}")
    assert why_not_experiment_dir(exp) is not None  # an experiment.json alone is no proof
    (exp / "results.csv").write_text("")
    assert why_not_experiment_dir(exp) is None
    assert RUN_KIND != "experiment"


def test_export_dicom_force_replaces_only_its_own_exports(tmp_path: Path) -> None:
    images = np.zeros((2, 4, 4), np.uint8)
    labels = np.array([0, 1])
    site = tmp_path / "site_0"
    site.mkdir()
    (site / "labels.csv").write_text("the hospital's own labels")
    (site / "dicom").mkdir()
    (site / "dicom" / "img_00000.dcm").write_bytes(b"a real scan")
    (site / "dicom" / "IM0001").write_bytes(b"another real scan")
    before = snapshot(site)
    with pytest.raises(DataError, match="not a DICOM export written by `medfed export-dicom`"):
        export_site_dicom(images, labels, site, manufacturer="M", seed=1, overwrite=True)
    assert snapshot(site) == before
    ours = tmp_path / "site_1"
    export_site_dicom(images, labels, ours, manufacturer="M", seed=1)
    export_site_dicom(images[:1], labels[:1], ours, manufacturer="M", seed=1, overwrite=True)
    assert sorted(p.name for p in (ours / "dicom").iterdir()) == ["img_00000.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site_0", "site_1"]


def test_deploy_site_data_replaces_only_previous_site_datasets(
    tmp_path: Path, pneumonia_npz: Path
) -> None:
    from simulation.launch.deploy import prepare_site_datasets

    deploy = tmp_path / "deploy"
    # a first preparation, then a second one replacing medfed's own site datasets
    kw: dict[str, Any] = {"num_sites": 2, "images_per_site": 20, "source": "virtual"}
    first = prepare_site_datasets(pneumonia_npz, deploy, **kw)
    old = SiteDataset(first[0]).fingerprint
    second = prepare_site_datasets(pneumonia_npz, deploy, seed=7, **kw)
    assert second == first and SiteDataset(second[0]).fingerprint != old
    assert not [p for p in deploy.iterdir() if p.name.startswith(".work-sites")]
    # something else at data/site-2 is refused before any work, and left whole
    shutil.rmtree(deploy / "data" / "site-2")
    (deploy / "data" / "site-2").mkdir()
    (deploy / "data" / "site-2" / "scan.dcm").write_bytes(b"a real scan")
    before = snapshot(deploy / "data")
    with pytest.raises(DataError, match="not a site dataset written by medfed"):
        prepare_site_datasets(pneumonia_npz, deploy, seed=8, **kw)
    assert snapshot(deploy / "data") == before
