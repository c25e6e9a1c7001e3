"""What the plugin prints: live progress, the header line, the summary table, and the
guest sections of a failed test's report."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..config import code_ids
from ..config.profiles import Profile, eol_warning
from ..errors import DevboxError
from ..log import Log

if TYPE_CHECKING:
    from ..guest.machine import Machine
    from .session import DevboxSession

# How many recent commands a failed test's report shows per guest.
REPORT_COMMANDS = 20
# Progress shows down to -q: an image build is minutes of silence otherwise; -qq hides it.
PROGRESS_VERBOSITY = -1
# systemd colours its console lines; the report shows them as plain text.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def live_log(config: pytest.Config) -> Log:
    """A log that writes 'devbox: ...' lines to the terminal as they happen.

    Image builds and boots run in fixture setup, where pytest captures output; the
    capture is suspended for the write (as pytest's own live logging does), and the line
    is flushed, so a terminal and a CI log both show it at once.
    """

    def log(message: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or config.get_verbosity() < PROGRESS_VERBOSITY:
            return
        capman = config.pluginmanager.get_plugin("capturemanager")
        suspended = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
        with suspended:
            reporter.write_line(f"devbox: {message}")
            reporter.flush()

    return log


def header_line(state: DevboxSession) -> str | None:
    """The one line under pytest's header: what this session runs on, or None."""
    if not state.selected:
        return None
    s = state.settings
    return "\n".join(
        [
            f"devbox: uri={s.uri} accel={state.accel} "
            f"distros={','.join(state.selected_names)} cache={s.cache_dir}",
            f"devbox: {code_ids.header_line(s.code_ids)}",
            *(f"devbox: {w}" for w in eol_warnings(state.selected)),
        ]
    )


def eol_warnings(profiles: Iterable[Profile]) -> list[str]:
    """One line per selected distro past its end of life (header and summary)."""
    return [w for w in (eol_warning(p) for p in profiles) if w is not None]


# --- a failed test: the guests' console and commands --------------------------------


def format_commands(machine: Machine, limit: int = REPORT_COMMANDS) -> str:
    """The guest's recent commands, one a line: exit status, duration, command."""
    history = list(machine.history)[-limit:]
    if not history:
        return "(no commands run)"
    lines = []
    for r in history:
        status = "-" if r.exit_status is None else str(r.exit_status)  # "-": timed out
        lines.append(f"exit {status:>4}  {r.duration:7.2f} s  {r.command}")
    return "\n".join(lines)


def add_guest_sections(report: pytest.TestReport, machines: Sequence[Machine]) -> None:
    """Append each guest's console tail and recent commands to a failed test's report."""
    seen: set[int] = set()
    for m in machines:
        if id(m) in seen:
            continue
        seen.add(id(m))
        try:
            tail = m.console_tail()
        except (OSError, DevboxError) as e:
            tail = f"(console log unavailable: {e})"
        report.sections.append((f"devbox {m.distro} console", _ANSI.sub("", tail)))
        report.sections.append((f"devbox {m.distro} commands", format_commands(m)))


def add_kept_section(
    report: pytest.TestReport, machines: Sequence[Machine], shared: Machine | None
) -> None:
    """--devbox-keep-failed: which guests stay up after the session, and their ssh lines."""
    lines = []
    for m in {id(m): m for m in machines}.values():
        what = f" (the shared guest of {m.distro}: later tests may change it)"
        what = what if m is shared else ""
        lines.append(f"{m.distro}: {m.name} stays up after the session{what}")
        lines.append(f"    {m.ssh_command()}")
    report.sections.append(("devbox kept", "\n".join(lines)))


def add_artifacts(
    report: pytest.TestReport, machines: Sequence[Machine], root: Path, nodeid: str
) -> None:
    """Save the guests' evidence under `root` (plugin/forensics.py) and name the files in the
    failed test's report."""
    from .forensics import artifacts_dir_for, collect

    unique = list({id(m): m for m in machines}.values())
    dest = artifacts_dir_for(root, nodeid)
    files, problems = collect(unique, dest)
    lines = [*map(str, files), *(f"warning: {p}" for p in problems)]
    report.sections.append(("devbox artifacts", "\n".join(lines)))


# --- the terminal summary -------------------------------------------------------------


def _image_cell(state: DevboxSession, name: str) -> str:
    st = state.stats.get(name)
    if st is None or st.image_built is None:
        image = "-"
    elif st.image_built:
        took = f" in {st.build_seconds:.1f} s" if st.build_seconds is not None else ""
        image = f"built{took}"
    else:
        image = "cached"
    if st and st.retried:
        image += f" (retried {st.retried})"
    return image


def summary_rows(state: DevboxSession) -> list[tuple[str, ...]]:
    """The summary table, heading first: per distro boots and boot time, restores and
    restore time, image, outcomes."""
    rows: list[tuple[str, ...]] = [
        ("distro", "boots", "boot", "restored", "image", "passed", "failed", "skipped")
    ]
    for name in state.selected_names:
        st = state.stats.get(name)
        counts = state.outcomes(name)
        boots = str(st.boots) if st else "0"
        boot = f"{st.boot_seconds:.1f} s" if st and st.boot_seconds is not None else "-"
        restored = "-"
        if st and st.restores and st.restore_seconds is not None:
            restored = f"{st.restores} in {st.restore_seconds:.1f} s"
        if st and st.reused:
            restored = "reused"  # a guest of `devbox up`, not pristine
        image = _image_cell(state, name)
        outcomes = (str(counts.passed), str(counts.failed), str(counts.skipped))
        rows.append((name, boots, boot, restored, image, *outcomes))
    return rows


def format_table(rows: Iterable[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell; text columns left, numbers right."""
    rows = list(rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = {0, *(i for i, head in enumerate(rows[0]) if head == "image")}
    return [
        "  ".join(
            c.ljust(w) if i in text else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]


def write_summary(terminalreporter: Any, state: DevboxSession) -> None:
    """The 'devbox' section at the end of the run."""
    terminalreporter.section("devbox")
    for line in format_table(summary_rows(state)):
        terminalreporter.write_line(line)
    if state.close_error:
        terminalreporter.write_line(f"error while stopping guests: {state.close_error}", red=True)
    for line in state.keep_lines:
        terminalreporter.write_line(line)
