"""What a failed test leaves for the person reading the failure: each guest's console
log, the tails of its journal and kernel log, and its SELinux denials where it has
SELinux, saved under `--devbox-artifacts DIR`.

Collected while the guest still runs (a shared guest lives on; a fresh one is destroyed
after its test's teardown). Each file that cannot be had says why, in the file itself:
a broken guest must not hide the failure it is evidence for.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DevboxError

if TYPE_CHECKING:
    from ..guest.machine import Machine

# Enough to see the boot and the minutes before the failure, small enough to upload.
JOURNAL_LINES = 2000
DMESG_LINES = 300
COMMAND_TIMEOUT = 60.0
# file name -> root command; each prints what it found or why it found nothing.
COMMANDS = {
    "journal.txt": f"journalctl -b --no-pager -n {JOURNAL_LINES} 2>&1",
    "dmesg.txt": f"dmesg 2>&1 | tail -n {DMESG_LINES}",
    "selinux-denials.txt": (
        "if [ ! -e /sys/fs/selinux/enforce ]; then echo 'no SELinux in this guest'; "
        "elif command -v ausearch >/dev/null; then ausearch -m AVC,USER_AVC -ts boot 2>&1; "
        "else journalctl -b --no-pager 2>&1 | grep -i 'avc:' || echo 'no denials'; fi"
    ),
}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# A file name has at most 255 bytes: a long parametrized id is cut, and a hash of the
# whole id keeps cut or same-after-cleaning ids ([a/b] and [a_b]) apart.
NAME_CHARS = 120
HASH_CHARS = 10


def artifacts_dir_for(root: Path, nodeid: str) -> Path:
    """The directory of one test's artifacts: its node id made a short file name."""
    safe = _UNSAFE.sub("_", nodeid).strip("_")[:NAME_CHARS]
    digest = hashlib.sha256(nodeid.encode()).hexdigest()[:HASH_CHARS]
    return root / f"{safe}-{digest}"


def collect(machines: Sequence[Machine], dest: Path) -> tuple[list[Path], list[str]]:
    """Save each guest's evidence under `dest/<guest name>/`: the files written, and a
    line for each that could not be (a full disk must not end the session)."""
    written: list[Path] = []
    problems: list[str] = []
    for machine in machines:
        where = dest / machine.name
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problems.append(f"could not save {machine.name}'s artifacts in {where}: {e}")
            continue
        for name in ("console.log", *COMMANDS):
            path = where / name
            try:
                if name == "console.log":
                    _save_console(machine, path)
                else:
                    path.write_text(_output(machine, COMMANDS[name]))
            except OSError as e:
                problems.append(f"could not save {path}: {e}")
                continue
            written.append(path)
    return written, problems


def _save_console(machine: Machine, path: Path) -> None:
    try:
        if machine.remote is None:
            shutil.copyfile(machine.console_log, path)
        else:  # the file is on the remote host: its last 64 KiB, through libvirt
            path.write_text(machine.console_tail(100_000) + "\n")
    except (OSError, DevboxError) as e:
        path.write_text(f"(console log unavailable: {e})\n")


def _output(machine: Machine, command: str) -> str:
    if machine.closed:
        return "(the guest was already stopped)\n"
    try:
        result = machine.run(command, user="root", check=False, timeout=COMMAND_TIMEOUT, cwd="/")
    except DevboxError as e:
        return f"(could not run {command!r} in the guest: {e})\n"
    return result.stdout
