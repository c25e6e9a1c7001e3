"""pytest hooks and fixtures: the plugin wires pytest to the layers below, nothing more.

Options come from one table (options.py), the session state lives in session.py, what is
printed in report.py. Nothing here talks to libvirt: the session creates its `Pool` the
first time a fixture needs a guest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from . import report
from .errors import DevboxError
from .options import HOW_TO_SELECT, add_options, resolve_config
from .session import DevboxSession, open_session

if TYPE_CHECKING:
    from .machine import Machine
    from .pool import Pool

state_key = pytest.StashKey[DevboxSession]()
_used_key = pytest.StashKey[list["Machine"]]()
DISTRO_PARAM = "_devbox_distro"


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "devbox(*distros, exclude=()): run this test only on these of the selected devbox "
        "distros, or on all selected but the excluded ones.",
    )
    if config.getoption("help", False) or config.getoption("version", False):
        return
    # Every option is checked here: a bad value is a usage error before anything boots.
    state = open_session(resolve_config(config), config.rootpath, report.live_log(config))
    config.stash[state_key] = state
    config.pluginmanager.register(state, "devbox-session")


def pytest_unconfigure(config: pytest.Config) -> None:
    # Safety net: no guest outlives the session even if sessionfinish never ran.
    state = config.stash.get(state_key, None)
    if state is not None:
        state.close()
        config.pluginmanager.unregister(state)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    # trylast: session-scoped fixtures of the user may still use a guest in teardown.
    state = session.config.stash.get(state_key, None)
    if state is not None:
        state.close()


def pytest_report_header(config: pytest.Config) -> str | None:
    state = config.stash.get(state_key, None)
    return None if state is None else report.header_line(state)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if DISTRO_PARAM not in metafunc.fixturenames:
        return
    state = metafunc.config.stash.get(state_key, None)
    if state is None:
        return
    distros, _why = state.distros_for(metafunc.definition)
    # Without a distro the test is not parametrized; _devbox_distro skips it with the reason.
    if distros:
        metafunc.parametrize(DISTRO_PARAM, distros, indirect=True, ids=distros)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    test_report: pytest.TestReport = outcome.get_result()
    callspec = getattr(item, "callspec", None)
    distro = callspec.params.get(DISTRO_PARAM) if callspec is not None else None
    if distro is None:
        return
    # Travels with the report (also through xdist) so the summary can count per distro.
    test_report.devbox_distro = distro  # type: ignore[attr-defined]
    if test_report.failed:
        machines: list[Machine] = item.stash.get(_used_key, [])
        report.add_guest_sections(test_report, machines)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(state_key, None)
    if state is None or not state.selected or config.option.collectonly:
        return
    # The pool is closed by now (sessionfinish runs first); its stats remain.
    report.write_summary(terminalreporter, state)


# --- fixtures -------------------------------------------------------------------------


def _state(request: pytest.FixtureRequest) -> DevboxSession:
    return request.config.stash[state_key]


def _record(request: pytest.FixtureRequest, machine: Machine) -> None:
    request.node.stash.setdefault(_used_key, []).append(machine)


def _fail_setup(distro: str, error: str) -> NoReturn:
    # Called outside the except block so the report shows our message, not a chain.
    pytest.fail(f"devbox: could not start {distro}: {error}", pytrace=False)


@pytest.fixture
def _devbox_distro(request: pytest.FixtureRequest) -> str:
    """The distro this test instance runs on (set by pytest_generate_tests)."""
    distro: str | None = getattr(request, "param", None)
    if distro is None:
        _, why = _state(request).distros_for(request.node)
        pytest.skip(why or f"no devbox distro selected: {HOW_TO_SELECT}")
    return distro


@pytest.fixture(scope="session")
def devbox_pool(request: pytest.FixtureRequest) -> Pool:
    """The session's Pool: `.get(distro)`, `.fresh(distro)`, `.distros`.

    Skips the test when no distro is selected.
    """
    state = _state(request)
    if not state.selected:
        pytest.skip(f"no devbox distro selected: {HOW_TO_SELECT}")
    return state.pool


@pytest.fixture
def devbox(request: pytest.FixtureRequest, _devbox_distro: str) -> Machine:
    """The running guest of this test's distro, shared by every test of that distro.

    Started on first use, stopped at the end of the session (unless --devbox-keep).
    """
    state = _state(request)
    if _devbox_distro in state.broken:
        pytest.fail(
            f"devbox: {_devbox_distro} failed to start earlier in this session "
            f"(see that test's error): {state.broken[_devbox_distro]}",
            pytrace=False,
        )
    error = ""
    try:
        machine = state.pool.get(_devbox_distro)
    except DevboxError as e:
        error = str(e)
    if error:
        state.broken[_devbox_distro] = error.splitlines()[0]
        _fail_setup(_devbox_distro, error)
    _record(request, machine)
    return machine


@pytest.fixture
def devbox_fresh(
    request: pytest.FixtureRequest, _devbox_distro: str
) -> Generator[Machine, None, None]:
    """A new guest of this test's distro for this test alone, destroyed afterwards."""
    with contextlib.ExitStack() as stack:
        error = ""
        try:
            machine = stack.enter_context(_state(request).pool.fresh(_devbox_distro))
        except DevboxError as e:
            error = str(e)
        if error:
            _fail_setup(_devbox_distro, error)
        _record(request, machine)
        yield machine
