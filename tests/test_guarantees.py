"""README promises that only a real guest can prove (VM tier, kept short): the cached
base image is never written, and /code is the code dir, which the plugin never writes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest
from guest_session import pytest_on_debian12

from pytest_devbox.guest.machine import Machine

pytestmark = pytest.mark.vm


def _fingerprint(path: Path) -> tuple[int, int, str]:
    """Size, mtime and sha256: any write to the file changes at least one of them."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    st = path.stat()
    return st.st_size, st.st_mtime_ns, digest.hexdigest()


def test_the_cached_image_is_never_written(debian12: Machine) -> None:
    base = debian12.image.path
    before = _fingerprint(base)
    overlay_before = debian12.overlay.stat().st_mtime_ns
    # 128 MiB of new data on the guest's root disk, flushed through to the host.
    debian12.run(
        "dd if=/dev/zero of=/var/tmp/devbox-fill bs=1M count=128 conv=fsync status=none"
        " && rm /var/tmp/devbox-fill && sync",
        user="root",
        cwd=None,
        timeout=600,
    )
    assert _fingerprint(base) == before
    # The writes went somewhere: the guest's own overlay (its size need not grow when
    # the guest reuses blocks an earlier test of the session already wrote).
    assert debian12.overlay.stat().st_mtime_ns > overlay_before


def _tree(root: Path) -> list[tuple[str, int, int, int]]:
    """Every entry under ``root`` (itself included): name, mode, size, mtime."""
    entries = []
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        size = 0 if p.is_dir() else st.st_size  # a directory's size follows its entries
        entries.append((str(p.relative_to(root)), st.st_mode, size, st.st_mtime_ns))
    return entries


def test_code_dir_is_mounted_and_never_written(tmp_path: Path) -> None:
    # The code dir is not the rootdir: --devbox-code-dir is what the guest sees at /code.
    code = tmp_path / "code"
    (code / "src").mkdir(parents=True)
    marker = uuid.uuid4().hex
    (code / "marker.txt").write_text(marker + "\n")
    (code / "src" / "module.py").write_text("print('hello')\n" * 100)
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_reads.py").write_text(
        textwrap.dedent(
            f"""
            def test_reads_the_code_dir(devbox):
                assert devbox.run("cat /code/marker.txt").stdout == "{marker}\\n"
                assert devbox.run("ls /code").stdout.split() == ["marker.txt", "src"]
                assert devbox.run("wc -l < src/module.py").stdout.strip() == "100"
                devbox.run("ls -la /code /code/src; stat /code/marker.txt")
            """
        )
    )
    before = _tree(code)
    r = subprocess.run(
        pytest_on_debian12(f"--devbox-code-dir={code}", "-v"),
        cwd=project,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
        # No __pycache__ next to the test file: pytest's own writes are not the point.
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_reads_the_code_dir[debian-12] PASSED" in r.stdout
    assert _tree(code) == before
