"""Which `devbox up` guest --devbox-reuse picks: the running one of the same profile,
libvirt URI and code dir, never another project's (libvirt's test driver, in-process)."""

from __future__ import annotations

import uuid
from pathlib import Path

from test_domain import spec_for

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.settings import Settings
from pytest_devbox.pool import kept, reuse
from pytest_devbox.virt import domain as dom

URI = "test:///default"


def test_reuse_finds_only_this_projects_running_guest(tmp_path: Path) -> None:
    code, other = tmp_path / "code", tmp_path / "other"
    code.mkdir()
    other.mkdir()
    conn = dom.connect(URI)
    name = f"devbox-debian-12-{uuid.uuid4().hex[:8]}"
    up = dom.Domain.create(conn, spec_for("virtiofs", "tcg", name=name), autodestroy=False)
    try:
        ssh = ("ssh", "-p", "2222", "root@127.0.0.1")
        kept.save(tmp_path, kept.KeptGuest(name, "debian-12", URI, "/o.qcow2", ssh, str(code)))
        profile = BUILTIN_PROFILES["debian-12"]
        mine = Settings(uri=URI, cache_dir=tmp_path, code_dir=code, reuse=True)
        found = reuse.find(mine, profile, print)
        assert found is not None and found.name == name and found.port == "2222"
        # Another project's session, or another libvirt, never takes it.
        assert (
            reuse.find(Settings(uri=URI, cache_dir=tmp_path, code_dir=other), profile, print)
            is None
        )
        elsewhere = Settings(uri="qemu:///system", cache_dir=tmp_path, code_dir=code)
        assert reuse.find(elsewhere, profile, print) is None
        assert reuse.find(mine, BUILTIN_PROFILES["debian-11"], print) is None
    finally:
        up.destroy()
        conn.close()
    # Gone: its record is stale and is not used.
    assert reuse.find(mine, profile, print) is None
