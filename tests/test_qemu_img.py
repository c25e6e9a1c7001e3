"""qcow2 files checked and layered with the real qemu-img."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pytest_devbox.image import qemu_img


def real_qcow2(path: Path, mib: int = 3) -> None:
    """A real qcow2 image with data in it, the way qemu-img writes one."""
    raw = path.with_suffix(".raw")
    raw.write_bytes(os.urandom(mib * 1024 * 1024))
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
    )
    raw.unlink()


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_header_of_real_images_is_sound(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    real_qcow2(img)
    assert qemu_img.header_problem(img) == ""
    empty = tmp_path / "empty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(empty), "1G"], check=True)
    assert qemu_img.header_problem(empty) == ""
    overlay = qemu_img.create_overlay(img, tmp_path / "o.qcow2")
    assert qemu_img.header_problem(overlay) == ""


@pytest.mark.parametrize(
    ("offset", "data", "problem"),
    [
        (0, bytes(512), "no qcow2 magic"),
        (4, (9).to_bytes(4, "big"), "qcow2 version 9"),
        (20, (40).to_bytes(4, "big"), "cluster bits 40"),
        (24, bytes(8), "virtual size of 0"),
        (40, (1 << 40).to_bytes(8, "big"), "L1 table offset"),
        (48, (12345).to_bytes(8, "big"), "refcount table offset"),
    ],
)
def test_a_damaged_header_of_the_same_size_is_named(
    tmp_path: Path, offset: int, data: bytes, problem: str
) -> None:
    img = tmp_path / "a.qcow2"
    real_qcow2(img)
    size = img.stat().st_size
    overwrite(img, offset, data)
    assert img.stat().st_size == size
    assert problem in qemu_img.header_problem(img)


def test_header_problem_of_short_or_missing_files(tmp_path: Path) -> None:
    short = tmp_path / "short.qcow2"
    short.write_bytes(b"QFI\xfb")
    assert "too short" in qemu_img.header_problem(short)
    assert "cannot read it" in qemu_img.header_problem(tmp_path / "missing.qcow2")


def test_check_finds_a_truncated_image(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    real_qcow2(img)
    assert qemu_img.check(img) == ""
    os.truncate(img, img.stat().st_size // 3)
    assert qemu_img.check(img) != ""


def test_overlay_is_backed_by_the_base(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    real_qcow2(base)
    before = base.read_bytes()
    dest = qemu_img.create_overlay(base, tmp_path / "run" / "vm.qcow2")
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(dest)], check=True, capture_output=True
        ).stdout
    )
    assert info["backing-filename"] == str(base) and info["backing-filename-format"] == "qcow2"
    assert base.read_bytes() == before
