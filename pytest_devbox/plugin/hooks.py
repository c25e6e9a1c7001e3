"""pytest hooks and fixtures: the plugin wires pytest to the layers below, nothing more.

Options come from one table (config/option_table.py), the session state lives in
session.py, what is printed in report.py. Nothing here talks to libvirt: the session
creates its `Pool` the first time a fixture needs a guest.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from ..config.option_table import DISTROS, HOW_TO_SELECT, add_options
from ..config.resolve import resolve_config
from ..errors import DevboxError
from ..guest import code_audit
from . import extras, report, topology
from .broker import WORKER_INPUT_KEY, WORKER_OUTPUT_KEY
from .session import DevboxSession, distro_in_nodeid, matrix, open_session

if TYPE_CHECKING:
    from ..guest.machine import Machine
    from ..pool.pool import Pool

state_key = pytest.StashKey[DevboxSession]()
_used_key = pytest.StashKey[list["Machine"]]()
_audit_key = pytest.StashKey[frozenset[code_audit.Finding]]()
DISTRO_PARAM = "_devbox_distro"
TOPOLOGY_PARAM = "_devbox_topology"


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    if not config.getoption("devbox_matrix", False):
        return None
    # Before pytest_configure: nothing is collected, nothing touches libvirt.
    print(json.dumps(matrix(resolve_config(config), config.rootpath)))
    return 0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "devbox(*distros, exclude=()): run this test only on these of the selected devbox "
        "distros, or on all selected but the excluded ones.",
    )
    config.addinivalue_line(
        "markers",
        "devbox_topology(**roles): the roles of the devbox_topology fixture's guests and "
        'their distros ("*": each selected one), e.g. server="debian-12", client="*".',
    )
    if config.getoption("help", False) or config.getoption("version", False):
        return
    # Every option is checked here: a bad value is a usage error before anything boots.
    state = open_session(resolve_config(config), config.rootpath, report.live_log(config))
    config.stash[state_key] = state
    config.pluginmanager.register(state, "devbox-session")
    extras.register(config)  # pytest-html, Allure, pytest-timeout, --pdb, reruns
    if not state.selected:
        return
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:  # the controller scans: what guests plant is reported at the end
        config.stash[_audit_key] = code_audit.scan(state.settings.code_dir)
    if workerinput is not None:
        state.broker_path = workerinput.get(WORKER_INPUT_KEY)
        state.worker_id = str(workerinput.get("workerid", ""))
    elif getattr(config.option, "dist", "no") != "no":
        # pytest-xdist's controller: it owns the shared guests, its workers borrow them.
        state.start_broker()
        config.pluginmanager.register(XdistController(state), "devbox-xdist")


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
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: xdist sends it after this hook
            workeroutput[WORKER_OUTPUT_KEY] = state.worker_stats()


class XdistController:
    """pytest-xdist's hooks on the controller, registered only under xdist (pytest would
    reject hooks it has no spec for when xdist is not installed)."""

    def __init__(self, state: DevboxSession) -> None:
        self.state = state

    def pytest_configure_node(self, node: Any) -> None:
        assert self.state.broker is not None
        node.workerinput[WORKER_INPUT_KEY] = str(self.state.broker.path)

    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport) -> None:
        # xdist makes the crashed test's report itself, without our distro: the summary
        # counts it as its distro's failure all the same.
        distro = distro_in_nodeid(crashitem, self.state.selected_names)
        if distro is not None:
            report.devbox_distro = distro  # type: ignore[attr-defined]

    def pytest_testnodedown(self, node: Any, error: object) -> None:
        # A crashed worker sends nothing: its fresh guests died with it, uncounted.
        stats = getattr(node, "workeroutput", {}).get(WORKER_OUTPUT_KEY)
        if stats:
            self.state.add_worker_stats(stats)


def pytest_report_header(config: pytest.Config) -> str | None:
    state = config.stash.get(state_key, None)
    if state is not None and not state.selected and config.getoption(DISTROS.ini) == "":
        # An explicit empty selection is legal (it overrides env and ini), but say so.
        return f"devbox: no distro selected ({DISTROS.flag}= is empty): devbox tests are skipped"
    return None if state is None else report.header_line(state)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    state = metafunc.config.stash.get(state_key, None)
    if state is not None and TOPOLOGY_PARAM in metafunc.fixturenames:
        combos, _why = topology.combinations(state, metafunc.definition)
        if combos:  # function scope: each test's group is its own
            ids = [topology.combination_id(c) for c in combos]
            metafunc.parametrize(TOPOLOGY_PARAM, combos, indirect=True, ids=ids)
    if DISTRO_PARAM not in metafunc.fixturenames or state is None:
        return
    distros, _why = state.distros_for(metafunc.definition)
    # Session scope: `devbox` and a user's fixture of any scope built on it exist once per
    # distro, and pytest runs each distro's tests together (it groups by session params).
    # Without a distro the test is not parametrized; collection_modifyitems skips it.
    if distros:
        metafunc.parametrize(DISTRO_PARAM, distros, indirect=True, ids=distros, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash.get(state_key, None)
    if state is None:
        return
    for item in items:
        if DISTRO_PARAM in getattr(item, "fixturenames", ()) and _distro_of(item) is None:
            # A skip marker, not a skip in the session-scoped fixture: pytest would cache
            # that skip and give every later test the first test's reason.
            _, why = state.distros_for(item)
            item.add_marker(pytest.mark.skip(reason=why or f"no devbox distro: {HOW_TO_SELECT}"))
        elif TOPOLOGY_PARAM in getattr(item, "fixturenames", ()) and _roles_of(item) is None:
            _, why = topology.combinations(state, item)
            item.add_marker(pytest.mark.skip(reason=why or f"no devbox distro: {HOW_TO_SELECT}"))


def pytest_collection_finish(session: pytest.Session) -> None:
    state = session.config.stash.get(state_key, None)
    if state is None or not state.selected or session.config.option.collectonly:
        return
    state.plan(session.items, DISTRO_PARAM)
    if state.settings.eager:
        state.warm_up(eager=True)


def _distro_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get(DISTRO_PARAM) if callspec is not None else None


def _roles_of(item: pytest.Item) -> dict[str, str] | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get(TOPOLOGY_PARAM) if callspec is not None else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    test_report: pytest.TestReport = outcome.get_result()
    distro = _distro_of(item)
    if distro is None:
        if _roles_of(item) is not None and test_report.failed:
            _failed_guests(item, test_report, [])
        return
    # Travels with the report (also through xdist) so the summary can count per distro.
    test_report.devbox_distro = distro  # type: ignore[attr-defined]
    state = item.config.stash.get(state_key, None)
    uses_shared = "devbox" in getattr(item, "fixturenames", ())
    if state is not None and call.when == "teardown" and uses_shared:
        state.test_done(distro)
    if call.when == "setup":  # a property of the test case in JUnit XML
        item.user_properties.append(("devbox_distro", distro))
    if test_report.failed:
        machines: list[Machine] = []
        shared = state.shared_machine(distro) if state is not None else None
        # The shared guest is a session fixture: any test of its distro that asked for
        # `devbox` (itself or through a fixture of its own) used it.
        if shared is not None and uses_shared:
            machines.append(shared)
        _failed_guests(item, test_report, machines, shared)


def _failed_guests(
    item: pytest.Item,
    test_report: pytest.TestReport,
    machines: list[Machine],
    shared: Machine | None = None,
) -> None:
    """A failed test's guests (`machines` and its fresh ones, a topology's included):
    their sections in the report; kept with --devbox-keep-failed."""
    state = item.config.stash.get(state_key, None)
    fresh: list[Machine] = item.stash.get(_used_key, [])
    machines = machines + fresh
    item.stash[extras.FAILED_GUESTS] = machines
    # By name, with the report (through xdist too): the pool that owns them keeps
    # them with --devbox-keep-failed (plugin/session.py).
    test_report.devbox_guests = [m.name for m in machines]  # type: ignore[attr-defined]
    report.add_guest_sections(test_report, machines)
    if state is not None and state.settings.keep_failed and machines:
        report.add_kept_section(test_report, machines, shared)
    root = state.settings.artifacts_dir if state is not None else None
    if root is not None and machines:
        report.add_artifacts(test_report, machines, root, item.nodeid)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(state_key, None)
    if state is None or not state.selected or config.option.collectonly:
        return
    # The pool is closed by now (sessionfinish runs first); its stats remain.
    report.write_summary(terminalreporter, state)
    for line in report.eol_warnings(state.selected):
        terminalreporter.write_line(f"devbox: {line}", yellow=True)
    before = config.stash.get(_audit_key, None)
    if before is not None:
        new = code_audit.appeared(before, code_audit.scan(state.settings.code_dir))
        for line in code_audit.summary_lines(state.settings.code_dir, new):
            terminalreporter.write_line(line, red=True)


# --- fixtures -------------------------------------------------------------------------


def _state(request: pytest.FixtureRequest) -> DevboxSession:
    return request.config.stash[state_key]


def _record(request: pytest.FixtureRequest, machine: Machine) -> None:
    request.node.stash.setdefault(_used_key, []).append(machine)


def _ready(state: DevboxSession, distro: str) -> None:
    """Before the first guest: the other distros' images build alongside; then fail
    fast for a distro that failed to start or build earlier."""
    state.warm_up(eager=False)
    if distro in state.broken:
        pytest.fail(
            f"devbox: could not start {distro} (tried once this session, not again): "
            f"{state.broken[distro]}",
            pytrace=False,
        )


def _fail_setup(distro: str, error: str) -> NoReturn:
    # Called outside the except block so the report shows our message, not a chain.
    pytest.fail(f"devbox: could not start {distro}: {error}", pytrace=False)


@pytest.fixture(scope="session")
def _devbox_distro(request: pytest.FixtureRequest) -> str:
    """The distro this test instance runs on (set by pytest_generate_tests)."""
    distro: str | None = getattr(request, "param", None)
    if distro is None:  # pragma: no cover - collection_modifyitems skipped the test
        pytest.skip(f"no devbox distro selected: {HOW_TO_SELECT}")
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


@pytest.fixture(scope="session")
def devbox(request: pytest.FixtureRequest, _devbox_distro: str) -> Generator[Machine, None, None]:
    """The running guest of this test's distro, shared by every test of that distro.

    Session-scoped and parametrized by distro: a fixture of any scope may use it, and
    exists once per distro. Started on first use, stopped after the distro's last test
    (kept running with --devbox-keep).
    """
    state = _state(request)
    _ready(state, _devbox_distro)
    error = ""
    try:
        machine = state.shared(_devbox_distro)
    except DevboxError as e:
        error = str(e)
    if error:
        state.broken[_devbox_distro] = error.splitlines()[0]
        _fail_setup(_devbox_distro, error)
    yield machine
    # pytest tears a session-parametrized fixture down when the next distro's tests begin
    # (or at the session's end): this distro's tests are all done.
    state.release(_devbox_distro)


@pytest.fixture
def devbox_fresh(
    request: pytest.FixtureRequest, _devbox_distro: str
) -> Generator[Machine, None, None]:
    """A new guest of this test's distro for this test alone, destroyed afterwards."""
    state = _state(request)
    _ready(state, _devbox_distro)
    with contextlib.ExitStack() as stack:
        error = ""
        try:
            machine = stack.enter_context(state.pool.fresh(_devbox_distro))
        except DevboxError as e:
            error = str(e)
        if error:
            _fail_setup(_devbox_distro, error)
        _record(request, machine)
        yield machine


@pytest.fixture
def _devbox_topology(request: pytest.FixtureRequest) -> dict[str, str]:
    """{role: distro} of this test instance (set by pytest_generate_tests)."""
    roles: dict[str, str] | None = getattr(request, "param", None)
    if roles is None:  # pragma: no cover - collection_modifyitems skipped the test
        pytest.skip(f"no devbox distro selected: {HOW_TO_SELECT}")
    return roles


@pytest.fixture
def devbox_topology(
    request: pytest.FixtureRequest, _devbox_topology: dict[str, str]
) -> Generator[dict[str, Machine], None, None]:
    """Fresh guests of the test's @pytest.mark.devbox_topology roles on a private network
    of their own: {role: guest}, each guest a `devbox` handle with `.address`, its
    address there; each resolves the others' role names. Function scope: the group is
    started for this test alone (restored from save slots where the stack allows it) and
    destroyed after it (kept, with ssh lines, by --devbox-keep-failed when it failed).
    """
    from ..pool.topology import topology as start_topology

    state = _state(request)
    for distro in dict.fromkeys(_devbox_topology.values()):
        _ready(state, distro)
    label = topology.combination_id(_devbox_topology)
    with contextlib.ExitStack() as stack:
        error = ""
        try:
            group = stack.enter_context(start_topology(state.pool, _devbox_topology))
        except DevboxError as e:
            error = str(e)
        if error:
            _fail_setup(f"the topology {label}", error)
        for machine in group.values():
            _record(request, machine)
        yield group
