"""The outcome of one command run in a guest: plain data, no SSH library behind it.

Kept apart from transport/ssh.py so that ``pytest_devbox.Result`` (and the errors that carry one)
can be imported, type-checked and built in tests without loading paramiko.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Result", "shorten"]


@dataclass(frozen=True)
class Result:
    """The outcome of one command run in a guest."""

    command: str
    """The command line as sent (a list is shlex-quoted and joined)."""
    exit_status: int | None
    """The exit status; None when there is none (timed out, killed by a signal, lost)."""
    stdout: str
    stderr: str
    duration: float
    """Wall-clock seconds from sending the command to its end."""

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_status == 0

    @property
    def failed(self) -> bool:
        """True when the command did not exit with status 0."""
        return not self.ok

    def tails(self, lines: int = 20) -> str:
        """The last ``lines`` lines of stdout and of stderr, each block labelled."""
        streams = (("stdout", self.stdout), ("stderr", self.stderr))
        return "\n".join(_tail(name, text, lines) for name, text in streams)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tail(name: str, text: str, lines: int) -> str:
    if not text.strip():
        return f"--- {name}: (empty) ---"
    all_lines = text.rstrip("\n").splitlines()
    shown = [shorten(line, 1000) for line in all_lines[-lines:]]
    if len(all_lines) > len(shown):
        header = f"--- {name} (last {len(shown)} of {len(all_lines)} lines) ---"
    else:
        header = f"--- {name} ---"
    return header + "\n" + "\n".join(shown)
