"""examples/ci/github-actions.yml, the workflow users copy: linted by actionlint (with
shellcheck on its scripts), and its matrix step run here as GitHub runs it.

The linters come with the test extras (scripts/dev-env, and CI, install them): a missing
one fails these tests instead of skipping them, so a CI without them cannot pass green.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytest_devbox.config.option_table import MATRIX_FLAG, OPTIONS

WORKFLOW = Path(__file__).resolve().parent.parent / "examples" / "ci" / "github-actions.yml"
# The shell GitHub runs a `run:` step with when the workflow names none.
GITHUB_BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYTEST_DEVBOX", raising=False)
    monkeypatch.setenv("PYTEST_DEVBOX_CACHE", str(tmp_path / "cache"))


def tool(name: str) -> str:
    """The test extras' `name` (next to this Python first), or fail saying how to get it."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: it comes with the test extras "
            "(pip install -e '.[test]', or scripts/dev-env)",
            pytrace=False,
        )
    return found


def actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    # shellcheck named explicitly: actionlint silently skips scripts when it is not on
    # PATH. No pyflakes: the workflow has no Python steps.
    argv = [tool("actionlint"), "-no-color", "-oneline", "-pyflakes=", "-shellcheck"]
    argv += [tool("shellcheck"), str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def step(job: str, step_id: str) -> dict[str, Any]:
    steps: list[dict[str, Any]] = workflow()["jobs"][job]["steps"]
    return next(s for s in steps if s.get("id") == step_id)


def test_workflow_has_no_actionlint_finding() -> None:
    proc = actionlint(WORKFLOW)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_actionlint_reports_a_broken_copy(tmp_path: Path) -> None:
    text = WORKFLOW.read_text()
    broken = text.replace("needs: matrix\n", "needs: matrx\n", 1)  # a job that does not exist
    # An unquoted expansion in a run: script: shellcheck's finding, through actionlint.
    broken = broken.replace('--accel "$ACCEL"', "--accel $ACCEL", 1)
    assert broken.count("matrx") == 1 and "--accel $ACCEL" in broken
    copy = tmp_path / "broken.yml"
    copy.write_text(broken)
    proc = actionlint(copy)
    assert proc.returncode == 1
    assert 'needs job "matrx" which does not exist' in proc.stdout
    assert "SC2086" in proc.stdout and "[shellcheck]" in proc.stdout


def run_matrix_step(project: Path, distros: str, tmp_path: Path) -> list[str]:
    """The matrix job's step script, run in `project` as GitHub runs it (the venv's
    pytest first on PATH); the `distros` output it writes, parsed."""
    matrix = step("matrix", "matrix")
    assert matrix["env"] == {"DISTROS": "${{ inputs.distros }}"}
    output = tmp_path / "github_output"
    output.write_text("")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DISTROS": distros,
        "GITHUB_OUTPUT": str(output),
    }
    script = tmp_path / "step.sh"
    script.write_text(matrix["run"])
    subprocess.run([*GITHUB_BASH, str(script)], cwd=project, env=env, check=True, timeout=120)
    (line,) = output.read_text().splitlines()  # one line: `name=value`, value on one line
    name, value = line.split("=", 1)
    assert name == "distros"
    distros_list: list[str] = json.loads(value)
    return distros_list


def test_matrix_step_prints_the_distros_as_json(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makeini("[pytest]\ndevbox = debian-11\n")
    # A manual run that names distros, and a push (no input): the project's selection.
    assert run_matrix_step(pytester.path, "debian-12,debian-11", tmp_path) == [
        "debian-12",
        "debian-11",
    ]
    assert run_matrix_step(pytester.path, "", tmp_path) == ["debian-11"]


def test_test_job_fans_out_over_the_matrix_output() -> None:
    jobs = workflow()["jobs"]
    assert jobs["matrix"]["outputs"]["distros"] == "${{ steps.matrix.outputs.distros }}"
    assert jobs["test"]["needs"] == "matrix"
    distro = jobs["test"]["strategy"]["matrix"]["distro"]
    assert distro == "${{ fromJSON(needs.matrix.outputs.distros) }}"


def test_every_devbox_flag_the_workflow_passes_exists() -> None:
    """An option renamed in the table would break users' copies: check the flags the
    workflow passes to pytest against the table, and those of `devbox SUB` against
    the command's own --help."""
    scripts = [s["run"] for job in workflow()["jobs"].values() for s in job["steps"] if "run" in s]
    text = "\n".join(scripts)
    pytest_flags = set(re.findall(r"--devbox(?:-[a-z]+)*", text))
    assert {"--devbox", MATRIX_FLAG, "--devbox-accel", "--devbox-artifacts"} <= pytest_flags
    assert pytest_flags <= {MATRIX_FLAG} | {o.flag for o in OPTIONS}
    commands = re.findall(r"\bdevbox ([a-z]+)((?: --[a-z-]+)*)", text)
    assert {sub for sub, _ in commands} == {"key", "build", "doctor"}
    devbox = Path(sys.executable).parent / "devbox"
    for sub, flags in commands:
        help_text = subprocess.run(
            [str(devbox), sub, "--help"], capture_output=True, text=True, check=True
        ).stdout
        for flag in flags.split():
            assert flag in help_text, f"devbox {sub} has no {flag}"
