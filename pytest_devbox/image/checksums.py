"""Vendors' checksum files: find the digest published for one file name.

Two line layouts cover every vendor we know (samples in tests/data/checksums/):

- BSD, ``SHA256 (NAME) = HEX``: Rocky and CentOS Stream ``CHECKSUM`` (with ``# NAME: N
  bytes`` comment lines), Fedora's ``*-CHECKSUM`` (the same, PGP clearsigned);
- GNU coreutils, ``HEX  NAME`` or ``HEX *NAME`` (binary mode): Ubuntu ``SHA256SUMS``,
  Debian ``SHA512SUMS``, AlmaLinux ``CHECKSUM`` (Lima's hack/update-template-almalinux.sh
  reads its first field as the sha256).

A digest is returned as ``"sha256:HEX"`` or ``"sha512:HEX"``, the form a profile's
``checksum`` field takes. The signature of a clearsigned file is not checked (that needs
the vendor's key); the digest read from it still pins the image.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..errors import ImageBuildError

_BSD_RE = re.compile(r"^(SHA256|SHA512)\s*\((?P<name>.+)\)\s*=\s*(?P<hex>[0-9A-Fa-f]+)$")
_GNU_RE = re.compile(r"^(?P<hex>[0-9A-Fa-f]{64}|[0-9A-Fa-f]{128})\s[ *](?P<name>.+)$")
_LENGTHS = {64: "sha256", 128: "sha512"}


class ChecksumError(ImageBuildError):
    """A checksum file that cannot be read, or that does not list the image."""


class ChecksumMismatch(ImageBuildError):
    """A downloaded image whose digest is not the published one."""


def _unsigned(lines: list[str]) -> list[str]:
    """The signed text of a PGP clearsigned file (RFC 4880 section 7), else ``lines``."""
    if not lines or not lines[0].startswith("-----BEGIN PGP SIGNED MESSAGE"):
        return lines
    body = lines.index("") + 1 if "" in lines else 1
    end = next(
        (i for i, ln in enumerate(lines) if ln.startswith("-----BEGIN PGP SIGNATURE")), len(lines)
    )
    # Dash-escaping: a signed line starting with '-' is sent as "- -...".
    return [ln[2:] if ln.startswith("- ") else ln for ln in lines[body:end]]


def parse(text: str) -> dict[str, str]:
    """Every ``name -> "algo:hex"`` a checksum file lists (first entry wins).

    Blank and ``#`` lines are skipped; any other line in neither layout too (vendors
    add none, but a stray line must not hide the rest). An empty result means the text
    is not a checksum file at all.
    """
    found: dict[str, str] = {}
    for raw in _unsigned(text.splitlines()):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        bsd = _BSD_RE.match(line)
        if bsd:
            algo, hexd = bsd.group(1).lower(), bsd.group("hex").lower()
            if len(hexd) != {"sha256": 64, "sha512": 128}[algo]:
                continue
            found.setdefault(bsd.group("name"), f"{algo}:{hexd}")
            continue
        gnu = _GNU_RE.match(line)
        if gnu:
            hexd = gnu.group("hex").lower()
            found.setdefault(gnu.group("name").strip(), f"{_LENGTHS[len(hexd)]}:{hexd}")
    return found


def digest_for(text: str, name: str, source: str) -> str:
    """The digest ``source`` (a URL or path, for the message) publishes for ``name``."""
    entries = parse(text)
    if not entries:
        raise ChecksumError(
            f"{source} is not a checksum file in a known format (`SHA256 (NAME) = HEX` or "
            '`HEX  NAME`); check the profile\'s checksum_url, or give checksum = "sha256:HEX"'
        )
    try:
        return entries[name]
    except KeyError:
        listed = ", ".join(sorted(entries)[:6]) + (", ..." if len(entries) > 6 else "")
        raise ChecksumError(
            f"{source} lists no digest for {name!r} (it lists {listed}); the image URL and "
            "the checksum file do not match: fix cloud_image or checksum_url"
        ) from None


def file_digest(path: Path, algo: str) -> str:
    """``"algo:hex"`` of a file's content."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{algo}:{h.hexdigest()}"
