"""What the plugin knows in one pytest session: settings, profiles, the pool, outcomes.

The `Pool` (and with it libvirt and paramiko) is imported and created the first time a
fixture needs a guest, so a session that selects no distro never opens a connection.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..config.option_table import HOW_TO_SELECT
from ..config.resolve import Resolved
from ..config.settings import Settings
from ..errors import DevboxError, ProfileError, UnknownDistro
from ..host import cpu_level
from ..host.probes import resolve_accel
from ..log import Log

if TYPE_CHECKING:
    from ..config.profiles import Profile
    from ..guest.machine import Machine
    from ..pool.pool import DistroStats, Pool
    from .broker import Broker


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
        log: Log,
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
        # distro -> whether a collected test uses its shared guest (else only fresh ones).
        self.planned: dict[str, bool] = {}
        # distro -> tests using its shared guest not yet done: at 0 the guest may stop.
        self.remaining: dict[str, int] = {}
        self._warmed = False
        self._pool: Pool | None = None
        # pytest-xdist: the controller's broker, or a worker's way to it (plugin/broker.py).
        self.broker: Broker | None = None
        self.broker_path: str | None = None
        self.worker_id = ""  # a worker's xdist id ("gw0"): the broker counts who uses what
        self.attached: dict[str, Machine] = {}  # a worker's view of the shared guests
        # The controller's: how many shared guests workers let go of, to wait on.
        self._releases = threading.Condition()
        self._released = 0

    @property
    def selected_names(self) -> list[str]:
        return [p.name for p in self.selected]

    @property
    def pool(self) -> Pool:
        """The session's Pool, created on first use (importing libvirt and paramiko then)."""
        if self._pool is None:
            from ..pool.pool import Pool

            self._pool = Pool(self.selected, self.settings, log=self.log)
            self.stats = self._pool.stats
        return self._pool

    def plan(self, items: list[pytest.Item], param: str) -> None:
        """Note which distros the collected tests need, and which need the shared guest."""
        for item in items:
            callspec = getattr(item, "callspec", None)
            distro = callspec.params.get(param) if callspec is not None else None
            if distro is None:
                continue
            shared = "devbox" in getattr(item, "fixturenames", ())
            self.remaining[distro] = self.remaining.get(distro, 0) + shared
            if item.get_closest_marker("skip") is None:
                self.planned[distro] = self.planned.get(distro, False) or shared

    def test_done(self, distro: str) -> None:
        """A test that used `distro`'s shared guest is done."""
        if self.remaining.get(distro, 0) > 0:
            self.remaining[distro] -= 1

    def warm_up(self, *, eager: bool) -> None:
        """Once a session: build the planned distros' missing images at the same time
        (with `eager`, start their shared guests too). A distro that failed is broken:
        its tests fail with the error instead of trying again."""
        if self._warmed:
            return
        self._warmed = True
        distros = [d for d in self.selected_names if d in self.planned]
        if eager:
            distros = [d for d in distros if self.planned[d]]
        elif len(distros) < 2:
            return  # one distro: its first test builds the image and boots, as before
        if eager and self.broker_path is not None:
            errors = self._borrow_all(distros)  # an xdist worker: the controller boots
        else:
            errors = self.pool.prepare(distros, boot=eager)
        for distro, error in errors.items():
            self.broken.setdefault(distro, error.splitlines()[0] if error else "failed")

    def _borrow_all(self, distros: list[str]) -> dict[str, str]:
        from ..host.parallel import limit, run_bounded

        at_once = limit(len(distros), max(self.profiles[d].memory_mib for d in distros))
        results = run_bounded(distros, self.shared, at_once)
        return {d: str(r) for d, r in zip(distros, results) if isinstance(r, DevboxError)}

    def shared(self, distro: str) -> Machine:
        """The shared guest of `distro`: the pool's, or under xdist the controller's."""
        if self.broker_path is None:
            return self.pool.get(distro)
        from .broker import ask, attach

        machine = self.attached.get(distro)
        if machine is None or machine.closed:
            info = ask(self.broker_path, distro, self.worker_id)
            machine = attach(self.profiles[distro], info, self.settings)
            self.attached[distro] = machine
        return machine

    def start_broker(self) -> None:
        """Under xdist, on the controller: serve the shared guests to the workers."""
        from .broker import Broker, describe

        pool = self.pool  # created here, in one thread, before any worker asks
        self.broker = Broker(
            lambda d: describe(self._shared_when_room(pool, d), self.settings.uri_for(d)),
            self._release_shared,
        )

    def _shared_when_room(self, pool: Pool, distro: str) -> Machine:
        """The controller's: `distro`'s shared guest. When the controller's own guests
        leave no room, it waits (at most a boot deadline) for workers to let one go."""
        from ..guest.plan import BOOT_TIMEOUT
        from ..virt.admission import NoMemory

        deadline = time.monotonic() + (self.settings.boot_timeout or BOOT_TIMEOUT[self.accel])
        while True:
            seen = self._released
            try:
                return pool.get(distro)
            except NoMemory as e:
                if not e.own:
                    raise
                with self._releases:
                    while self._released == seen:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise
                        self._releases.wait(left)

    def _release_shared(self, distro: str) -> None:
        """The controller's: no worker needs `distro`'s shared guest any more."""
        if self._pool is None:
            return
        try:
            self._pool.release(distro)
        except DevboxError as e:
            self.close_error = self.close_error or str(e)
        with self._releases:
            self._released += 1
            self._releases.notify_all()

    def shared_machine(self, distro: str) -> Machine | None:
        """The running shared guest of `distro`, or None (never starts one)."""
        attached = self.attached.get(distro)
        if attached is not None and not attached.closed:
            return attached
        return None if self._pool is None else self._pool.running(distro)

    def release(self, distro: str) -> None:
        """`distro`'s tests are done: stop its shared guest (kept with --devbox-keep).
        A worker lets go of it and tells the controller, which stops it once no worker
        needs it any more (a worker that gets more of its tests later asks again)."""
        attached = self.attached.pop(distro, None)
        if attached is not None:
            attached.detach()
            self._tell_done(distro)
            return
        if self._pool is None or self.broker is not None:
            return
        if self.remaining.get(distro, 0) > 0:
            # Tests were reordered (pytest-randomly, say): more of this distro's tests
            # come later, so the guest stays up for them instead of booting again.
            return
        try:
            self._pool.release(distro)
        except DevboxError as e:
            self.close_error = self.close_error or str(e)

    def _tell_done(self, distro: str) -> None:
        if self.broker_path is None:
            return
        from .broker import tell_done

        try:
            tell_done(self.broker_path, distro, self.worker_id)
        except DevboxError as e:  # the controller stops the guest at its end anyway
            self.log(f"{distro}: could not tell the pytest-xdist controller we are done: {e}")

    def close(self) -> None:
        """Stop every guest (idempotent); with keep, remember how to reach them."""
        attached, self.attached = self.attached, {}
        for distro, machine in attached.items():
            machine.detach()
            self._tell_done(distro)
        if self.broker is not None:
            self.broker.close()
            self.broker = None
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

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        """This xdist worker's per-distro stats (its fresh guests, its image builds)."""
        return {name: asdict(st) for name, st in self.stats.items()}

    def add_worker_stats(self, stats: dict[str, dict[str, Any]]) -> None:
        """Count an xdist worker's boots and builds in the controller's summary."""
        from ..pool.pool import DistroStats

        for name, theirs in stats.items():
            ours = self.stats.setdefault(name, DistroStats(name))
            ours.boots += theirs["boots"]
            ours.restores += theirs["restores"]
            ours.retried += theirs["retried"]
            for field in ("boot_seconds", "restore_seconds"):
                if getattr(ours, field) is None:
                    setattr(ours, field, theirs[field])
            if theirs["image_built"] and not ours.image_built:
                ours.image_built, ours.build_seconds = True, theirs["build_seconds"]
            elif ours.image_built is None:
                ours.image_built = theirs["image_built"]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        distro = getattr(report, "devbox_distro", None)
        if distro is None:
            # A topology's test has several distros: not counted per distro, but its
            # guests are kept with --devbox-keep-failed all the same.
            if report.failed and self._pool is not None:
                self._pool.mark_failed(getattr(report, "devbox_guests", ()), report.nodeid)
            return
        # A test has one outcome: any failed phase fails it, a skip beats a pass.
        previous = self.results.get(report.nodeid, (distro, ""))[1]
        if report.failed:
            outcome = "failed"
            if self._pool is not None:  # --devbox-keep-failed: its guests stay up
                self._pool.mark_failed(getattr(report, "devbox_guests", ()), report.nodeid)
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


def open_session(resolved: Resolved, project_dir: Path, log: Log) -> DevboxSession:
    """The session for resolved options: profiles loaded, distros and accel checked.

    Any problem is a pytest.UsageError (exit code 4), raised before anything boots.
    """
    from ..config.profiles import load_profiles, select

    try:
        profiles = load_profiles(project_dir)
        selected = select(resolved.distros, profiles) if resolved.distros else []
    except (ProfileError, UnknownDistro) as e:
        raise pytest.UsageError(f"devbox: {e}") from e
    if resolved.settings.offline:
        from ..image.availability import offline_problem

        for p in selected:
            problem = offline_problem(p, resolved.settings.cache_dir)
            if problem is not None:
                raise pytest.UsageError(f"devbox: {problem}")
    accel = ""
    if selected:
        try:
            accel = resolve_accel(resolved.settings.accel)  # cheap: file checks, no libvirt
        except DevboxError as e:
            raise pytest.UsageError(f"devbox: {e}") from e
        for p in selected if accel == "kvm" else ():  # KVM guests get the host's CPU
            problem = cpu_level.kvm_problem(p.name, p.cpu_level)
            if problem is not None:
                raise pytest.UsageError(f"devbox: {problem}")
    return DevboxSession(resolved.settings, profiles, selected, accel=accel, log=log)


def matrix(resolved: Resolved, project_dir: Path) -> list[str]:
    """The distros a CI matrix runs: the selected ones, or every known profile."""
    from ..config.profiles import load_profiles, select

    try:
        profiles = load_profiles(project_dir)
        if resolved.distros:
            return [p.name for p in select(resolved.distros, profiles)]
    except (ProfileError, UnknownDistro) as e:
        raise pytest.UsageError(f"devbox: {e}") from e
    return sorted(profiles)


def distro_in_nodeid(nodeid: str, names: list[str]) -> str | None:
    """The distro in a test id's parameters (`test_x[debian-12-1]`), the longest name
    that fits (debian-11-9p, not debian-11); None when there is none."""
    if not nodeid.endswith("]") or "[" not in nodeid:
        return None
    params = "-" + nodeid[nodeid.index("[") + 1 : -1] + "-"
    found = [n for n in names if f"-{n}-" in params]
    return max(found, key=len) if found else None


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
        from ..config.profiles import canonical

        for name in names:
            if not isinstance(name, str) or canonical(name, profiles) not in profiles:
                pytest.fail(
                    f"{where}: @pytest.mark.devbox names unknown distro {name!r}; "
                    f"known distros: {', '.join(sorted(profiles))}",
                    pytrace=False,
                )
        # An alias (alma-9) limits its canonical profile (almalinux-9), the test id's.
        named = {canonical(n, profiles) for n in mark.args}
        if mark.args:
            include = named if include is None else include & named
        exclude.update(canonical(n, profiles) for n in excluded)
    return include, exclude
