"""The layers are held by the import-linter contract in pyproject.toml, not by prose:
the real package keeps it, and a copy with one upward import or a loose root module
breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_devbox

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(pytest_devbox.__file__).parent
LINT = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def _lint(project: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run(
        [str(LINT), "--config", str(project / "pyproject.toml"), "--no-cache"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(
        PACKAGE, tmp_path / "pytest_devbox", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_package_keeps_the_layers_contract(tmp_path: Path) -> None:
    r = _lint(_copy(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_a_low_layer_importing_a_high_one_breaks_it(tmp_path: Path) -> None:
    project = _copy(tmp_path)
    probes = project / "pytest_devbox" / "host" / "probes.py"
    # Deferred, inside a function: the contract sees those too.
    probes.write_text(
        probes.read_text()
        + "\n\ndef _up() -> object:\n    from ..plugin import hooks\n\n    return hooks\n"
    )
    r = _lint(project)
    assert r.returncode != 0
    assert "BROKEN" in r.stdout
    assert "pytest_devbox.host.probes -> pytest_devbox.plugin.hooks" in r.stdout


def test_siblings_stay_independent(tmp_path: Path) -> None:
    project = _copy(tmp_path)
    ssh = project / "pytest_devbox" / "transport" / "ssh.py"
    ssh.write_text(
        ssh.read_text()
        + "\n\ndef _side() -> object:\n    from ..virt import domain\n\n    return domain\n"
    )
    r = _lint(project)
    assert r.returncode != 0
    assert "pytest_devbox.transport.ssh -> pytest_devbox.virt.domain" in r.stdout


def test_a_loose_root_module_breaks_it(tmp_path: Path) -> None:
    project = _copy(tmp_path)
    (project / "pytest_devbox" / "helpers.py").write_text("X = 1\n")
    r = _lint(project)
    assert r.returncode != 0
    assert "pytest_devbox.helpers" in r.stdout


def test_at_most_five_modules_at_the_root() -> None:
    root_modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root_modules) <= 5, root_modules
