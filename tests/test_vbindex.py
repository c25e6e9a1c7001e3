"""The one virt-builder index parser and formatter: our index and the public one."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from pytest_devbox.image.index import format_index, parse_sections, revisions, sections_by_name

INDEX = """\
[debian-11]
name=Debian 11
osinfo=debian11
arch=x86_64
file=debian-11-r5.qcow2.xz
format=qcow2
size=4294967296
compressed_size=11
checksum[sha512]=abc
revision=5
expand=/dev/sda1
notes=first line
 second line

[debian-12]
name=Debian 12
arch=x86_64
file=debian-12-r7.qcow2.xz
revision=7
"""

CLEARSIGNED = textwrap.dedent(
    """\
    -----BEGIN PGP SIGNED MESSAGE-----
    Hash: SHA512

    [centos-7.8]
    name=CentOS 7.8
    revision=2
    checksum=abc
    notes=CentOS
     continued note line
    - -dash-escaped=1

    [centos-7.8]
    arch=aarch64
    -----BEGIN PGP SIGNATURE-----
    xyz
    -----END PGP SIGNATURE-----
    """
)


def test_parse_index_reads_sections_keys_and_continuation_lines() -> None:
    sections = sections_by_name(INDEX)
    assert list(sections) == ["debian-11", "debian-12"]
    assert sections["debian-11"]["checksum[sha512]"] == "abc"
    assert sections["debian-11"]["notes"] == "first line\nsecond line"
    assert sections["debian-12"]["revision"] == "7"


def test_format_index_round_trips() -> None:
    sections = sections_by_name(INDEX)
    assert sections_by_name(format_index(sections)) == sections


def test_parse_index_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="line 1"):
        parse_sections("no section here\n")


def test_formatted_index_passes_virt_index_validate(tmp_path: Path) -> None:
    if shutil.which("virt-index-validate") is None:
        pytest.skip("virt-index-validate is not installed")
    index = tmp_path / "index"
    index.write_text(format_index(sections_by_name(INDEX)))
    proc = subprocess.run(["virt-index-validate", str(index)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_parse_index_handles_clearsigned_text() -> None:
    got = parse_sections(CLEARSIGNED)
    assert [name for name, _ in got] == ["centos-7.8", "centos-7.8"]
    assert got[0][1]["revision"] == "2"
    assert got[0][1]["notes"] == "CentOS\ncontinued note line"
    assert got[0][1]["-dash-escaped"] == "1"
    assert got[1][1] == {"arch": "aarch64"}


def test_revisions_lists_every_section_of_the_template() -> None:
    uri = "http://example.org/index.asc"
    assert revisions(parse_sections(CLEARSIGNED), "centos-7.8", uri) == [
        [uri, "", "2", "abc"],
        [uri, "aarch64", "1", ""],
    ]
    assert revisions(parse_sections(INDEX), "debian-11", "file:///i") == [
        ["file:///i", "x86_64", "5", "abc"]
    ]
    assert revisions(parse_sections(INDEX), "fedora-42", "file:///i") == []
