"""What `share = "sync"` copies: the files of the code dir, and how each one stands.

The list is what git would show when the code dir is in a git work tree and git is
installed (tracked files plus untracked ones that no .gitignore, nested ones included,
ignores); otherwise every file under the code dir. Either way the exclude patterns
(gitignore syntax, the ``devbox_sync_exclude`` ini option) then drop what matches.

Regular files and symbolic links are listed (a link as a link, never followed);
directories are not entries of their own: they are made as the files in them arrive.
A submodule or nested repository, which git lists as a directory, is left out.
Everything here is host side and pure of any guest: guest/sync.py sends what this finds.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# How a file stands, as the manifest records it: (size, mtime_ns, mode). A change in
# any of them sends the file again.
Stat = tuple[int, int, int]
GIT_LIST = ("ls-files", "-z", "--cached", "--others", "--exclude-standard")


@dataclass(frozen=True)
class Pattern:
    """One gitignore-style pattern, compiled."""

    text: str
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


def _class_end(glob: str, start: int) -> int:
    """Where the bracket expression opened at `start` closes (-1: it does not, and the
    '[' is literal). A ']' first in it (after an optional '!') is a member."""
    j = start + 1
    if glob[j : j + 1] == "!":
        j += 1
    if glob[j : j + 1] == "]":
        j += 1
    return glob.find("]", j)


def _translate(glob: str) -> str:
    """A gitignore glob as a regular expression over a '/'-separated relative path."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and _class_end(glob, i) > 0:
            end = _class_end(glob, i)
            body = glob[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end
        elif c == "\\" and i + 1 < len(glob):
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def compile_pattern(text: str) -> Pattern | None:
    """A pattern line as git reads it; None for a blank line or a comment."""
    line = text.strip()
    if not line or line.startswith("#"):
        return None
    negate = line.startswith("!")
    line = line[1:] if negate else line
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    if not line:
        return None
    # A slash at the start or in the middle anchors the pattern at the code dir;
    # without one it matches a name at any depth.
    anchored = "/" in line
    glob = line.lstrip("/") if anchored else "**/" + line
    return Pattern(text, re.compile(_translate(glob) + r"\Z"), negate, dir_only)


class Excludes:
    """Gitignore semantics over relative paths: the last matching pattern decides, and
    nothing under an excluded directory can be brought back."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = [p for p in map(compile_pattern, patterns) if p is not None]
        self._dirs: dict[str, bool] = {"": False}

    def _decide(self, path: str, is_dir: bool) -> bool:
        excluded = False
        for p in self.patterns:
            if (is_dir or not p.dir_only) and p.regex.match(path):
                excluded = not p.negate
        return excluded

    def dir_excluded(self, path: str) -> bool:
        """True when the directory `path` or one above it is excluded."""
        if path not in self._dirs:
            parent = path.rpartition("/")[0]
            self._dirs[path] = self.dir_excluded(parent) or self._decide(path, True)
        return self._dirs[path]

    def excluded(self, path: str) -> bool:
        """True when the file (or link) `path` is excluded."""
        if not self.patterns:
            return False
        return self.dir_excluded(path.rpartition("/")[0]) or self._decide(path, False)


def git_files(code_dir: Path) -> list[str] | None:
    """The paths git shows under `code_dir` (relative to it); None when it is not in a
    git work tree or git cannot say (not installed, or refuses the repository)."""
    try:
        r = subprocess.run(
            ["git", "-C", str(code_dir), *GIT_LIST],
            capture_output=True,
            check=False,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    names = r.stdout.decode("utf-8", "surrogateescape").split("\0")
    # A path in conflict is listed once per stage; a nested repository as "dir/".
    return sorted({n for n in names if n and not n.endswith("/")})


def walked_files(code_dir: Path, excludes: Excludes) -> list[str]:
    """Every file and link under `code_dir`, pruning excluded directories on the way."""
    found: list[str] = []
    for top, dirs, files in os.walk(code_dir):
        rel = os.path.relpath(top, code_dir)
        rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        dirs[:] = [d for d in dirs if not excludes.dir_excluded(rel + d)]
        found.extend(rel + f for f in files)
        # os.walk puts a link to a directory among the directories: it is a link here.
        found.extend(rel + d for d in dirs if os.path.islink(os.path.join(top, d)))
    return sorted(found)


def stat_entry(st: os.stat_result) -> Stat | None:
    """The manifest's record of a file, or None when it is not a file or a link."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return None
    return (st.st_size, st.st_mtime_ns, st.st_mode)


@dataclass(frozen=True)
class FileList:
    """The files to copy, with how each one stands now, and where the list came from."""

    files: dict[str, Stat]
    source: str  # "git" or "walk"


def list_files(
    code_dir: Path,
    exclude: Sequence[str] = (),
    *,
    git: Callable[[Path], list[str] | None] = git_files,
) -> FileList:
    """The files under `code_dir` that a sync copies (see the module docstring)."""
    code_dir = Path(code_dir)
    excludes = Excludes(exclude)
    names = git(code_dir)
    source = "git"
    if names is None:
        names, source = walked_files(code_dir, excludes), "walk"
    files: dict[str, Stat] = {}
    for name in names:
        if excludes.excluded(name):
            continue
        try:
            st = os.lstat(code_dir / name)
        except FileNotFoundError:
            continue  # deleted in the work tree, still in git's index
        entry = stat_entry(st)
        if entry is not None:
            files[name] = entry
    return FileList(files, source)


@dataclass(frozen=True)
class Changes:
    """What a sync must do to make the guest's copy match the host."""

    send: list[str]  # new or changed since the last sync
    remove: list[str]  # synced before, gone (or excluded) on the host now

    @property
    def empty(self) -> bool:
        return not self.send and not self.remove


def diff(previous: dict[str, Stat], current: dict[str, Stat]) -> Changes:
    """Compare the manifest of the last sync with the files as they stand now."""
    send = [p for p, s in current.items() if previous.get(p) != s]
    remove = [p for p in previous if p not in current]
    return Changes(sorted(send), sorted(remove))
