"""What a failed test leaves for the person reading the failure: each guest's console
log, the tails of its journal and kernel log, and its SELinux denials where it has
SELinux, saved under `--devbox-artifacts DIR`.

Collected while the guest still runs (a shared guest lives on; a fresh one is destroyed
after its test's teardown). Each file that cannot be had says why, in the file itself:
a broken guest must not hide the failure it is evidence for.
"""

from __future__ import annotations

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


def artifacts_dir_for(root: Path, nodeid: str) -> Path:
    """The directory of one test's artifacts: its node id made a file name."""
    return root / _UNSAFE.sub("_", nodeid).strip("_")


def collect(machines: Sequence[Machine], dest: Path) -> list[Path]:
    """Save each guest's evidence under `dest/<guest name>/`; the files written."""
    written: list[Path] = []
    for machine in machines:
        where = dest / machine.name
        where.mkdir(parents=True, exist_ok=True)
        console = where / "console.log"
        try:
            if machine.remote is None:
                shutil.copyfile(machine.console_log, console)
            else:  # the file is on the remote host: its last 64 KiB, through libvirt
                console.write_text(machine.console_tail(100_000) + "\n")
        except OSError as e:
            console.write_text(f"(console log unavailable: {e})\n")
        written.append(console)
        for name, command in COMMANDS.items():
            path = where / name
            path.write_text(_output(machine, command))
            written.append(path)
    return written


def _output(machine: Machine, command: str) -> str:
    if machine.closed:
        return "(the guest was already stopped)\n"
    try:
        result = machine.run(command, user="root", check=False, timeout=COMMAND_TIMEOUT, cwd="/")
    except DevboxError as e:
        return f"(could not run {command!r} in the guest: {e})\n"
    return result.stdout
