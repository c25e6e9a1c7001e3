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
from urllib.parse import urljoin

from ..config import catalogue
from ..config.profiles import Profile
from ..errors import ImageBuildError
from ..image import recipe
from ..image.availability import cache_state
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
        lines.append(
            "# template revision: made by the import, on the first run"
            if profile.cloud_image is not None
            else "# template revision: unknown"
        )
    return lines


def checksum_source(profile: Profile) -> str:
    """Where the image's digest comes from: the pinned digest, else the checksum file's
    URL (a bare name is beside the image), with its format when the catalogue knows it."""
    if profile.checksum is not None:
        return f"pinned {profile.checksum}"
    if profile.checksum_url is None or profile.cloud_image is None:
        return "none: the download is not verified"
    url = profile.checksum_url
    if "://" not in url:
        url = urljoin(profile.cloud_image, url)
    entry = catalogue.BY_NAME.get(profile.name)
    if entry is None or entry.checksum_file != profile.checksum_url:
        return url
    return f"{url} ({entry.checksum_format}, {entry.signed})"


def _cloud_lines(cache: ImageCache, profile: Profile) -> list[str]:
    """What a cloud-image profile downloads and how it is checked, before the build."""
    if profile.cloud_image is None:
        return []
    lines = [
        f"# cloud image {profile.cloud_image}",
        f"# latest      {profile.cloud_image_latest or '(none: the dated URL only)'}",
        f"# checksum    {checksum_source(profile)}",
    ]
    entry = catalogue.BY_NAME.get(profile.name)
    if entry is not None and entry.digest is not None and profile.cloud_image == entry.image:
        lines.append(f"# digest      {entry.digest} (the dated image's, per {entry.source})")
    state = cache_state(profile, cache.root)
    lines.append(
        f"# imported as template {profile.template} of the local repository; in the cache: "
        + {"-": "not yet (a download)", "imported": "imported", "built": "built"}[state]
    )
    return lines


def _facts_line(profile: Profile) -> str:
    eol = f", end of life {profile.eol}" if profile.eol else ""
    return f"# firmware {profile.firmware}, cpu {profile.cpu_level or 'any x86-64'}{eol}"


def plan(cache: ImageCache, profile: Profile) -> str:
    """What building ``profile`` into ``cache`` would run, as reviewable text."""
    lines = [
        f"# {profile.name}: template {profile.template}",
        *_cloud_lines(cache, profile),
        _facts_line(profile),
        *_revision_lines(cache, profile),
    ]
    try:
        key = cache.key_for(profile)
        lines.append(f"# cache key {key}")
    except ImageBuildError as e:
        key = UNKNOWN_KEY
        lines.append(
            "# cache key known after the import (it pins the imported revision)"
            if profile.cloud_image is not None and cache_state(profile, cache.root) == "-"
            else f"# cache key unknown: {str(e).splitlines()[0]}"
        )
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
