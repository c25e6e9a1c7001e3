"""What every `devbox` subcommand works with: the project's settings, resolved through
the one options table exactly as the plugin resolves them (command line, then
$PYTEST_DEVBOX*, then the project's pytest config file), its profiles, and the guests
that `devbox up` left running."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from ..config import project_files
from ..config.option_table import COMMAND_FLAGS, OPTIONS
from ..config.profiles import Profile, canonical, eol_warning, load_profiles, select
from ..config.resolve import Places, resolve
from ..config.settings import Settings
from ..errors import DevboxError, ProfileError, UnknownDistro
from ..pool import kept
from ..pool.kept import KeptGuest

if TYPE_CHECKING:
    from ..guest.machine import Machine
    from ..pool.pool import Pool

T = TypeVar("T")
R = TypeVar("R")


class UsageProblem(DevboxError):
    """The command line asks for something that cannot be: exit status 2."""


# What a person typed wrong (exit 2), as opposed to what went wrong while working (1).
USAGE_ERRORS = (UsageProblem, pytest.UsageError, UnknownDistro, ProfileError)


def log(line: str) -> None:
    """Progress and notes: stderr, so stdout holds only what was asked for."""
    print(line, file=sys.stderr, flush=True)


def running(uri: str) -> list[str]:
    """Names of the devbox domains at `uri`."""
    return kept.running_names(uri)


@dataclass(frozen=True)
class Context:
    settings: Settings
    profiles: dict[str, Profile]
    distros: list[str]  # named on the command line, else the project's selection
    project: project_files.ProjectConfig

    def selected(self, what: str = "up") -> list[Profile]:
        """The profiles of the distros asked for; at least one, or a usage error."""
        if not self.distros:
            raise UsageProblem(
                f"name a distro, e.g. `devbox {what} debian-12` (or set the devbox ini "
                "option or $PYTEST_DEVBOX for this project)"
            )
        chosen = select(self.distros, self.profiles)
        for p in chosen:
            warning = eol_warning(p)
            if warning is not None:
                log(f"devbox: {warning}")
        return chosen

    def check_offline(self, profiles: Sequence[Profile]) -> None:
        """With --offline, a distro whose vendor image is not in the cache is a usage
        error now, before anything starts (image/availability.py)."""
        if not self.settings.offline:
            return
        from ..image.availability import offline_problem

        for p in profiles:
            problem = offline_problem(p, self.settings.cache_dir)
            if problem is not None:
                raise UsageProblem(problem)

    def pool(self, profiles: Sequence[Profile], **changes: Any) -> Pool:
        from ..pool.pool import Pool

        return Pool(profiles, replace(self.settings, **changes), log=log)

    def record(self, machine: Machine) -> kept.KeptGuest:
        """What a kept record of `machine` holds (not saved)."""
        return kept.KeptGuest(
            machine.name,
            machine.distro,
            self.settings.uri_for(machine.distro),  # the hosts map may put it elsewhere
            str(machine.overlay),
            tuple(machine.ssh_argv()),
            code_dir=str(self.settings.code_dir),
            share=machine.share,
        )

    def remember(self, machine: Machine) -> kept.KeptGuest:
        """Record a guest left running, so later commands find it."""
        guest = self.record(machine)
        kept.save(self.settings.cache_dir, guest)
        return guest

    def refresh(self, guest: kept.KeptGuest) -> None:
        """Bring a kept guest's /code up to date when it is a copy (share "sync") of the
        code dir it was started with; a shared /code is always current."""
        if guest.share != "sync":
            return
        from ..guest.sync import CodeSync
        from ..pool.reuse import login

        with login(guest, self.settings.cache_dir) as conn:
            # `devbox up` prepared /code as root: the guest user's login is enough.
            code = CodeSync(
                Path(guest.code_dir),
                self.settings.sync_exclude,
                user=lambda: conn,
                root=None,
                label=guest.distro,
                log=log,
            )
            code.sync()

    def uris(self) -> list[str]:
        """Every libvirt URI this project runs guests at: --uri (devbox_uri) and the
        URIs of its hosts map, each once."""
        s = self.settings
        return list(dict.fromkeys([s.uri, *(uri for _distro, uri in s.hosts)]))

    def kept(self) -> list[kept.KeptGuest]:
        """Guests `devbox up` left running (oldest first); stale records are dropped."""
        return kept.load_all(self.settings.cache_dir, running, log)

    def ours(self) -> dict[str, KeptGuest]:
        """This project's guests of `devbox up` by distro, the newest of each: kept in
        this cache, sharing this code dir, not a failed test's evidence. Any other kept
        guest is used only when named in full (`named`), as --devbox-reuse does."""
        here = self.settings.code_dir.resolve()
        return {g.distro: g for g in self.kept() if not g.failed and shares_code_dir(g, here)}

    def named(self, name: str) -> KeptGuest | None:
        """The kept guest whose domain is called `name`, of any project."""
        return next((g for g in self.kept() if g.name == name), None)


def shares_code_dir(guest: KeptGuest, code_dir: Path) -> bool:
    """Whether `guest` shares `code_dir` (resolved) as /code: then it is that project's."""
    return Path(guest.code_dir or "/nonexistent").resolve() == code_dir


def _command_line(args: argparse.Namespace, pytest_args: Mapping[str, Any]) -> dict[str, Any]:
    """Values by option key: the command's own flags on top of pytest's addopts."""
    values = dict(pytest_args)
    for opt in OPTIONS:
        own = getattr(args, opt.key, None)
        if own is None:
            continue
        if opt.kind == "list":  # repeatable: pytest adds command-line ones to addopts'
            own = [*values.get(opt.key, []), *own]
        values[opt.key] = own
    return values


def load_context(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Context:
    """Resolve the settings for `args` the way the plugin would in the same project."""
    env = os.environ if env is None else env
    start = Path(getattr(args, "project", None) or Path.cwd())
    if not start.is_dir():
        raise UsageProblem(f"--project {start}: not a directory")
    project = project_files.locate(start)
    cli = _command_line(args, project_files.pytest_args(project, env))
    places = Places(cwd=Path.cwd(), ini_dir=project.ini_dir, rootdir=project.rootdir)
    # Every command but doctor (which reports it) trusts the cache: checked here.
    cache_used = getattr(args, "command", None) != "doctor"
    resolved = resolve(
        cli, project.read, places, env=env, flags=COMMAND_FLAGS, cache_used=cache_used
    )
    profiles = load_profiles(project.rootdir)
    # Aliases (alma-9) become the canonical names (almalinux-9) that guests record.
    distros = [canonical(d, profiles) for d in resolved.distros]
    return Context(resolved.settings, profiles, distros, project)
