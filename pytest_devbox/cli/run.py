"""`devbox run`: one line of shell code, in /code, on one or several guests at once.

Like ssh, the command's words are joined with spaces and the guest's shell reads the
result, so `devbox run debian-12 -- 'ls | head -3; pwd'` runs a pipeline there, as the
guest user `devbox` (root with --root). This project's guests that are up (`devbox up`
in the same code dir) are used, and any kept guest named in full; the others are booted
for this command, in parallel, and destroyed afterwards (unless --keep). With several
distros every line of output is shown as it arrives, prefixed by its distro, and each
distro ends with a result line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from ..config.option_table import spell_for_command
from ..config.profiles import select
from ..errors import DevboxError
from ..host.parallel import run_bounded
from ..pool.kept import login_argv
from .context import Context, UsageProblem, log

if TYPE_CHECKING:
    from ..pool.kept import KeptGuest
    from ..pool.pool import Pool

SSH_FAILED = 255  # what ssh exits with when it could not run the command at all


def remote_line(words: Sequence[str]) -> str:
    """The shell line the guest runs: the words joined as ssh joins them, in /code."""
    return "cd /code || exit; " + " ".join(words)


@dataclass(frozen=True)
class Outcome:
    distro: str
    status: int
    seconds: float


class Prefixed:
    """Writes the output of several guests as it arrives, each line prefixed by its
    distro; a lock keeps lines whole when two guests write at once."""

    def __init__(self, names: Sequence[str]) -> None:
        self.width = max(len(n) for n in names)
        self.lock = threading.Lock()

    def _copy(self, name: str, source: IO[bytes], sink: IO[bytes]) -> None:
        prefix = f"{name:<{self.width}} | ".encode()
        for line in iter(source.readline, b""):
            with self.lock:
                sink.write(prefix + line + (b"" if line.endswith(b"\n") else b"\n"))
                sink.flush()

    def run(self, name: str, argv: list[str]) -> int:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stderr is not None
        copies = [
            threading.Thread(target=self._copy, args=(name, proc.stdout, sys.stdout.buffer)),
            threading.Thread(target=self._copy, args=(name, proc.stderr, sys.stderr.buffer)),
        ]
        for t in copies:
            t.start()
        status = proc.wait()
        for t in copies:
            t.join()
        return status


def _targets(args: argparse.Namespace, ctx: Context, up: dict[str, KeptGuest]) -> list[str]:
    """What to run on: distros (this project's guest of each when up, else one booted),
    or any kept guest named in full (added to `up`)."""
    if not args.all_up:
        named = {n: g for n in ctx.distros if n not in ctx.profiles and (g := ctx.named(n))}
        if not named:
            return [p.name for p in ctx.selected("run")]  # checks every name before any boot
        up.update(named)
        rest = select([n for n in ctx.distros if n not in named], ctx.profiles)
        return [*named, *(p.name for p in rest)]
    if args.words:
        raise UsageProblem("--all-up runs on every guest that is up: name no distro with it")
    if not up:
        raise DevboxError("no guest of this project is up: start some with `devbox up DISTRO...`")
    return sorted(up)


def _note_other_code(ctx: Context, guest: KeptGuest) -> None:
    here = str(ctx.settings.code_dir)
    if guest.code_dir and guest.code_dir != here:
        log(f"{guest.distro}: note: {guest.name} shares {guest.code_dir} as /code, not {here}")


def login_user(args: argparse.Namespace) -> str:
    """`devbox`, whose uid is the caller's (what it writes in /code is theirs); root
    only when asked for (--root)."""
    from ..config.settings import GUEST_USER
    from ..transport.logins import ROOT

    return ROOT if getattr(args, "root", False) else GUEST_USER


def cmd_run(args: argparse.Namespace, ctx: Context) -> int:
    if not args.command:
        raise UsageProblem("nothing to run: devbox run DISTRO -- COMMAND...")
    line = remote_line(args.command)
    up = ctx.ours()
    names = _targets(args, ctx, up)
    to_boot = [ctx.profiles[n] for n in names if n not in up]
    pool: Pool | None = ctx.pool(to_boot) if to_boot else None
    several = len(names) > 1
    out = Prefixed(names)
    user, cache_dir = login_user(args), ctx.settings.cache_dir

    def one(name: str) -> Outcome:
        guest = up.get(name)
        if guest is not None:
            _note_other_code(ctx, guest)
            ctx.refresh(guest)
        else:
            assert pool is not None
            machine = pool.get(name)
            guest = ctx.remember(machine) if ctx.settings.keep else ctx.record(machine)
        argv = login_argv(guest, cache_dir, user)
        t0 = time.monotonic()
        if several:
            status = out.run(name, [*argv, line])
        else:  # one guest: its output as is, and the terminal for the command
            status = subprocess.run([*argv, line], check=False).returncode
        return Outcome(name, status, time.monotonic() - t0)

    try:
        outcomes = run_bounded(names, one, at_once=len(names))
    finally:
        if pool is not None:
            pool.close()  # the guests booted for this command go (with --keep: stay)
    return _report(names, outcomes, several)


def _report(names: list[str], outcomes: list[Outcome | DevboxError], several: bool) -> int:
    """One line per distro when there are several; the exit status of the command."""
    failed = False
    for name, outcome in zip(names, outcomes):
        if isinstance(outcome, DevboxError):
            failed = True
            log(f"{name}: could not start: {spell_for_command(str(outcome))}")
            continue
        failed = failed or outcome.status != 0
        if several:
            verdict = "ok" if outcome.status == 0 else "FAILED"
            how = "ssh could not connect" if outcome.status == SSH_FAILED else "exit"
            log(f"{name}: {verdict} ({how} {outcome.status}, {outcome.seconds:.1f} s)")
    if not several and not isinstance(outcomes[0], DevboxError):
        return outcomes[0].status  # like ssh: the command's own exit status
    return 1 if failed else 0
