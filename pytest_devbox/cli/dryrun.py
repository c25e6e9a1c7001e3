"""`devbox build --dry-run`: the exact virt-builder command and commands file a build
would run, shown without building and without the network, to review a recipe.

Only local (file://) indexes are read. Where the template revision cannot be known (an
index on the network, or a template no local index offers) it is marked unknown, and
so is the cache key that names the image and the commands file; the argv and the
commands file are otherwise exactly those of a real build.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable

from ..config.profiles import Profile
from ..errors import ImageBuildError
from ..image import recipe
from ..image.cache import ImageCache
from ..image.index import revisions

UNKNOWN_KEY = "?" * 16


def _revision_lines(cache: ImageCache, profile: Profile) -> list[str]:
    lines, known = [], False
    for read in cache.builder.indexes(profile):
        if read.sections is None:
            lines.append(f"# template revision unknown in {read.uri}: the index {read.problem}")
            continue
        for uri, arch, rev, _checksum in revisions(read.sections, profile.template, read.uri):
            lines.append(f"# template revision {rev} ({arch}) in {uri}")
            known = True
    if not known:
        lines.append("# template revision: unknown")
    return lines


def plan(cache: ImageCache, profile: Profile) -> str:
    """What building ``profile`` into ``cache`` would run, as reviewable text."""
    lines = [f"# {profile.name}: template {profile.template}", *_revision_lines(cache, profile)]
    try:
        key = cache.key_for(profile)
        lines.append(f"# cache key {key}")
    except ImageBuildError as e:
        key = UNKNOWN_KEY
        lines.append(f"# cache key unknown: {str(e).splitlines()[0]}")
    image = cache.layout.image(profile.name, key)
    commands = cache.layout.commands_file(profile.name, key)
    public_key = cache.public_key()
    # The build writes to <image>.partial and renames it (image/cache.py _build_locked).
    argv = cache.builder.argv(
        profile, image.with_name(image.name + ".partial"), commands, public_key
    )
    lines += [f"$ {shlex.join(argv)}", f"# commands file {commands}:"]
    lines += recipe.commands(profile, cache.guest_user, public_key)
    return "\n".join(lines) + "\n"


def print_plans(
    cache: ImageCache, profiles: Iterable[Profile], write: Callable[[str], object] = print
) -> int:
    """Print the plan of every profile; the exit status of `devbox build --dry-run`."""
    cache.builder.read_remote = False
    for i, profile in enumerate(profiles):
        write(("\n" if i else "") + plan(cache, profile).rstrip("\n"))
    return 0
