"""What a session's guests may have planted in the host's code dir: setuid or setgid
files and device nodes, found by a scan at session start and one at the end.

Whatever the share's id mode (config/code_ids.py), the summary names any such file that
appeared during the run, so an opted-in passthrough (or a host tool) cannot leave one
unnoticed. One lstat per entry, never following symlinks, .git skipped: cheap enough
for a working tree.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SKIP_DIRS = frozenset({".git"})


@dataclass(frozen=True, order=True)
class Finding:
    """One file a host user should not find in a working tree."""

    path: str  # relative to the code dir
    kind: str  # "setuid", "setgid", "setuid+setgid", "char device", "block device"
    uid: int
    mode: int

    def describe(self) -> str:
        return f"{self.path}: {self.kind}, owner uid {self.uid}, mode {stat.filemode(self.mode)}"


def _kind(mode: int) -> str | None:
    if stat.S_ISCHR(mode):
        return "char device"
    if stat.S_ISBLK(mode):
        return "block device"
    if not stat.S_ISREG(mode):
        return None
    bits = [
        name for bit, name in ((stat.S_ISUID, "setuid"), (stat.S_ISGID, "setgid")) if mode & bit
    ]
    return "+".join(bits) or None


def scan(root: Path) -> frozenset[Finding]:
    """Every setuid/setgid file and device node under `root` (.git skipped)."""
    found: set[Finding] = set()
    stack = [str(root)]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue  # gone, or not ours to read: nothing to report from there
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if entry.name not in SKIP_DIRS:
                    stack.append(entry.path)
                continue
            kind = _kind(st.st_mode)
            if kind is not None:
                rel = os.path.relpath(entry.path, root)
                found.add(Finding(rel, kind, st.st_uid, st.st_mode))
    return frozenset(found)


def appeared(before: Iterable[Finding], after: Iterable[Finding]) -> list[Finding]:
    """What the second scan found that the first did not, sorted by path."""
    return sorted(set(after) - set(before))


def summary_lines(code_dir: Path, new: Iterable[Finding]) -> list[str]:
    """The summary's warning, one line per file; [] when nothing appeared."""
    new = list(new)
    if not new:
        return []
    return [
        f"WARNING: {len(new)} setuid/setgid file(s) or device node(s) appeared in the code "
        f"dir {code_dir} during this run (remove them before running anything there):",
        *(f"  {f.describe()}" for f in new),
    ]
