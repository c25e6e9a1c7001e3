"""Downloading a vendor's cloud image: progress, resume, digest, the "latest" fallback.

A download goes to ``<cache>/downloads/NAME.part`` and is renamed to ``NAME`` only once
its digest is the published one; a mismatch removes the partial file, so nothing
unverified is ever kept. An interrupted download resumes from the ``.part`` with an
HTTP Range request (a server that ignores Range sends the whole file: it starts over).
One FileLock per file name: concurrent sessions download it once. Plain urllib, no
dependency. ``file://`` images are verified where they are, never copied.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import filelock

from ..config.profiles import Profile
from ..errors import ImageBuildError
from ..log import Log
from .checksums import ChecksumMismatch, digest_for, file_digest

TIMEOUT = 60.0
RETRIES = 2  # resumed attempts after a dropped connection, within one call
PROGRESS_EVERY = 5.0  # seconds between progress lines
_GONE = (404, 410)  # vendors prune dated images: try the "latest" URL


class DownloadError(ImageBuildError):
    """A cloud image or its checksum file could not be fetched."""


class Gone(DownloadError):
    """The server says the file is not there (404/410)."""


@dataclass(frozen=True)
class Downloaded:
    """A verified image: where it is, the URL it came from, its digest, whether fetched now."""

    path: Path
    url: str
    digest: str
    fetched: bool


def file_name(url: str) -> str:
    """The last path component of ``url``, unquoted (the name checksum files list)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])


def local_path(url: str) -> Path | None:
    """The path of a ``file://`` URL, else None."""
    if not url.startswith("file://"):
        return None
    return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))


def read_text(url: str, timeout: float = TIMEOUT) -> str:
    """A small file (a checksum file) by URL; Gone or DownloadError saying which."""
    path = local_path(url)
    try:
        if path is not None:
            return path.read_text(encoding="utf-8", errors="replace")
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data: bytes = resp.read(16 << 20)
            return data.decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        if e.code in _GONE:
            raise Gone(f"{url}: HTTP {e.code}") from None
        raise DownloadError(f"cannot fetch {url}: HTTP {e.code} {e.reason}") from None
    except (OSError, HTTPException, ValueError) as e:
        raise DownloadError(f"cannot fetch {url}: {e}; check the URL and the network") from None


def checksum_source(profile: Profile, image_url: str) -> str | None:
    """The checksum file's URL for ``image_url``: absolute, or relative to its directory."""
    if not profile.checksum_url:
        return None
    return urllib.parse.urljoin(image_url, profile.checksum_url)


def expected_digest(profile: Profile, image_url: str) -> str:
    """The digest ``image_url`` must have: the profile's ``checksum``, or its checksum file's."""
    if profile.checksum:
        return profile.checksum
    source = checksum_source(profile, image_url)
    if source is None:
        raise DownloadError(
            f"profile {profile.name!r} has cloud_image but neither checksum nor checksum_url: "
            'an image is never used unverified; add checksum = "sha256:HEX" or checksum_url'
        )
    return digest_for(read_text(source), file_name(image_url), source)


def _progress(
    log: Log, label: str, url: str, done: int, total: int | None, fresh: int, t0: float
) -> None:
    # The rate counts only this transfer's bytes (``fresh``), not those resumed from disk.
    rate = fresh / max(time.monotonic() - t0, 1e-6) / 1e6
    mb = done / 1e6
    if total:
        log(
            f"[{label}] {file_name(url)}: {mb:.1f} of {total / 1e6:.1f} MB "
            f"({100 * done / total:.0f}%), {rate:.1f} MB/s"
        )
    else:
        log(f"[{label}] {file_name(url)}: {mb:.1f} MB, {rate:.1f} MB/s")


def _open(url: str, start: int, timeout: float) -> tuple[object, int, int | None]:
    """The response for ``url`` from byte ``start``: (response, offset it starts at, total)."""
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:
            # The partial file is as long as the image or longer: not ours to trust.
            return _open(url, 0, timeout)
        if e.code in _GONE:
            raise Gone(f"{url}: HTTP {e.code}") from None
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    length = resp.headers.get("Content-Length")
    if resp.status == 206:
        crange = resp.headers.get("Content-Range", "")
        offset = int(crange.split()[1].split("-")[0]) if crange.startswith("bytes ") else 0
        total = crange.rsplit("/", 1)[-1]
        return resp, offset, int(total) if total.isdigit() else None
    return resp, 0, int(length) if length and length.isdigit() else None


def _transfer(url: str, part: Path, log: Log, label: str, timeout: float) -> None:
    """Append ``url``'s remaining bytes to ``part`` (resuming); raises on a dropped link."""
    start = part.stat().st_size if part.exists() else 0
    resp, offset, total = _open(url, start, timeout)
    with resp:  # type: ignore[attr-defined]
        if start and offset != start:
            log(f"[{label}] the server ignored the resume request: downloading {url} again")
        elif start:
            log(f"[{label}] resuming {file_name(url)} at {start / 1e6:.1f} MB")
        mode = "ab" if start and offset == start else "wb"
        done = offset if mode == "ab" else 0
        t0, last, first = time.monotonic(), 0.0, done
        with open(part, mode) as f:
            while True:
                block = resp.read(1 << 20)  # type: ignore[attr-defined]
                if not block:
                    break
                f.write(block)
                done += len(block)
                now = time.monotonic()
                if now - last >= PROGRESS_EVERY:
                    last = now
                    _progress(log, label, url, done, total, done - first, t0)
        if total is not None and done < total:
            raise HTTPException(f"connection closed at {done} of {total} bytes")
        _progress(log, label, url, done, total, done - first, t0)


def download(
    url: str,
    dest: Path,
    digest: str,
    log: Log,
    *,
    label: str,
    retries: int = RETRIES,
    timeout: float = TIMEOUT,
) -> Path:
    """``url`` verified against ``digest`` at ``dest`` (the caller holds its lock).

    Resumes from ``dest.part`` when an earlier attempt left one. A mismatch removes the
    partial file and raises ChecksumMismatch; a dropped connection is retried
    ``retries`` times, then DownloadError (the partial file stays, for the next try).
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"[{label}] downloading {url}")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, log, label, timeout)
            break
        except (OSError, HTTPException) as e:
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise DownloadError(
                    f"downloading {url} failed after {have / 1e6:.1f} MB: {e}. Run again: "
                    f"it resumes from {part}"
                ) from None
            log(f"[{label}] the download stopped ({e}); resuming")
    actual = file_digest(part, digest.split(":", 1)[0])
    if actual != digest:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"{url} does not have the published digest: expected {digest}, got {actual}. "
            "Nothing was kept; if the vendor replaced the image, update the profile's checksum "
            "(or its checksum_url), else retry: the file may have been damaged in transit"
        )
    os.replace(part, dest)
    return dest


def _verified_in_place(path: Path, url: str, digest: str) -> Downloaded:
    if not path.is_file():
        raise DownloadError(f"{url}: no such file")
    actual = file_digest(path, digest.split(":", 1)[0])
    if actual != digest:
        raise ChecksumMismatch(
            f"{path} does not have the expected digest: expected {digest}, got {actual}; "
            "nothing was imported"
        )
    return Downloaded(path, url, digest, False)


def fetch(
    profile: Profile,
    downloads: Path,
    log: Log,
    *,
    offline: bool = False,
    recorded: tuple[str, str] | None = None,
    lock_timeout: float = 3 * 3600.0,
) -> Downloaded:
    """The profile's cloud image, downloaded (once) and verified.

    Tries ``cloud_image``, then ``cloud_image_latest`` when the first is gone (404/410).
    ``recorded`` is the (url, digest) of the last import: offline, a file already in
    ``downloads`` under that digest is used without asking the network.
    """
    assert profile.cloud_image is not None
    urls = [profile.cloud_image]
    if profile.cloud_image_latest and profile.cloud_image_latest != profile.cloud_image:
        urls.append(profile.cloud_image_latest)
    gone: list[str] = []
    for url in urls:
        path = local_path(url)
        if path is not None:
            return _verified_in_place(path, url, expected_digest(profile, url))
        dest = downloads / file_name(url)
        if offline:
            digest = profile.checksum or (recorded[1] if recorded and recorded[0] == url else None)
            if digest and dest.is_file():
                return Downloaded(dest, url, digest, False)
            continue
        try:
            digest = expected_digest(profile, url)
            return _fetch_locked(url, dest, digest, log, profile.name, lock_timeout)
        except Gone as e:
            gone.append(str(e))
            if url != urls[-1]:
                log(f"[{profile.name}] {e}: the vendor removed it; trying {urls[-1]}")
    if offline:
        raise DownloadError(
            f"{profile.name} needs a download from {profile.cloud_image}, and the run is "
            f"offline; run with network once, or `devbox image import FILE --distro {profile.name}`"
        )
    raise DownloadError(
        f"{profile.name}: the cloud image is gone ({'; '.join(gone)}); point cloud_image "
        "(or cloud_image_latest) at the vendor's current image"
    )


def _fetch_locked(
    url: str, dest: Path, digest: str, log: Log, label: str, lock_timeout: float
) -> Downloaded:
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(dest.with_name(dest.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log(f"[{label}] waiting for another process downloading {dest.name}")
        try:
            lock.acquire(timeout=lock_timeout)
        except filelock.Timeout:
            raise DownloadError(
                f"another process has held {lock.lock_file} for over {lock_timeout:g} s; "
                "stop it, or remove that lock if it is gone"
            ) from None
    try:
        if dest.is_file():
            if file_digest(dest, digest.split(":", 1)[0]) == digest:
                return Downloaded(dest, url, digest, False)
            log(f"[{label}] {dest.name} in the cache is not the published image: downloading it")
            dest.unlink()
        return Downloaded(download(url, dest, digest, log, label=label), url, digest, True)
    finally:
        lock.release()
