"""Records of kept guests (`devbox up`): stale and corrupt records are never trusted.
Domains come from libvirt's test driver, so nothing touches the host's libvirtd."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from test_domain import spec_for

from pytest_devbox.cli.context import running as _running
from pytest_devbox.host.layout import CacheLayout
from pytest_devbox.pool import kept
from pytest_devbox.virt import domain as dom

URI = "test:///default"


def _guest(name: str, distro: str = "debian-12") -> kept.KeptGuest:
    return kept.KeptGuest(name, distro, URI, f"/nonexistent/{name}.qcow2", ("ssh", "-p", "2222"))


def test_only_records_of_running_guests_are_used(tmp_path: Path) -> None:
    conn = dom.connect(URI)
    name = f"devbox-debian-12-{uuid.uuid4().hex[:8]}"
    live = dom.Domain.create(conn, spec_for("9p", "tcg", name=name), autodestroy=False)
    try:
        kept.save(tmp_path, _guest(name))
        kept.save(tmp_path, _guest("devbox-debian-11-gone", "debian-11"))  # destroyed since
        corrupt = CacheLayout(tmp_path).kept / "devbox-broken.json"
        corrupt.write_text('{"name": "devbox-broken", ')  # torn by a crash
        warnings: list[str] = []
        found = kept.load(tmp_path, _running, warnings.append)
    finally:
        live.destroy()
        conn.close()
    assert set(found) == {"debian-12"} and found["debian-12"].ssh == ("ssh", "-p", "2222")
    # The stale record is gone; the corrupt one is reported, not a traceback.
    assert not (CacheLayout(tmp_path).kept / "devbox-debian-11-gone.json").exists()
    assert any("devbox-broken.json" in w for w in warnings)


def test_save_is_atomic_and_forget_removes(tmp_path: Path) -> None:
    kept.save(tmp_path, _guest("devbox-x"))
    files = sorted(p.name for p in CacheLayout(tmp_path).kept.iterdir())
    assert files == ["devbox-x.json"]  # no temporary left beside it
    kept.forget(tmp_path, "devbox-x")
    kept.forget(tmp_path, "devbox-x")  # idempotent
    assert not list(CacheLayout(tmp_path).kept.iterdir())


def test_a_record_at_an_unreachable_uri_is_kept_and_skipped(tmp_path: Path) -> None:
    # libvirtd down (or a URI of another host) says nothing about whether the guest is gone.
    away = kept.KeptGuest("devbox-debian-12-away", "debian-12", "qemu:///system?socket=/x", "", ())
    kept.save(tmp_path, away)
    warnings: list[str] = []
    assert kept.load(tmp_path, _running, warnings.append) == {}
    assert (CacheLayout(tmp_path).kept / "devbox-debian-12-away.json").exists()
    assert any("cannot check the guests kept at qemu:///system?socket=/x" in w for w in warnings)


def test_records_written_before_code_dir_was_recorded_still_load(tmp_path: Path) -> None:
    conn = dom.connect(URI)
    name = f"devbox-debian-12-{uuid.uuid4().hex[:8]}"
    live = dom.Domain.create(conn, spec_for("9p", "tcg", name=name), autodestroy=False)
    try:
        old = {"name": name, "distro": "debian-12", "uri": URI, "overlay": "", "ssh": ["ssh"]}
        (CacheLayout(tmp_path).kept).mkdir(parents=True)
        (CacheLayout(tmp_path).kept / f"{name}.json").write_text(json.dumps(old))
        found = kept.load(tmp_path, _running, print)
    finally:
        live.destroy()
        conn.close()
    assert found["debian-12"].code_dir == "" and found["debian-12"].port == ""
