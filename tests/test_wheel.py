"""The wheel ships what the editable install sees: built from this checkout, installed
into a fresh venv, it runs `devbox --help`, `pytest --devbox-matrix` and imports every
subpackage, from a directory where the checkout is not on sys.path."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import pytest_devbox

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(pytest_devbox.__file__).parent


def _run(argv: list[str], cwd: Path) -> str:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, f"{argv}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel of this checkout installed (dependencies from the
    index, as a user's `pip install` gets them); its python."""
    tmp = tmp_path_factory.mktemp("wheel")
    # From a copy without build/ and egg-info: setuptools would reuse a stale build/lib
    # of an earlier build, and a missing folder would go unnoticed.
    source = tmp / "src"
    junk = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, source, ignore=junk)
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp), str(source)], tmp
    )
    (wheel,) = tmp.glob("pytest_devbox-*.whl")
    venv.create(tmp / "venv", with_pip=True)
    python = tmp / "venv" / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", str(wheel)], tmp)
    return python


def test_every_subpackage_imports_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    names = sorted(
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
        for p in PACKAGE.rglob("__init__.py")
    )
    code = (
        "import importlib, pathlib, sys\n"
        f"for name in {names!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert 'site-packages' in module.__file__, module.__file__\n"
        "print(len(sys.modules))\n"
    )
    _run([str(installed), "-c", code], tmp_path)
    # And every module file of the checkout is in the wheel's package.
    site = _run(
        [str(installed), "-c", "import pytest_devbox; print(pytest_devbox.__file__)"], tmp_path
    )
    shipped = Path(site.strip()).parent
    ours = {p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")}
    theirs = {p.relative_to(shipped) for p in shipped.rglob("*.py")}
    assert ours <= theirs, sorted(map(str, ours - theirs))
    assert (shipped / "py.typed").exists()


def test_the_devbox_command_runs_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    out = _run([str(installed.parent / "devbox"), "--help"], tmp_path)
    assert "usage: devbox" in out and "doctor" in out


def test_the_pytest_plugin_loads_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    out = _run([str(installed), "-m", "pytest", "--devbox-matrix"], tmp_path)
    assert '"debian-12"' in out and '"centos-7"' in out
