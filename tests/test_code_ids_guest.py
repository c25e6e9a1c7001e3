"""Guest root must not be host root on the code dir (review finding 1), on real guests:
as root in the guest, plant a setuid-root shell and a device node in /code, and find
neither on the host, with default settings; with passthrough opted in, the header says
so and the summary reports what appeared."""

from __future__ import annotations

import os
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest
from guest_session import pytest_on_debian12
from guests import start_machine

from pytest_devbox.config.code_ids import header_line
from pytest_devbox.config.profiles import BUILTIN_PROFILES, Profile, load_profiles
from pytest_devbox.guest import code_audit
from pytest_devbox.image.cache import ImageCache

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="QEMU as root: the case 9p squash misses"),
]
PLANT = "cp /bin/sh /code/x && chown 0:0 /code/x && chmod 4755 /code/x && mknod /code/n c 1 3"


def _debian_11_9p(tmp_path: Path) -> Profile:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.pytest-devbox.distros.debian-11-9p]\nextends = "debian-11"\nshare = "9p"\n'
    )
    return load_profiles(tmp_path)["debian-11-9p"]


@pytest.mark.parametrize("distro", ["debian-11-9p", "debian-12"])
def test_guest_root_plants_nothing_on_the_host(
    cache: ImageCache, tmp_path: Path, distro: str
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    profile = _debian_11_9p(tmp_path) if distro == "debian-11-9p" else BUILTIN_PROFILES[distro]
    with start_machine(profile, cache, code) as m:
        assert m.share == "9p"  # debian-12's virtiofs is moved to 9p (mapped)
        m.run(PLANT, user="root")
        # The guest sees what it asked for: mapped mode keeps it in xattrs ...
        seen = m.run("stat -c '%u %a %F' /code/x /code/n", user="root").stdout.split("\n")
        assert seen[:2] == ["0 4755 regular file", "0 644 character special file"]
    # ... and the host has plain files: no setuid bit, no device node.
    assert code_audit.scan(code) == frozenset()
    for name in ("x", "n"):
        st = (code / name).lstat()
        assert stat.S_ISREG(st.st_mode) and not st.st_mode & (stat.S_ISUID | stat.S_ISGID)


def test_passthrough_is_said_and_what_it_lets_through_is_reported(tmp_path: Path) -> None:
    (tmp_path / "test_plant.py").write_text(
        textwrap.dedent(
            f"""
            def test_plant(devbox):
                devbox.run({PLANT!r}, user="root")
            """
        )
    )
    try:
        r = subprocess.run(
            pytest_on_debian12("--devbox-code-ids=passthrough"),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    finally:  # a setuid-root shell is not left lying around
        for name in ("x", "n"):
            (tmp_path / name).unlink(missing_ok=True)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert f"devbox: {header_line('passthrough')}" in out
    assert "WARNING: 2 setuid/setgid file(s) or device node(s) appeared" in out
    assert "  x: setuid, owner uid 0, mode -rwsr-xr-x" in out
    assert "  n: char device, owner uid 0" in out
