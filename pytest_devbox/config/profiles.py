"""Distribution profiles: which template to build from, how to customise it, how to share /code.

Built-in profiles cover the distributions devbox has always supported; a project adds
or adjusts profiles in ``pyproject.toml`` (``[tool.pytest-devbox.distros.NAME]``) or in
a ``devbox.toml`` beside it (``[distros.NAME]``).
"""

from __future__ import annotations

import datetime
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import ProfileError, UnknownDistro
from . import catalogue
from .settings import SHARE_CHOICES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]

# virt-builder operations that reach a package repository.
_PACKAGE_OPS = frozenset({"install", "update", "uninstall", "firstboot-install"})
_PACKAGE_TOOLS = frozenset({"yum", "dnf", "apt-get", "apt"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SIZE_RE = re.compile(r"^[0-9]+(\.[0-9]+)?[KMGTPE]?$")
_URL_RE = re.compile(r"^(https?|file)://\S+$")
_DIGEST_RE = re.compile(r"^(sha256:[0-9A-Fa-f]{64}|sha512:[0-9A-Fa-f]{128})$")
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_FIRMWARES = ("bios", "uefi")
_CPU_LEVELS = ("x86-64-v2", "x86-64-v3")
_SELINUX_TEMPLATES = re.compile(r"^(centos|centosstream|fedora|rhel|alma|rocky|scientificlinux)-")


@dataclass(frozen=True)
class Profile:
    """How to build and boot one distribution.

    ``customize`` holds virt-builder commands-file lines, applied in order before the
    lines pytest-devbox adds itself (``/code`` mount point, guest user).
    """

    name: str
    template: str
    share: str = "virtiofs"
    customize: tuple[str, ...] = ()
    repos: tuple[str, ...] = ()
    memory_mib: int = 1024
    vcpus: int = 2
    disk_size: str | None = None
    extends: str | None = None
    selinux: bool | None = None
    # A vendor's cloud image instead of a virt-builder template (image/cloud_*.py):
    # imported once into the local template repository, then built like any template.
    cloud_image: str | None = None
    # Where the image is when the dated ``cloud_image`` is gone (vendors prune them).
    cloud_image_latest: str | None = None
    # "sha256:HEX" / "sha512:HEX", or a vendor checksum file (relative to the image URL).
    checksum: str | None = None
    checksum_url: str | None = None
    firmware: str = "bios"
    # The x86-64 micro-architecture level the distro's userland needs (RHEL 9: v2).
    cpu_level: str | None = None
    # End of life (YYYY-MM-DD): selecting it later warns.
    eol: str | None = None

    @property
    def relabels(self) -> bool:
        """True when the build must label what it wrote: the template has SELinux.

        ``selinux`` says so; unset, the template's family decides (the public index's
        centos, centosstream, fedora and other Red Hat family templates are enforcing).
        """
        if self.selinux is not None:
            return self.selinux
        return bool(_SELINUX_TEMPLATES.match(self.template))

    @property
    def needs_network(self) -> bool:
        """True when a customize line installs, updates or removes packages.

        Those lines fetch from the distribution's mirrors, so virt-builder must run
        without ``--no-network``.
        """
        for line in self.customize:
            words = line.split()
            if not words:
                continue
            if words[0] in _PACKAGE_OPS:
                return True
            if words[0] == "run-command" and any(
                re.sub(r"^.*/", "", w) in _PACKAGE_TOOLS for w in words[1:]
            ):
                return True
        return False


# --- built-in profiles ------------------------------------------------------------------

# CentOS 7 and 8 are end-of-life: mirror.centos.org is gone, so yum must use the vault
# before anything is installed. $releasever ("7", "8") has no directory in the vault, so
# a release is written out: each template's OWN release, 7.8.2003 for centos-7.8 and
# 8.2.2004 for centos-8.2 (their kickstarts installed from the then-current 7.8 and 8.2
# trees: guestfs-tools builder/templates/centos-7.8.virt-install-cmd, centos-8.2.ks).
# The final trees (7.9.2009, 8.5.2111) would make every `install` a partial upgrade:
# only what a package drags in (glibc, openssl, dracut, linux-firmware for kernel-plus)
# moves to the newer release, an untested mix. The price: fewer fixes than the final
# trees. Disabled repos whose baseurl the sed does not match are left with neither.
_CENTOS7_VAULT = (
    "run-command sed -i -e 's/^mirrorlist=/#mirrorlist=/'"
    " -e 's|^#\\?baseurl=http://mirror.centos.org/centos/\\$releasever/"
    "|baseurl=http://vault.centos.org/7.8.2003/|' /etc/yum.repos.d/CentOS-*.repo"
)
_CENTOS8_VAULT = (
    "run-command sed -i -e 's/^mirrorlist=/#mirrorlist=/'"
    " -e 's|^#\\?baseurl=http://mirror.centos.org/\\$contentdir/\\$releasever/"
    "|baseurl=http://vault.centos.org/8.2.2004/|' /etc/yum.repos.d/CentOS-*.repo"
)
_CENTOSSTREAM8_VAULT = (
    "run-command sed -i -e 's/^mirrorlist=/#mirrorlist=/'"
    " -e 's|^#\\?baseurl=http://mirror.centos.org/\\$contentdir/\\$stream/"
    "|baseurl=http://vault.centos.org/centos/8-stream/|' /etc/yum.repos.d/CentOS-Stream-*.repo"
)

# The CentOS 7 kernel (3.10) has no usable 9p transport; CentOS Plus kernel-plus does.
# The six lines of the design's recipe (DESIGN.md), in their order, each still there;
# the deviations, found on paper against their sources (issue 9):
# - `install yum-utils` first: yum-config-manager is in yum-utils, and the centos-7.8
#   template is `%packages @core` only (centos-7.8.ks; index notes "only unmodified @Core").
# - sed `-i -e`, not `-ie`: GNU sed reads `-ie` as -i with backup suffix "e" and leaves
#   /etc/sysconfig/kernele behind. Anchored, so a second run cannot make kernel-plus-plus.
# - add_drivers with spaces inside the quotes, as dracut.conf(5) writes it (`+=` is shell
#   concatenation and would glue onto another file's list), and with virtio_blk: dracut
#   is host-only on CentOS 7 (01-dist.conf hostonly="yes") and runs in the build
#   appliance, whose disks are virtio-scsi, so our virtio-blk disk's driver is left out
#   unless named (dracut-functions.sh module_is_host_only). Still before the install.
# - the fstab line with version=9p2000.L (3.10's default is 9p2000.u: net/9p/client.c),
#   msize=262144 (the default 8 KiB is slow) and nofail (without it a failed mount is
#   required by local-fs.target: emergency mode, no sshd, a boot timeout instead of
#   "/code is not mounted"). It is recipe.FSTAB_LINES["9p"], kept here to keep the six.
_CENTOS7_9P = (
    "install yum-utils",
    "run-command yum-config-manager --enable centosplus",
    "run-command sed -i -e 's/^DEFAULTKERNEL=kernel$/DEFAULTKERNEL=kernel-plus/'"
    " /etc/sysconfig/kernel",
    "append-line /etc/dracut.conf.d/virtio.conf:"
    'add_drivers+=" virtio_blk virtio_scsi virtio_pci virtio_console "',
    "append-line /etc/modules-load.d/9pnet_virtio.conf:9pnet_virtio",
    "install kernel-plus",
    "append-line /etc/fstab:/code /code 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0",
)
# Every built-in whose template has SELinux (centos, centosstream, fedora: enforcing
# from their kickstarts, `selinux --enforcing`) also gets the relabel step as the last
# line of its commands file (image/recipe.py, image/selinux.py): Profile.relabels.


def _builtin(
    name: str,
    share: str,
    customize: tuple[str, ...] = (),
    template: str = "",
    selinux: bool | None = None,
) -> Profile:
    return Profile(
        name=name,
        template=template or name,
        share=share,
        customize=customize,
        selinux=selinux,
        eol=catalogue.OTHER_EOL.get(name),
    )


def _from_catalogue(entry: catalogue.Entry, today: datetime.date | None = None) -> Profile:
    """The profile of a vendor cloud image: imported under its own name as a template
    of the local repository (image/cloud_*.py), then built like any template."""
    return Profile(
        name=entry.name,
        template=entry.name,
        share=entry.share,
        customize=catalogue.customize_lines(entry, today),
        selinux=entry.selinux,
        memory_mib=entry.memory_mib,
        cloud_image=entry.image,
        cloud_image_latest=entry.latest,
        checksum_url=entry.checksum_file,
        firmware=entry.firmware,
        cpu_level=entry.cpu_level,
        eol=entry.eol,
    )


# Fedora 40-42 are past EOL: their repositories are in the archive now.
_FEDORA_EOL = (catalogue.FEDORA_ARCHIVE,)


def builtin_profiles(today: datetime.date | None = None) -> dict[str, Profile]:
    """Every built-in by name; `today` decides which EOL rewrites apply."""
    old = (
        _builtin("centos-7", "9p", (_CENTOS7_VAULT, *_CENTOS7_9P), template="centos-7.8"),
        # No fstab line of its own: image/recipe.py mounts /code the way the share says, so
        # a profile extending centos-8 with another share mounts that one.
        _builtin("centos-8", "virtiofs", (_CENTOS8_VAULT,), template="centos-8.2"),
        _builtin("centosstream-8", "virtiofs", (_CENTOSSTREAM8_VAULT,)),
        _builtin("debian-10", "9p"),
        _builtin("debian-11", "virtiofs"),
        _builtin("debian-12", "virtiofs"),
        # An enforcing Debian (image/templates/recipes.py): proves the relabel step here,
        # where no RHEL-family template can be downloaded.
        _builtin("debian-12-selinux", "virtiofs", selinux=True),
        _builtin("debian-13", "virtiofs"),
        _builtin("fedora-40", "virtiofs", _FEDORA_EOL),
        # 9p is broken in Linux 6.9-6.11, Fedora 41's (Lima fedora-41.yaml; fixed by
        # torvalds/linux be2ca38): virtiofs.
        _builtin("fedora-41", "virtiofs", _FEDORA_EOL),
        _builtin("fedora-42", "virtiofs", _FEDORA_EOL),
        _builtin("ubuntu-18.04", "9p"),
        _builtin("ubuntu-20.04", "virtiofs"),
    )
    # centosstream-9 is an alias of the catalogue's centos-stream-9 now (ALIASES): the
    # 2022 virt-builder build it used to name is superseded by CentOS's own image.
    cloud = tuple(_from_catalogue(e, today) for e in catalogue.ENTRIES)
    return {p.name: p for p in sorted((*old, *cloud), key=lambda p: p.name)}


# The share follows the guest kernel: virtiofs from Linux 5.4 (RHEL 8's 4.18 has it
# backported), 9p before.
BUILTIN_PROFILES: Mapping[str, Profile] = MappingProxyType(builtin_profiles())


# --- user profiles ------------------------------------------------------------------------

_FIELD_TYPES: dict[str, str] = {
    "template": "a string (a virt-builder os-version)",
    "share": "one of " + ", ".join(repr(k) for k in SHARE_CHOICES),
    "customize": "a list of strings (virt-builder commands-file lines)",
    "repos": "a list of strings (virt-builder repository URIs)",
    "memory_mib": "a positive integer",
    "vcpus": "a positive integer",
    "disk_size": 'a size such as "8G" or "10240M"',
    "extends": "the name of another profile",
    "selinux": "true or false (the template has SELinux: label the files the build writes)",
    "cloud_image": "an http://, https:// or file:// URL of a qcow2 or raw cloud image",
    "cloud_image_latest": "an http://, https:// or file:// URL of a qcow2 or raw cloud image",
    "checksum": 'a digest such as "sha256:HEX" or "sha512:HEX"',
    "checksum_url": "a checksum file (SHA256SUMS, CHECKSUM): its URL, or its name beside the image",
    "firmware": 'one of "bios", "uefi"',
    "cpu_level": 'one of "x86-64-v2", "x86-64-v3"',
    "eol": 'a date such as "2026-12-31"',
}
assert set(_FIELD_TYPES) == {f.name for f in fields(Profile)} - {"name"}


def _check_field(where: str, key: str, value: Any) -> Any:
    """Return ``value`` converted for Profile, or raise ProfileError saying what is allowed."""

    def bad() -> ProfileError:
        return ProfileError(f"{where}: field {key!r} must be {_FIELD_TYPES[key]}, got {value!r}")

    if key in ("template", "extends"):
        if not isinstance(value, str) or not value:
            raise bad()
        return value
    if key == "share":
        if value not in SHARE_CHOICES:
            raise bad()
        return value
    if key in ("customize", "repos"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad()
        return tuple(value)
    if key in ("memory_mib", "vcpus"):
        # bool is an int in Python; `vcpus = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad()
        return value
    if key == "selinux":
        if not isinstance(value, bool):
            raise bad()
        return value
    if key == "disk_size":
        if not isinstance(value, str) or not _SIZE_RE.match(value):
            raise bad()
        return value
    if key in ("cloud_image", "cloud_image_latest"):
        if not isinstance(value, str) or not _URL_RE.match(value):
            raise bad()
        return value
    if key == "checksum":
        if not isinstance(value, str) or not _DIGEST_RE.match(value):
            raise bad()
        return value.lower()
    if key == "checksum_url":
        if not isinstance(value, str) or not value.strip():
            raise bad()
        return value
    if key == "firmware":
        if value not in _FIRMWARES:
            raise bad()
        return value
    if key == "cpu_level":
        if value not in _CPU_LEVELS:
            raise bad()
        return value
    if key == "eol":
        if not isinstance(value, str) or not _DATE_RE.match(value):
            raise bad()
        return value
    raise AssertionError(key)  # pragma: no cover


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from e
    return data


def _raw_user_profiles(project_dir: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Profile tables from pyproject.toml and devbox.toml: name -> (file, table)."""
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    sources = (
        (project_dir / "pyproject.toml", ("tool", "pytest-devbox", "distros")),
        (project_dir / "devbox.toml", ("distros",)),
    )
    for path, table_path in sources:
        if not path.is_file():
            continue
        table: Any = _read_toml(path)
        for part in table_path:
            table = table.get(part, {}) if isinstance(table, dict) else {}
        if not isinstance(table, dict):
            raise ProfileError(f"{path}: [{'.'.join(table_path)}] must be a table of profiles")
        for name, body in table.items():
            where = f"{path}: profile {name!r}"
            if not isinstance(body, dict):
                raise ProfileError(f"{where} must be a table, e.g. [{'.'.join(table_path)}.{name}]")
            if not _NAME_RE.match(name):
                raise ProfileError(
                    f"{where}: a profile name uses letters, digits, '.', '_' and '-' only"
                )
            if name in found:
                raise ProfileError(f"{where} is also defined in {found[name][0]}; keep one of them")
            found[name] = (path, body)
    return found


def load_profiles(project_dir: Path | None) -> dict[str, Profile]:
    """Return the built-in profiles plus the project's own, by name.

    A user profile may ``extends`` another (built-in or user; chains allowed) and
    override any field. A user profile named like a built-in without ``extends``
    starts from that built-in. Any mistake raises ProfileError naming the file, the
    profile and the field.
    """
    profiles: dict[str, Profile] = dict(BUILTIN_PROFILES)
    if project_dir is None:
        return profiles
    raw = _raw_user_profiles(project_dir)
    resolved: dict[str, Profile] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> Profile:
        if name in resolved:
            return resolved[name]
        path, body = raw[name]
        where = f"{path}: profile {name!r}"
        values: dict[str, Any] = {}
        for key, value in body.items():
            if key not in _FIELD_TYPES:
                raise ProfileError(
                    f"{where}: unknown field {key!r}; allowed fields: "
                    + ", ".join(sorted(_FIELD_TYPES))
                )
            values[key] = _check_field(where, key, value)
        parent_name = values.get("extends")
        if parent_name is not None and parent_name not in raw:
            parent_name = canonical(parent_name, BUILTIN_PROFILES)
        base: Profile | None = None
        if parent_name is not None:
            if parent_name in chain or (parent_name == name and name not in BUILTIN_PROFILES):
                cycle = " -> ".join((*chain, name, parent_name))
                raise ProfileError(f"{where}: field 'extends' makes a cycle: {cycle}")
            if parent_name in raw and parent_name != name:
                base = resolve(parent_name, (*chain, name))
            elif parent_name in BUILTIN_PROFILES:
                base = BUILTIN_PROFILES[parent_name]
            else:
                known = sorted(set(BUILTIN_PROFILES) | set(raw))
                raise ProfileError(
                    f"{where}: field 'extends' names an unknown profile {parent_name!r}; "
                    "known profiles: " + ", ".join(known)
                )
        elif canonical(name, BUILTIN_PROFILES) in BUILTIN_PROFILES:
            # Named like a built-in (or an alias of one): starts from it.
            base = BUILTIN_PROFILES[canonical(name, BUILTIN_PROFILES)]
        if base is None:
            if "template" not in values and "cloud_image" not in values:
                raise ProfileError(
                    f"{where}: field 'template' is required for a new profile "
                    "(a virt-builder os-version such as 'debian-12'), or set 'cloud_image' "
                    "or 'extends'"
                )
            # A cloud image becomes a template of the local repository named like the
            # profile (image/cloud_import.py), unless the profile names it itself.
            values.setdefault("template", name)
            profile = Profile(name=name, **values)
        else:
            profile = replace(base, name=name, **values)
        resolved[name] = profile
        return profile

    for name in raw:
        profiles[name] = resolve(name, ())
    return profiles


def effective_share(profile: Profile, override: str = "") -> str:
    """How /code reaches guests of `profile`: `override` (--devbox-share) when set, else
    the profile's own share. The image is the profile's either way: an image made for a
    shared file system runs as a sync guest unchanged (its fstab's /code line has
    nofail, and without the device that mount just fails at boot)."""
    return override or profile.share


def canonical(name: str, profiles: Mapping[str, Profile]) -> str:
    """`name` as `profiles` know it: itself when a profile has that name (a project's
    own profile beats an alias), else the profile an alias such as `alma-9` stands
    for, else unchanged (an unknown name stays unknown for the caller's message)."""
    if name in profiles:
        return name
    target = catalogue.ALIASES.get(name)
    return target if target is not None and target in profiles else name


def eol_warning(profile: Profile, today: datetime.date | None = None) -> str | None:
    """The warning line for a distro past its end of life, or None."""
    if not catalogue.past_eol(profile.eol, today):
        return None
    return (
        f"warning: {profile.name} reached its end of life on {profile.eol}: "
        "its vendor no longer fixes it"
    )


def select(names: Iterable[str], profiles: Mapping[str, Profile]) -> list[Profile]:
    """Return the profiles for ``names`` in the order given, without duplicates.

    ``"all"`` stands for every profile; an alias (``alma-9``) its canonical profile.
    An unknown name raises UnknownDistro listing the known ones.
    """
    chosen: dict[str, Profile] = {}
    for raw_name in names:
        name = raw_name.strip()
        if not name:
            continue
        if name == "all":
            for p in profiles.values():
                chosen.setdefault(p.name, p)
            continue
        name = canonical(name, profiles)
        if name not in profiles:
            raise UnknownDistro(
                f"unknown distro {name!r}; known distros: {', '.join(sorted(profiles))} "
                "(or define it under [tool.pytest-devbox.distros] in pyproject.toml)"
            )
        chosen.setdefault(name, profiles[name])
    return list(chosen.values())


def load_hosts(project_dir: Path | None) -> tuple[tuple[str, str], ...]:
    """`[tool.pytest-devbox.hosts]` of pyproject.toml: which libvirt URI runs a distro
    ("*": every distro not named), as sorted pairs; () without one (Settings.uri_for)."""
    path = project_dir / "pyproject.toml" if project_dir is not None else None
    if path is None or not path.is_file():
        return ()
    table = _read_toml(path).get("tool", {}).get("pytest-devbox", {}).get("hosts", {})
    where = f"{path}: [tool.pytest-devbox.hosts]"
    if not isinstance(table, dict):
        raise ProfileError(f"{where} must be a table of distro = URI")
    for distro, uri in table.items():
        if not isinstance(uri, str) or "://" not in uri:
            raise ProfileError(
                f'{where} {distro!r} = {uri!r} is not a libvirt URI ("qemu+ssh://USER@HOST/system")'
            )
    return tuple(sorted(table.items()))
