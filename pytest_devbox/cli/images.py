"""`devbox image import FILE --distro NAME`: a local cloud image as a profile's template.

The way in without network (or for an image the vendor no longer serves): the file is
verified against the profile's ``checksum`` when it has one, imported into the local
template repository exactly as a download would be (image/cloud_import.py), and the
next `pytest --devbox=NAME` builds from it, offline too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config.profiles import Profile, select
from ..errors import ProfileError
from ..host.probes import resolve_accel
from .context import Context, log


def cmd_image_import(args: argparse.Namespace, ctx: Context) -> int:
    from ..image.cloud_import import CloudImporter

    (profile,) = select([args.distro], ctx.profiles)
    profile = _importable(profile)
    importer = CloudImporter(
        ctx.settings.cache_dir, tcg=resolve_accel(ctx.settings.accel) == "tcg", log=log
    )
    outcome = importer.import_file(profile, Path(args.file))
    print(
        f"{profile.name}: template {outcome.template!r} revision {outcome.revision} "
        f"({outcome.digest}) in {importer.repo.root}"
    )
    return 0


def _importable(profile: Profile) -> Profile:
    """A profile whose template a file may become: a cloud-image one."""
    if profile.cloud_image is None:
        raise ProfileError(
            f"profile {profile.name!r} has no cloud_image: its template {profile.template!r} "
            "comes from virt-builder, not from a file. Add cloud_image (and checksum) to the "
            "profile in devbox.toml, or import for a cloud-image distro"
        )
    return profile
