"""Packaging extras, the base-install CLI hint, and the function-length gate (issue 15)."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest

from common import cli

ROOT = Path(__file__).resolve().parents[2]
FL_ONLY = ("flwr", "torch", "opacus", "monai", "matplotlib", "scikit-learn")


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_base_install_is_ingestion_without_torch_or_flower(project):
    base = _names(project["dependencies"])
    assert {"pydicom", "dicom-anonymizer", "numpy", "typer", "rich"} <= base
    assert not base & set(FL_ONLY)


def test_fl_extra_has_the_training_stack_and_dev_pulls_it(project):
    extras = project["optional-dependencies"]
    assert set(FL_ONLY) <= _names(extras["fl"])
    assert "medfed[fl]" in extras["dev"]
    assert "import-linter" in _names(extras["dev"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [("torch", "torch"), ("flwr.common", "flwr"), ("sklearn.metrics", "sklearn"), ("foo", None)],
)
def test_missing_fl_module_names_the_package_of_the_extra(name, expected):
    assert cli.missing_fl_module(ModuleNotFoundError(f"No module named {name!r}", name=name)) == (
        expected
    )
    assert cli.missing_fl_module(ValueError("torch")) is None


def _function_length():
    spec = importlib.util.spec_from_file_location(
        "function_length", ROOT / ".ci" / "function_length.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["function_length"] = module
    spec.loader.exec_module(module)
    return module


def test_function_length_gate_flags_long_functions_only(tmp_path):
    pkg = tmp_path / "common"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(100))
    (pkg / "m.py").write_text(
        f"def long():\n{body}\n\n\nclass C:\n    def short(self):\n        return 1\n"
    )
    for other in ("client", "server", "simulation"):
        (tmp_path / other).mkdir()
    gate = _function_length()
    assert gate.long_functions(tmp_path, 100) == [("common/m.py", "long", 101)]
    assert gate.long_functions(tmp_path, 101) == []
    assert gate.main([str(tmp_path)]) == 1
