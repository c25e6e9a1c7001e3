"""Hooks for the pytest plugins users already run beside devbox: pytest-html and Allure
get a failed test's guest evidence as attachments, pytest-timeout's interrupted command
leaves no straggler, --pdb prints the guests' ssh lines, pytest-rerunfailures' reruns
are counted per distro.

Each class is registered only when its plugin is loaded and active (as pytest-randomly
registers its xdist hooks): pytest rejects hooks it has no spec for, and a session
without these plugins imports none of them and pays nothing.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..errors import DevboxError

if TYPE_CHECKING:
    from ..guest.machine import Machine

FAILED_GUESTS = pytest.StashKey[list["Machine"]]()
"""The guests a failed test used, set on its item by hooks.py's makereport."""
SECTION_PREFIX = "devbox "
ARTIFACTS_SECTION = "devbox artifacts"
TIMEOUT_MESSAGE = "from pytest-timeout"
"""In pytest-timeout's failure message ("Timeout (>5.0s) from pytest-timeout.")."""


def register(config: pytest.Config) -> None:
    """Register the hooks of each optional plugin that this session runs with."""
    pm = config.pluginmanager
    option = config.option
    if pm.hasplugin("html") and getattr(option, "htmlpath", None):
        pm.register(HtmlHooks(), "devbox-html")
    if pm.hasplugin("allure_pytest") and getattr(option, "allure_report_dir", None):
        pm.register(AllureHooks(), "devbox-allure")
    if pm.hasplugin("timeout"):
        pm.register(TimeoutHooks(), "devbox-timeout")
    if getattr(option, "usepdb", False):
        pm.register(PdbHooks(config), "devbox-pdb")
    if pm.hasplugin("rerunfailures"):
        pm.register(RerunHooks(), "devbox-rerunfailures")


def evidence(report: pytest.TestReport) -> Iterator[tuple[str, str | Path]]:
    """(name, text) of each guest section of a failed test's report (plugin/report.py),
    and (file name, path) of each file --devbox-artifacts saved."""
    for title, content in report.sections:
        if title == ARTIFACTS_SECTION:
            for line in content.splitlines():
                path = Path(line)
                yield f"devbox {path.parent.name}/{path.name}", path
        elif title.startswith(SECTION_PREFIX):
            yield title, content


def _text(what: str | Path) -> str:
    if isinstance(what, str):
        return what
    try:
        return what.read_text(errors="replace")
    except OSError as e:
        return f"({what} unavailable: {e})"


class HtmlHooks:
    """pytest-html: the evidence as text extras of the failed test."""

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outermost: after hooks.py's sections
    def pytest_runtest_makereport(self, item: pytest.Item) -> Generator[None, Any, None]:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if not report.failed:
            return
        from pytest_html import extras as html_extras

        attached = [html_extras.text(_text(what), name=name) for name, what in evidence(report)]
        if attached:
            report.extras = [*getattr(report, "extras", []), *attached]  # type: ignore[attr-defined]


class AllureHooks:
    """Allure: the evidence as text attachments of the failed test (files in --alluredir)."""

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item) -> Generator[None, Any, None]:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if not report.failed:
            return
        import allure

        for name, what in evidence(report):
            allure.attach(_text(what), name=name, attachment_type=allure.attachment_type.TEXT)


class TimeoutHooks:
    """pytest-timeout: its signal method raises in the middle of a command; that command
    goes on in the guest, and a frame it was sending may be half sent (review finding
    17). The guests of a test that timed out get new executors: the old ones end, and
    their commands with them."""

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        excinfo = call.excinfo
        if not report.failed or excinfo is None or TIMEOUT_MESSAGE not in str(excinfo.value):
            return
        for machine in item.stash.get(FAILED_GUESTS, []):
            with contextlib.suppress(DevboxError):
                machine.stop_commands()


class PdbHooks:
    """--pdb: before the debugger's prompt, the ssh lines of the failed test's guests,
    which stay up while the test is paused."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(tryfirst=True)
    def pytest_exception_interact(self, node: pytest.Item | pytest.Collector) -> None:
        machines = node.stash.get(FAILED_GUESTS, [])
        running = [m for m in {id(m): m for m in machines}.values() if not m.closed]
        if not running:
            return
        lines = ["devbox: the guests of this test stay up while the debugger runs:"]
        lines += [f"    {m.distro}: {m.ssh_command()}" for m in running]
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        tw = self.config.get_terminal_writer()
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            tw.line()
            for line in lines:
                tw.line(line)


class RerunHooks:
    """pytest-rerunfailures: its reruns per distro, under the devbox summary."""

    def __init__(self) -> None:
        self.reruns: Counter[str] = Counter()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        distro = getattr(report, "devbox_distro", None)
        if distro is not None and report.outcome == "rerun":  # type: ignore[comparison-overlap]
            self.reruns[distro] += 1

    @pytest.hookimpl(trylast=True)  # after hooks.py's devbox table
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.reruns:
            counts = ", ".join(f"{d} {n}" for d, n in sorted(self.reruns.items()))
            terminalreporter.write_line(f"devbox reruns (pytest-rerunfailures): {counts}")
