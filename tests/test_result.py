"""Result (plain data, no paramiko) and the command errors built from it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pytest_devbox.errors import CommandError, CommandFailed, CommandTimeout, DevboxError
from pytest_devbox.result import Result


def test_result_tails_and_failure_description() -> None:
    out = "".join(f"out {i}\n" for i in range(30))
    r = Result("make test", 2, out, "boom\n", 1.25)
    assert r.failed and not r.ok
    tails = r.tails(5)
    assert "--- stdout (last 5 of 30 lines) ---" in tails
    assert "out 29" in tails and "out 24" not in tails
    assert "--- stderr ---\nboom" in tails
    message = str(CommandFailed(r))
    assert message.startswith("command `make test` exited with status 2 after 1.2 s")
    assert Result("true", 0, "", "", 0.0).tails() == (
        "--- stdout: (empty) ---\n--- stderr: (empty) ---"
    )


def test_no_exit_status_is_none_and_a_failure() -> None:
    r = Result("kill -9 $$", None, "", "", 0.5)
    assert r.exit_status is None and r.failed and not r.ok
    assert str(CommandFailed(r)).startswith(
        "command `kill -9 $$` ended without an exit status after 0.5 s"
    )


@pytest.mark.parametrize(
    "error",
    [
        CommandFailed(Result("make", 3, "built a\n", "no rule\n", 1.0)),
        CommandTimeout(Result("sleep 9", None, "started\n", "", 2.0), 2),
    ],
    ids=["failed", "timeout"],
)
def test_command_errors_share_a_base_and_show_command_and_tails(error: CommandError) -> None:
    assert isinstance(error, DevboxError)
    message = str(error)
    verdict, tails = message.split("\n", 1)
    assert error.result.command in verdict
    assert tails == error.result.tails()
    with pytest.raises(CommandError):
        raise error


def test_timeout_message_names_the_limit() -> None:
    error = CommandTimeout(Result("sleep 9", None, "", "", 2.0), 2.5)
    assert str(error).startswith("command timed out after 2.5 s and was stopped: sleep 9\n")
    assert error.timeout == 2.5


def test_result_imports_without_paramiko() -> None:
    code = (
        "import sys, pytest_devbox; pytest_devbox.Result; "
        "from pytest_devbox.errors import CommandFailed; "
        "assert 'paramiko' not in sys.modules, 'paramiko was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
