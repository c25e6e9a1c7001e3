"""pytest hooks and fixtures: options, ini, marker, parametrization by distro, reports.

This module only wires pytest to the layers below. Nothing here talks to libvirt: the
`Pool` (and with it libvirt and paramiko) is imported and created the first time a
fixture needs a guest, so a session that selects no distro never opens a connection.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from .errors import DevboxError, ProfileError, UnknownDistro
from .host import default_cache_dir, resolve_accel
from .settings import Settings

if TYPE_CHECKING:
    from .distros import Profile
    from .machine import Machine
    from .pool import DistroStats, Pool

ENV_DISTROS = "PYTEST_DEVBOX"
ACCELS = ("auto", "kvm", "tcg")
DEFAULT_URI = "qemu:///system"
HOW_TO_SELECT = "run with --devbox=debian-12 (or set PYTEST_DEVBOX / the devbox ini option)"
# How many recent commands a failed test's report shows per guest.
REPORT_COMMANDS = 20
# systemd colours its console lines; the report shows them as plain text.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("devbox", "run tests in disposable libvirt VMs (pytest-devbox)")
    group.addoption(
        "--devbox",
        dest="devbox",
        metavar="LIST",
        default=None,
        help="comma-separated distros to run the devbox tests on ('all' for every known "
        f"profile). Overrides ${ENV_DISTROS}, which overrides the 'devbox' ini option.",
    )
    group.addoption(
        "--devbox-uri",
        dest="devbox_uri",
        metavar="URI",
        default=None,
        help=f"libvirt connection URI (default: {DEFAULT_URI}).",
    )
    group.addoption(
        "--devbox-cache",
        dest="devbox_cache",
        metavar="DIR",
        default=None,
        help="image and key cache (default: /var/cache/pytest-devbox as root, else "
        "$XDG_CACHE_HOME/pytest-devbox; $PYTEST_DEVBOX_CACHE overrides).",
    )
    group.addoption(
        "--devbox-code-dir",
        dest="devbox_code_dir",
        metavar="DIR",
        default=None,
        help="host directory shared as /code in every guest (default: pytest's rootdir).",
    )
    group.addoption(
        "--devbox-accel",
        dest="devbox_accel",
        metavar="auto|kvm|tcg",
        default=None,
        help="virtualisation: kvm, tcg (software emulation) or auto (kvm where it really "
        "works). Default: auto.",
    )
    group.addoption(
        "--devbox-rebuild",
        dest="devbox_rebuild",
        action="store_true",
        default=None,
        help="rebuild the cached disk images of the selected distros.",
    )
    group.addoption(
        "--devbox-keep",
        dest="devbox_keep",
        action="store_true",
        default=None,
        help="leave the guests running after the session and print how to reach them.",
    )
    group.addoption(
        "--devbox-offline",
        dest="devbox_offline",
        action="store_true",
        default=None,
        help="do not use the public virt-builder index: only local template repositories.",
    )
    group.addoption(
        "--devbox-repo",
        dest="devbox_repo",
        metavar="URI",
        action="append",
        default=None,
        help="an extra virt-builder repository index URI (repeatable).",
    )

    parser.addini("devbox", "comma-separated distros to run the devbox tests on", default="")
    parser.addini("devbox_uri", "libvirt connection URI", default="")
    parser.addini("devbox_cache", "image and key cache directory", default="")
    parser.addini("devbox_code_dir", "host directory shared as /code", default="")
    parser.addini("devbox_accel", "auto, kvm or tcg", default="")
    parser.addini("devbox_rebuild", "rebuild cached images", type="bool", default=False)
    parser.addini(
        "devbox_keep", "leave guests running after the session", type="bool", default=False
    )
    parser.addini("devbox_offline", "only local template repositories", type="bool", default=False)
    parser.addini("devbox_repo", "extra virt-builder repository index URIs", type="linelist")


def parse_distro_list(value: str, source: str) -> list[str]:
    """Split 'debian-11, debian-12' into names; an empty name is a usage error."""
    names = [n.strip() for n in value.split(",")]
    if any(not n for n in names):
        raise pytest.UsageError(
            f"{source}={value!r} contains an empty distro name: "
            "give a comma-separated list like debian-11,debian-12"
        )
    return names


@dataclass
class Outcomes:
    """Test outcomes of one distro, for the terminal summary."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0


class DevboxSession:
    """Everything the plugin knows in one pytest session; registered as a plugin."""

    def __init__(
        self,
        settings: Settings,
        profiles: dict[str, Profile],
        selected: list[Profile],
        *,
        accel: str,
        log: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.profiles = profiles
        self.selected = selected
        self.accel = accel
        self.log = log
        # nodeid -> (distro, "passed" | "failed" | "skipped"), one entry per test.
        self.results: dict[str, tuple[str, str]] = {}
        self.stats: dict[str, DistroStats] = {}
        self.keep_lines: list[str] = []
        self.close_error = ""
        # A distro whose shared guest failed to start: later tests fail fast, not reboot.
        self.broken: dict[str, str] = {}
        self._pool: Pool | None = None

    @property
    def selected_names(self) -> list[str]:
        return [p.name for p in self.selected]

    @property
    def pool(self) -> Pool:
        """The session's Pool, created on first use (importing libvirt and paramiko then)."""
        if self._pool is None:
            from .pool import Pool

            self._pool = Pool(self.selected, self.settings, log=self.log)
            self.stats = self._pool.stats
        return self._pool

    def close(self) -> None:
        """Stop every guest (idempotent); with keep, remember how to reach them."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            self.keep_lines = pool.close()
        except DevboxError as e:
            self.close_error = str(e)

    def distros_for(self, node: Any) -> tuple[list[str], str]:
        """The selected distros a test runs on after its devbox markers, and why none if so."""
        names = self.selected_names
        if not names:
            return [], f"no devbox distro selected: {HOW_TO_SELECT}"
        include, exclude = marker_limits(node, self.profiles)
        chosen = [n for n in names if (include is None or n in include) and n not in exclude]
        if chosen:
            return chosen, ""
        limits = []
        if include is not None:
            limits.append(f"only {', '.join(sorted(include))}")
        if exclude:
            limits.append(f"not {', '.join(sorted(exclude))}")
        return [], (
            f"the devbox marker ({'; '.join(limits)}) excludes every selected distro "
            f"({', '.join(names)})"
        )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        distro = getattr(report, "devbox_distro", None)
        if distro is None:
            return
        # A test has one outcome: any failed phase fails it, a skip beats a pass.
        previous = self.results.get(report.nodeid, (distro, ""))[1]
        if report.failed:
            outcome = "failed"
        elif report.skipped and previous != "failed":
            outcome = "skipped"
        elif report.passed and report.when == "call" and not previous:
            outcome = "passed"
        else:
            return
        self.results[report.nodeid] = (distro, outcome)

    def outcomes(self, distro: str) -> Outcomes:
        counts = Outcomes()
        for d, outcome in self.results.values():
            if d == distro:
                setattr(counts, outcome, getattr(counts, outcome) + 1)
        return counts


state_key = pytest.StashKey[DevboxSession]()
_used_key = pytest.StashKey[list["Machine"]]()
DISTRO_PARAM = "_devbox_distro"


def marker_limits(node: Any, profiles: dict[str, Profile]) -> tuple[set[str] | None, set[str]]:
    """(include or None for no limit, exclude) from every devbox marker on a test.

    Markers on the function, class and module narrow each other: includes intersect,
    excludes add up. Unknown names fail the test's collection with the known names.
    """
    include: set[str] | None = None
    exclude: set[str] = set()
    where = getattr(node, "nodeid", "") or getattr(node, "name", "")
    for mark in node.iter_markers("devbox"):
        extra = set(mark.kwargs) - {"exclude"}
        if extra:
            pytest.fail(
                f"{where}: @pytest.mark.devbox got unknown keyword(s) {sorted(extra)}; "
                'use @pytest.mark.devbox("debian-12", ...) or '
                '@pytest.mark.devbox(exclude=["centos-7"])',
                pytrace=False,
            )
        excluded = mark.kwargs.get("exclude", ())
        if isinstance(excluded, str):
            excluded = (excluded,)
        names = [*mark.args, *excluded]
        if not names:
            pytest.fail(
                f"{where}: @pytest.mark.devbox needs distro names or exclude=[...]",
                pytrace=False,
            )
        for name in names:
            if not isinstance(name, str) or name not in profiles:
                pytest.fail(
                    f"{where}: @pytest.mark.devbox names unknown distro {name!r}; "
                    f"known distros: {', '.join(sorted(profiles))}",
                    pytrace=False,
                )
        if mark.args:
            include = set(mark.args) if include is None else include & set(mark.args)
        exclude.update(excluded)
    return include, exclude


def _first(*values: Any) -> Any:
    """The first value that is set: command line, then env, then ini."""
    for v in values:
        if v not in (None, "", []):
            return v
    return None


def _dir_option(config: pytest.Config, name: str) -> Path | None:
    """A directory option: the command line's is relative to the invocation dir, the ini
    file's to the ini file's folder; None when neither is set."""
    cli: str | None = config.getoption(name)
    if cli:
        return (config.invocation_params.dir / os.path.expanduser(cli)).resolve()
    ini: str = config.getini(name)
    if ini:
        base = config.inipath.parent if config.inipath else config.rootpath
        return (base / os.path.expanduser(ini)).resolve()
    return None


def _selected_names(config: pytest.Config) -> list[str]:
    cli = config.getoption("devbox")
    if cli is not None:
        # An explicit empty --devbox= selects nothing, overriding env and ini.
        return parse_distro_list(cli, "--devbox") if cli.strip() else []
    env = os.environ.get(ENV_DISTROS, "")
    if env.strip():
        return parse_distro_list(env, ENV_DISTROS)
    ini = str(config.getini("devbox"))
    if ini.strip():
        return parse_distro_list(ini, "the devbox ini option")
    return []


def build_state(config: pytest.Config) -> DevboxSession:
    """Read and check every option; any bad value is a pytest.UsageError (exit code 4)."""
    from .distros import load_profiles, select

    names = _selected_names(config)
    try:
        profiles = load_profiles(config.rootpath)
    except ProfileError as e:
        raise pytest.UsageError(f"devbox: {e}") from e
    try:
        selected = select(names, profiles) if names else []
    except UnknownDistro as e:
        raise pytest.UsageError(f"devbox: {e}") from e

    accel = _first(config.getoption("devbox_accel"), config.getini("devbox_accel")) or "auto"
    if accel not in ACCELS:
        raise pytest.UsageError(f"devbox: unknown accel {accel!r}: use auto, kvm or tcg")

    code_dir = _dir_option(config, "devbox_code_dir") or config.rootpath
    if not code_dir.is_dir():
        raise pytest.UsageError(
            f"devbox: the code dir {code_dir} does not exist or is not a directory; "
            "point --devbox-code-dir (or the devbox_code_dir ini option) at your project"
        )

    cache_dir = _dir_option(config, "devbox_cache") or default_cache_dir()

    repos = config.getoption("devbox_repo") or config.getini("devbox_repo") or []
    settings = Settings(
        uri=_first(config.getoption("devbox_uri"), config.getini("devbox_uri")) or DEFAULT_URI,
        cache_dir=cache_dir,
        code_dir=code_dir,
        accel=accel,
        rebuild=bool(config.getoption("devbox_rebuild") or config.getini("devbox_rebuild")),
        keep=bool(config.getoption("devbox_keep") or config.getini("devbox_keep")),
        offline=bool(config.getoption("devbox_offline") or config.getini("devbox_offline")),
        repos=tuple(repos),
    )

    resolved = ""
    if selected:
        try:
            resolved = resolve_accel(accel)  # cheap: file checks, no libvirt
        except DevboxError as e:
            raise pytest.UsageError(f"devbox: {e}") from e

    return DevboxSession(settings, profiles, selected, accel=resolved, log=_make_log(config))


def _make_log(config: pytest.Config) -> Callable[[str], None]:
    def log(message: str) -> None:
        # Image builds and boots take tens of seconds: say what is happening.
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and config.get_verbosity() >= 0:
            reporter.write_line(f"devbox: {message}")

    return log


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "devbox(*distros, exclude=()): run this test only on these of the selected devbox "
        "distros, or on all selected but the excluded ones.",
    )
    if config.getoption("help", False) or config.getoption("version", False):
        return
    state = build_state(config)
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
    if state is None or not state.selected:
        return None
    s = state.settings
    return (
        f"devbox: uri={s.uri} accel={state.accel} "
        f"distros={','.join(state.selected_names)} cache={s.cache_dir}"
    )


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


@pytest.fixture
def _devbox_distro(request: pytest.FixtureRequest) -> str:
    """The distro this test instance runs on (set by pytest_generate_tests)."""
    distro: str | None = getattr(request, "param", None)
    if distro is None:
        state = request.config.stash[state_key]
        _, why = state.distros_for(request.node)
        pytest.skip(why or f"no devbox distro selected: {HOW_TO_SELECT}")
    return distro


def _state(request: pytest.FixtureRequest) -> DevboxSession:
    return request.config.stash[state_key]


def _record(request: pytest.FixtureRequest, machine: Machine) -> None:
    request.node.stash.setdefault(_used_key, []).append(machine)


def _fail_setup(distro: str, error: str) -> NoReturn:
    # Called outside the except block so the report shows our message, not a chain.
    pytest.fail(f"devbox: could not start {distro}: {error}", pytrace=False)


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


def format_commands(machine: Machine, limit: int = REPORT_COMMANDS) -> str:
    """The guest's recent commands, one a line: exit status, duration, command."""
    history = list(machine.history)[-limit:]
    if not history:
        return "(no commands run)"
    return "\n".join(
        f"exit {r.exit_status!s:>4}  {r.duration:7.2f} s  {r.command}" for r in history
    )


def _add_guest_sections(report: pytest.TestReport, machines: Sequence[Machine]) -> None:
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    callspec = getattr(item, "callspec", None)
    distro = callspec.params.get(DISTRO_PARAM) if callspec is not None else None
    if distro is None:
        return
    # Travels with the report (also through xdist) so the summary can count per distro.
    report.devbox_distro = distro  # type: ignore[attr-defined]
    if report.failed:
        machines: list[Machine] = item.stash.get(_used_key, [])
        _add_guest_sections(report, machines)


def _summary_rows(state: DevboxSession) -> list[tuple[str, ...]]:
    stats = state.stats
    rows: list[tuple[str, ...]] = [
        ("distro", "boots", "boot", "image", "passed", "failed", "skipped")
    ]
    for name in state.selected_names:
        st = stats.get(name)
        counts = state.outcomes(name)
        boots = str(st.boots) if st else "0"
        boot = f"{st.boot_seconds:.1f} s" if st and st.boot_seconds is not None else "-"
        if st is None or st.image_built is None:
            image = "-"
        elif st.image_built:
            took = f" in {st.build_seconds:.1f} s" if st.build_seconds is not None else ""
            image = f"built{took}"
        else:
            image = "cached"
        if st and st.retried:
            image += f" (retried {st.retried})"
        rows.append(
            (name, boots, boot, image, str(counts.passed), str(counts.failed), str(counts.skipped))
        )
    return rows


def format_table(rows: Iterable[tuple[str, ...]]) -> list[str]:
    rows = list(rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.ljust(w) if i == 0 or i == 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(state_key, None)
    if state is None or not state.selected or config.option.collectonly:
        return
    # The pool is closed by now (sessionfinish runs first); its stats remain.
    terminalreporter.section("devbox")
    for line in format_table(_summary_rows(state)):
        terminalreporter.write_line(line)
    if state.close_error:
        terminalreporter.write_line(f"error while stopping guests: {state.close_error}", red=True)
    for line in state.keep_lines:
        terminalreporter.write_line(line)
