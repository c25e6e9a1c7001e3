"""Vendors' checksum files, parsed from samples in their published layouts
(tests/data/checksums/README.md says where each line comes from)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_devbox.image.checksums import ChecksumError, digest_for, file_digest, parse

DATA = Path(__file__).parent / "data" / "checksums"


@pytest.mark.parametrize(
    ("sample", "name", "digest"),
    [
        (
            "rocky-9-CHECKSUM",
            "Rocky-9-GenericCloud-Base-9.8-20260525.0.x86_64.qcow2",
            "sha256:92c206cc6f790c61583247eefe87890f8828420662c17cacf247cec78ab4eec8",
        ),
        (
            "centos-stream-9-CHECKSUM",
            "CentOS-Stream-GenericCloud-9-20260720.0.x86_64.qcow2",
            "sha256:c2bde1f49fcb2efa55c40c4ec5011a8f2fb227c63254774b2a4d186b41f3a9a5",
        ),
        (
            "fedora-43-CHECKSUM",
            "Fedora-Cloud-Base-Generic-43-1.6.x86_64.qcow2",
            "sha256:846574c8a97cd2d8dc1f231062d73107cc85cbbbda56335e264a46e3a6c8ab2f",
        ),
        (
            "ubuntu-24.04-SHA256SUMS",
            "ubuntu-24.04-server-cloudimg-amd64.img",
            "sha256:0533b0655c32e68b31d792ecd6ccfca95abdbc536c4446874fe0513bd4140ffe",
        ),
        (
            "debian-13-SHA512SUMS",
            "debian-13-genericcloud-amd64-20260712-2537.qcow2",
            "sha512:7ae53e9dbee282bfc16f289dec483dde3a8598769c38a267948310f7a2a52c662620198603bc52"
            "c142627efba379863d16079698a10b34102d55bcedd40e8d32",
        ),
        (
            "almalinux-9-CHECKSUM",
            "AlmaLinux-9-GenericCloud-9.8-20260526.x86_64.qcow2",
            "sha256:c397eed7023e92c841155831b1f47e26300e5bef0f0256c129322307c897a251",
        ),
    ],
)
def test_each_vendors_file_gives_the_digest_of_the_image(
    sample: str, name: str, digest: str
) -> None:
    assert digest_for((DATA / sample).read_text(), name, sample) == digest


def test_names_are_matched_whole_and_other_arches_keep_theirs() -> None:
    text = (DATA / "ubuntu-24.04-SHA256SUMS").read_text()
    entries = parse(text)
    assert len(entries) == 16
    assert entries["ubuntu-24.04-server-cloudimg-arm64.img"].startswith("sha256:aa6da057")
    with pytest.raises(
        ChecksumError, match=re.escape("lists no digest for 'ubuntu-24.04-server-cloudimg-amd64'")
    ):
        digest_for(text, "ubuntu-24.04-server-cloudimg-amd64", "SHA256SUMS")


def test_the_size_comments_and_the_pgp_armour_are_not_entries() -> None:
    entries = parse((DATA / "fedora-43-CHECKSUM").read_text())
    assert list(entries) == ["Fedora-Cloud-Base-Generic-43-1.6.x86_64.qcow2"]
    assert len(parse((DATA / "rocky-9-CHECKSUM").read_text())) == 2


def test_a_name_absent_is_a_clear_error_naming_the_file() -> None:
    with pytest.raises(ChecksumError) as e:
        digest_for((DATA / "rocky-9-CHECKSUM").read_text(), "Rocky-8.qcow2", "http://x/CHECKSUM")
    assert "http://x/CHECKSUM lists no digest for 'Rocky-8.qcow2'" in str(e.value)
    assert "Rocky-9-GenericCloud-Base.latest.x86_64.qcow2" in str(e.value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<html><body>404 Not Found</body></html>\n",
        "MD5 (x.img) = d41d8cd98f00b204e9800998ecf8427e\n",
    ],
)
def test_an_unknown_format_is_a_clear_error(text: str) -> None:
    with pytest.raises(ChecksumError, match="not a checksum file in a known format"):
        digest_for(text, "x.img", "http://x/SUMS")


def test_a_digest_of_the_wrong_length_is_no_entry() -> None:
    assert parse("SHA256 (a.img) = " + "0" * 63 + "\n" + "0" * 63 + "  b.img\n") == {}


def test_a_file_digest_is_in_the_same_form(tmp_path: Path) -> None:
    f = tmp_path / "x.img"
    f.write_bytes(b"abc")
    assert file_digest(f, "sha256") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
