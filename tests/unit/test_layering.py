"""The import-linter contracts of pyproject.toml hold (cli -> cluster -> engine -> kernels; inside the
engine demo -> analysis -> run -> output -> plan -> config -> io -> errors; no Ray in the engine; no I/O
in the kernels; no import cycle anywhere). Run by hand with `lint-imports` from the repository root."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports")
    assert exe, "lint-imports is missing: install the test extra (pip install -e '.[test]')"
    run = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_every_contract_ran() -> None:
    """A contract dropped from pyproject.toml would leave the suite green; count them."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert {c["type"] for c in contracts} == {"layers", "forbidden", "acyclic_siblings"}
    assert any(c.get("containers") == ["dgrepair.engine"] for c in contracts)
