"""Whether a cloud-image profile can build without the network: its vendor image was
imported into the local template repository (image/templates/repository.py) under the
profile's template name, or an image of it is already built. Offline, anything else is
a download that cannot happen: a usage error before any test, not a failed build."""

from __future__ import annotations

import re
from pathlib import Path

from ..config.profiles import Profile
from ..host.layout import CacheLayout
from .templates.repository import TemplateRepo, default_repo_dir

IMPORT_HINT = "devbox image import FILE --distro {name}"


def built_images(cache_dir: Path, name: str) -> list[Path]:
    """The built images of the distro `name` in the cache, of any key."""
    images = CacheLayout(cache_dir).images
    pattern = re.compile(rf"^{re.escape(name)}-[0-9a-f]{{16}}\.qcow2$")
    try:
        return sorted(p for p in images.iterdir() if pattern.match(p.name))
    except OSError:
        return []


def cache_state(profile: Profile, cache_dir: Path) -> str:
    """ "built" (an image is there), "imported" (the template is), or "-" (neither)."""
    if built_images(cache_dir, profile.name):
        return "built"
    if profile.template in TemplateRepo(default_repo_dir(cache_dir)).entries():
        return "imported"
    return "-"


def offline_problem(profile: Profile, cache_dir: Path) -> str | None:
    """Why `profile` cannot be built offline from `cache_dir`, or None when it can (or
    needs no download: a virt-builder template, a file:// image)."""
    url = profile.cloud_image
    if url is None or url.startswith("file://"):
        return None
    if cache_state(profile, cache_dir) != "-":
        return None
    return (
        f"{profile.name} needs a download from {url}; run with network once, "
        f"or `{IMPORT_HINT.format(name=profile.name)}`"
    )
