"""Downloading cloud images from a real HTTP server on 127.0.0.1 (tests/vendor_mirror.py):
progress, resume, digest refusal, the "latest" fallback, file:// and offline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from vendor_mirror import MirrorServer, publish, serve

from pytest_devbox.config.profiles import Profile
from pytest_devbox.image.checksums import ChecksumMismatch
from pytest_devbox.image.download import DownloadError, fetch

SIZE = 3 * 1024 * 1024 + 17


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[MirrorServer, dict[str, str]]]:
    image = tmp_path / "src" / "vendor-1.qcow2"
    image.parent.mkdir()
    image.write_bytes(os.urandom(SIZE))
    sums = publish(image, tmp_path / "www")
    with serve(tmp_path / "www") as server:
        yield server, sums


def profile(server: MirrorServer, **fields: str) -> Profile:
    values = {"cloud_image": server.url("vendor-1.qcow2"), "checksum_url": "SHA256SUMS", **fields}
    return Profile(name="vendor", template="vendor", **values)  # type: ignore[arg-type]


def test_a_download_logs_progress_and_lands_verified(
    mirror: tuple[MirrorServer, dict[str, str]], tmp_path: Path
) -> None:
    server, sums = mirror
    lines: list[str] = []
    got = fetch(profile(server), tmp_path / "dl", lines.append)
    assert got.fetched and got.digest == "sha256:" + sums["sha256"]
    assert got.path == tmp_path / "dl" / "vendor-1.qcow2" and got.path.stat().st_size == SIZE
    assert any("3.1 of 3.1 MB (100%)" in ln and "MB/s" in ln for ln in lines), lines
    assert not list((tmp_path / "dl").glob("*.part"))
    again = fetch(profile(server), tmp_path / "dl", lines.append)
    assert not again.fetched and server.gets["vendor-1.qcow2"] == 1


@pytest.mark.parametrize("checksum_url", ["SHA512SUMS", "CHECKSUM"])
def test_each_checksum_layout_beside_the_image_is_used(
    mirror: tuple[MirrorServer, dict[str, str]], tmp_path: Path, checksum_url: str
) -> None:
    server, sums = mirror
    got = fetch(profile(server, checksum_url=checksum_url), tmp_path / "dl", print)
    algo = "sha512" if checksum_url == "SHA512SUMS" else "sha256"
    assert got.digest == f"{algo}:{sums[algo]}"


def test_a_dropped_download_resumes_with_a_range_request(
    mirror: tuple[MirrorServer, dict[str, str]], tmp_path: Path
) -> None:
    server, _ = mirror
    server.faults.drop_after, server.faults.drops_left = 1_000_000, 1
    lines: list[str] = []
    from pytest_devbox.image import download as dl

    with pytest.raises(DownloadError, match="it resumes from"):
        dl.download(
            server.url("vendor-1.qcow2"),
            tmp_path / "dl" / "vendor-1.qcow2",
            "sha256:" + "0" * 64,
            lines.append,
            label="vendor",
            retries=0,
        )
    part = tmp_path / "dl" / "vendor-1.qcow2.part"
    assert part.stat().st_size == 1_000_000
    got = fetch(profile(server), tmp_path / "dl", lines.append)
    assert got.fetched and got.path.stat().st_size == SIZE
    assert server.ranges == ["bytes=1000000-"]
    assert server.sent["vendor-1.qcow2"] == SIZE  # every byte sent once
    assert any("resuming vendor-1.qcow2 at 1.0 MB" in ln for ln in lines)


def test_a_drop_within_one_call_is_resumed_at_once(
    mirror: tuple[MirrorServer, dict[str, str]], tmp_path: Path
) -> None:
    server, _ = mirror
    server.faults.drop_after, server.faults.drops_left = 500_000, 2
    got = fetch(profile(server), tmp_path / "dl", print)
    assert got.path.stat().st_size == SIZE and server.ranges == ["bytes=500000-", "bytes=1000000-"]


def test_a_server_ignoring_range_starts_over(
    mirror: tuple[MirrorServer, dict[str, str]], tmp_path: Path
) -> None:
    server, sums = mirror
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "vendor-1.qcow2.part").write_bytes(b"x" * 1000)
    server.faults.ignore_range = True
    lines: list[str] = []
    got = fetch(profile(server), tmp_path / "dl", lines.append)
    assert got.digest == "sha256:" + sums["sha256"]
    assert any("ignored the resume request" in ln for ln in lines)


def test_a_wrong_digest_is_refused_and_nothing_is_kept(
    mirror: tuple[MirrorServer, dict[str, str]], tmp_path: Path
) -> None:
    server, sums = mirror
    wrong = "sha256:" + "1" * 64
    with pytest.raises(ChecksumMismatch) as e:
        fetch(profile(server, checksum=wrong), tmp_path / "dl", print)
    msg = str(e.value)
    assert wrong in msg and sums["sha256"] in msg and server.url("vendor-1.qcow2") in msg
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["vendor-1.qcow2.lock"]


def test_a_gone_dated_image_falls_back_to_latest(
    mirror: tuple[MirrorServer, dict[str, str]], tmp_path: Path
) -> None:
    server, sums = mirror
    (server.directory / "latest.qcow2").hardlink_to(server.directory / "vendor-1.qcow2")
    (server.directory / "SHA256SUMS").write_text(
        f"{sums['sha256']} *vendor-1.qcow2\n{sums['sha256']} *latest.qcow2\n"
    )
    server.faults.status["vendor-1.qcow2"] = 410
    lines: list[str] = []
    got = fetch(
        profile(server, cloud_image_latest=server.url("latest.qcow2")),
        tmp_path / "dl",
        lines.append,
    )
    assert got.url == server.url("latest.qcow2") and got.path.name == "latest.qcow2"
    assert any("HTTP 410: the vendor removed it; trying" in ln for ln in lines)


def test_offline_never_asks_the_network(
    mirror: tuple[MirrorServer, dict[str, str]], tmp_path: Path
) -> None:
    server, sums = mirror
    with pytest.raises(DownloadError, match="devbox image import FILE --distro vendor"):
        fetch(profile(server), tmp_path / "dl", print, offline=True)
    assert server.gets == {}
    got = fetch(profile(server), tmp_path / "dl", print)
    recorded = (got.url, got.digest)
    again = fetch(profile(server), tmp_path / "dl", print, offline=True, recorded=recorded)
    assert again.path == got.path and not again.fetched
    assert server.gets == {"SHA256SUMS": 1, "vendor-1.qcow2": 1}
    del sums


def test_a_file_url_is_verified_in_place(
    mirror: tuple[MirrorServer, dict[str, str]], tmp_path: Path
) -> None:
    server, sums = mirror
    image = server.directory / "vendor-1.qcow2"
    p = Profile(name="v", template="v", cloud_image=image.as_uri(), checksum_url="SHA512SUMS")
    got = fetch(p, tmp_path / "dl", print, offline=True)
    assert got.path == image and got.digest == "sha512:" + sums["sha512"]
    assert not (tmp_path / "dl").exists()


def test_no_checksum_at_all_is_refused(tmp_path: Path) -> None:
    p = Profile(name="v", template="v", cloud_image="http://127.0.0.1:9/x.qcow2")
    with pytest.raises(DownloadError, match="neither checksum nor checksum_url"):
        fetch(p, tmp_path, print)
