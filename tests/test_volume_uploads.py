"""Uploads of one image from two client hosts to one remote pool (finding 11 of the
2026-12 review), on libvirt's test driver: its storage pool, volumes and their sizes are
real libvirt calls (in-process); it refuses the upload stream itself, which stands for a
failed upload here."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from pytest_devbox.errors import DomainError
from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import volumes

URI = "test:///default"


@pytest.fixture
def name() -> str:
    """The image's volume name, new in each test (the test driver's pool lives on while
    any of its objects does)."""
    return f"debian-12-{uuid.uuid4().hex[:8]}-20261201.qcow2"


@pytest.fixture
def pool() -> Iterator[libvirt.virStoragePool]:
    conn = dom.connect(URI)
    yield conn.storagePoolLookupByName("default-pool")
    conn.close()


def _source(tmp_path: Path, name: str, size: int) -> volumes.Upload:
    image = tmp_path / "debian-12-0123.qcow2"
    image.write_bytes(b"q" * size)
    return volumes.Upload(image, name, 64 << 20, tmp_path / "image.lock")


def _volume(pool: libvirt.virStoragePool, name: str, size: int = 0) -> None:
    pool.createXML(f"<volume><name>{name}</name><capacity>{size}</capacity></volume>", 0)


def test_finding11_another_hosts_upload_in_progress_is_never_deleted(
    pool: libvirt.virStoragePool, tmp_path: Path, name: str
) -> None:
    """Before: a marker-less volume of the image's name was deleted as "an interrupted
    upload", even while another host was still writing it. Now each upload has a name of
    its own; a failed one of ours removes only itself."""
    source = _source(tmp_path, name, 4096)
    theirs = f"{name}~0123456789ab"  # another host's, marker not made yet
    _volume(pool, theirs, 1024)
    _volume(pool, name, 1024)  # the old scheme's name, no marker: maybe someone's upload
    conn = pool.connect()
    lines: list[str] = []
    with pytest.raises(DomainError) as caught:
        volumes.upload_image(conn, pool, source, lines.append)
    assert sorted(n for n in pool.listVolumes() if n.startswith(name)) == [name, theirs]
    assert pool.storageVolLookupByName(name).info()[1] == 1024  # the same, not re-made
    assert lines == []
    assert re.search(rf"uploading .* as {re.escape(name)}~[0-9a-f]{{12}} failed", str(caught.value))


def test_finding11_the_marker_is_trusted_only_with_the_right_size(
    pool: libvirt.virStoragePool, tmp_path: Path, name: str
) -> None:
    """Before: the marker alone vouched for the volume, half-written or not."""
    source = _source(tmp_path, name, 4096)
    conn = pool.connect()
    half = f"{name}~aaaaaaaaaaaa"
    _volume(pool, half, 2048)
    _volume(pool, half + volumes.MARKER)
    _volume(pool, name, 1024)  # the old scheme's, vouched for by its marker, half written
    _volume(pool, name + volumes.MARKER)
    with pytest.raises(DomainError, match="failed"):  # not trusted: uploaded again
        volumes.upload_image(conn, pool, source, print)
    whole = f"{name}~bbbbbbbbbbbb"
    _volume(pool, whole, 4096)
    _volume(pool, whole + volumes.MARKER)
    assert volumes.upload_image(conn, pool, source, print).name() == whole
