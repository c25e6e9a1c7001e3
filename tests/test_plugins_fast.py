"""The optional pytest plugins stay optional: none is a dependency or in the `test`
extra, the fast tier's environment has none, and a session without them imports none
(plugin/extras.py registers its hooks only for the plugins a session runs with)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_devbox.plugin.extras import evidence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# distribution name -> the top-level modules it installs
OPTIONAL = {
    "pytest-testinfra": ("testinfra",),
    "pytest-html": ("pytest_html",),
    "allure-pytest": ("allure", "allure_pytest", "allure_commons"),
    "pytest-timeout": ("pytest_timeout",),
    "pytest-rerunfailures": ("pytest_rerunfailures",),
}
BAD_URI = "qemu:///system?socket=/nonexistent"


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip().lower()


def test_only_the_testinfra_extra_names_an_optional_plugin() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {_name(r) for r in project["dependencies"]} == {
        "pytest", "libvirt-python", "paramiko", "filelock", "tomli",
    }  # fmt: skip
    extras = project["optional-dependencies"]
    assert not {_name(r) for r in extras["test"]} & set(OPTIONAL)
    assert extras["testinfra"] == ["pytest-testinfra>=10"]


def test_the_fast_tier_environment_has_none_of_them() -> None:
    found = [m for mods in OPTIONAL.values() for m in mods if importlib.util.find_spec(m)]
    assert not found, f"{found} installed in {sys.prefix}: the fast tier runs without them"


def test_a_session_without_them_imports_none_of_them(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PYTEST_DEVBOX", raising=False)
    monkeypatch.setenv("PYTEST_DEVBOX_CACHE", str(tmp_path / "cache"))
    modules = sorted({m for mods in OPTIONAL.values() for m in mods})
    pytester.makepyfile(
        f"""
        import sys

        import pytest_devbox.guest.machine  # the handle's testinfra is lazy too

        def test_modules(pytestconfig):
            pm = pytestconfig.pluginmanager
            assert pm.get_plugin("devbox-session") is not None  # devbox is configured
            assert pm.get_plugin("devbox-pdb") is not None  # --pdb needs no plugin
            for name in ("html", "allure", "timeout", "rerunfailures"):
                assert pm.get_plugin("devbox-" + name) is None
            loaded = [m for m in sys.modules if m.split(".")[0] in {modules!r}]
            assert loaded == []
        """
    )
    result = pytester.runpytest_subprocess(f"--devbox-uri={BAD_URI}", "--devbox=debian-12", "--pdb")
    result.assert_outcomes(passed=1)


def test_the_evidence_is_the_guest_sections_and_the_artifact_files(tmp_path: Path) -> None:
    journal = tmp_path / "devbox-debian-12-1" / "journal.txt"
    journal.parent.mkdir()
    journal.write_text("-- Boot 1 --\n")
    sections = [
        ("Captured stdout call", "not ours"),
        ("devbox debian-12 console", "login:"),
        ("devbox debian-12 commands", "exit    0     0.01 s  true"),
        ("devbox artifacts", str(journal)),
    ]
    report = pytest.TestReport("t.py::t", ("t.py", 0, "t"), {}, "failed", None, "call", sections)
    found = dict(evidence(report))
    assert list(found) == [
        "devbox debian-12 console", "devbox debian-12 commands",
        "devbox devbox-debian-12-1/journal.txt",
    ]  # fmt: skip
    assert found["devbox devbox-debian-12-1/journal.txt"] == journal


VENV = ROOT / ".venv-plugins"
DISABLE = ("html", "html_fixtures", "allure_pytest", "timeout", "rerunfailures")


@pytest.mark.skipif(
    not (VENV / "bin" / "python").exists(),
    reason=f"no {VENV}: run scripts/plugins-env to install the plugins this test disables",
)
def test_installed_but_disabled_they_are_not_imported(tmp_path: Path) -> None:
    """In .venv-plugins, with each plugin disabled (`-p no:NAME`), devbox imports none."""
    modules = sorted({m for mods in OPTIONAL.values() for m in mods})
    (tmp_path / "test_modules.py").write_text(
        "import sys\n\n"
        "def test_nothing_imported(pytestconfig):\n"
        f"    assert [m for m in sys.modules if m.split('.')[0] in {modules!r}] == []\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DEVBOX"}
    env["PYTEST_DEVBOX_CACHE"] = str(tmp_path / "cache")
    disable = [a for name in (*DISABLE, "pytest11.testinfra") for a in ("-p", f"no:{name}")]
    argv = [str(VENV / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", *disable,
            f"--devbox-uri={BAD_URI}", "--devbox=debian-12", "-q", "test_modules.py"]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_without_testinfra_the_handle_says_which_extra_to_install() -> None:
    from pytest_devbox.errors import DevboxError

    with pytest.raises(DevboxError, match=r"pip install 'pytest-devbox\[testinfra\]'"):
        importlib.import_module("pytest_devbox.guest.testinfra")
