"""--devbox-keep-failed without a guest: the option, the kept mark on a running domain,
and the record that tells a failed test's guest from a guest of `devbox up`."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from test_domain import spec_for

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.settings import Settings
from pytest_devbox.plugin.hooks import state_key
from pytest_devbox.pool import kept, reuse
from pytest_devbox.virt import domain as dom

URI = "test:///default"


@pytest.mark.parametrize("where", ["flag", "ini"])
def test_the_option_reaches_the_settings(pytester: pytest.Pytester, where: str) -> None:
    args = ["--devbox=debian-12"]
    if where == "ini":
        pytester.makeini("[pytest]\ndevbox_keep_failed = true\n")
    else:
        args.append("--devbox-keep-failed")
    assert pytester.parseconfigure(*args).stash[state_key].settings.keep_failed is True
    assert pytester.parseconfigure("--devbox=debian-11").stash[state_key].settings.keep_failed is (
        where == "ini"
    )


def test_a_running_guest_is_marked_kept_in_place() -> None:
    conn = dom.connect(URI)
    try:
        name = f"devbox-debian-12-{uuid.uuid4().hex[:8]}"
        meta = {"distro": "debian-12", "keep": "0", "owner_pid": "1", "overlay": "/x.qcow2"}
        domain = dom.Domain.create(
            conn, spec_for("9p", "tcg", name=name, metadata=meta), autodestroy=False
        )
        try:
            domain.set_metadata({**domain.metadata(), "keep": "1"})
            assert dict(dom.list_devbox_domains(conn))[name] == {**meta, "keep": "1"}
        finally:
            domain.destroy()
    finally:
        conn.close()


def test_reuse_and_up_pass_a_failed_tests_guest_by(tmp_path: Path) -> None:
    conn = dom.connect(URI)  # held: the test driver forgets domains with its last connection
    domains = []
    try:
        guests = []
        for failed in ("", "test_x.py::test_y[debian-12]"):  # the failed test's is newer
            name = f"devbox-debian-12-{uuid.uuid4().hex[:8]}"
            spec = spec_for("9p", "tcg", name=name, metadata={"keep": "1"})
            domains.append(dom.Domain.create(conn, spec, autodestroy=False))
            ssh = ("ssh", "-p", "40022", "root@127.0.0.1")
            guests.append(kept.KeptGuest(name, "debian-12", URI, "", ssh, str(tmp_path), failed))
            kept.save(tmp_path, guests[-1])
        loaded = kept.load_all(tmp_path, kept.running_names, print)
        assert loaded == guests  # the record says whose it is
        settings = Settings(uri=URI, cache_dir=tmp_path, code_dir=tmp_path, reuse=True)
        found = reuse.find(settings, BUILTIN_PROFILES["debian-12"], print)
        assert found == guests[0]  # `devbox up`'s, not the failed test's
    finally:
        for domain in domains:
            domain.destroy()
        conn.close()
