"""Attaching to a running guest (guest/attach.py, sites.Link), fast tier: which way a guest's
port is reached for a URI, through a real sshd as the remote host; what the xdist
controller hands a worker and what a kept record stores (the guest's URI, chosen by the
hosts map); --devbox-reuse finding a guest on its distro's host; and `devbox ls` and
`destroy` over every URI of a project (libvirt's test driver, in-process)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from local_sshd import HAVE_SSHD, Sshd, client_files, host_key, run_sshd, username
from test_domain import spec_for

from pytest_devbox.cli.context import Context
from pytest_devbox.cli.main import main
from pytest_devbox.config import project_files
from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.settings import Settings
from pytest_devbox.errors import DevboxError
from pytest_devbox.guest.attach import Running, attach
from pytest_devbox.guest.machine import Machine
from pytest_devbox.guest.parts import GuestParts
from pytest_devbox.guest.sites import Link, LocalFiles
from pytest_devbox.host.layout import CacheLayout
from pytest_devbox.image.cache import ImageInfo
from pytest_devbox.plugin.broker import describe
from pytest_devbox.pool import kept, reuse
from pytest_devbox.transport.keys import ensure_keypair, public_key_line
from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import domain_xml

URI = "test:///default"
BAD_URI = "qemu:///system?socket=/nonexistent"
REMOTE = "qemu+ssh://ci@build-1:2222/system"
IMAGE = ImageInfo(Path("/c/images/debian-12-0123.qcow2"), "0123", False, None, {"built_at": "x"})


@pytest.fixture
def virt() -> Iterator[libvirt.virConnect]:
    """Held for the test: the test driver forgets its domains with its last connection."""
    conn = dom.connect(URI)
    yield conn
    conn.close()


def _domain(conn: libvirt.virConnect, distro: str = "debian-12", **meta: str) -> dom.Domain:
    name = f"devbox-{distro}-{uuid.uuid4().hex[:8]}"
    meta = {"distro": distro, "keep": "1", "started": str(int(time.time())), **meta}
    spec = spec_for("9p", "tcg", name=name, metadata=meta)
    return dom.Domain.create(conn, spec, autodestroy=False)


# --- the way to a guest's port ---------------------------------------------------------


def test_a_local_uri_is_reached_on_our_loopback_a_remote_one_through_its_host(
    tmp_path: Path,
) -> None:
    local = Link("qemu:///system")
    assert local.remote is None and local.tunnel is None
    conn = local.connection(tmp_path, 40022, "devbox-alias")
    assert conn.ssh_command()[-1] == "root@127.0.0.1" and "-J" not in conn.ssh_command()
    far = Link(REMOTE)
    assert far.remote is not None and far.tunnel is not None
    argv = far.connection(tmp_path, 40022, "devbox-alias", username="devbox").ssh_command()
    assert argv[argv.index("-J") + 1] == "ci@build-1:2222"
    assert argv[-1] == "devbox@127.0.0.1" and argv[argv.index("-p") + 1] == "40022"
    far.close()


@pytest.fixture(scope="module")
def jump(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sshd, Path, Path]]:
    """An sshd standing for the remote host, which also admits the cache's own key (so
    it can stand for the guest behind itself too)."""
    d = tmp_path_factory.mktemp("jump")
    key, authorized = client_files(d)
    cache = d / "cache"
    ours = ensure_keypair(CacheLayout(cache).ssh)
    authorized.write_text(authorized.read_text() + public_key_line(ours) + "\n")
    with run_sshd(d / "sshd", authorized, host_key(d / "host_key")) as sshd:
        yield sshd, key, cache


@pytest.mark.skipif(not HAVE_SSHD, reason="needs OpenSSH's sshd and ssh-keygen")
def test_a_link_reaches_a_port_on_the_remote_loopback_through_the_tunnel(
    jump: tuple[Sshd, Path, Path],
) -> None:
    sshd, key, cache = jump
    link = Link(f"qemu+ssh://{username()}@127.0.0.1:{sshd.port}/system?keyfile={key}&no_verify=1")
    conn = link.connection(cache, sshd.port, "jump-as-guest", username=username())
    try:
        conn.connect(timeout=10)
        assert conn.run("echo far", cwd=None).stdout == "far\n"
        assert link.tunnel is not None and link.tunnel._client is not None  # went through it
    finally:
        conn.close()
        link.close()


def test_attach_looks_the_guest_up_at_its_own_uri(virt: libvirt.virConnect) -> None:
    """Not at --devbox-uri (unreachable here): at the URI the guest runs at."""
    d = _domain(virt, image_key="0123")
    settings = Settings(uri=BAD_URI)
    seen: list[str] = []

    def check(metadata: object) -> None:
        seen.append(str(metadata))
        raise DevboxError("stop before logging in")

    profile = BUILTIN_PROFILES["debian-12"]
    try:
        with pytest.raises(DevboxError, match="stop before logging in"):
            attach(Running(d.name, URI, 22), profile, IMAGE, settings, whose="x", check=check)
        assert "0123" in seen[0]
        with pytest.raises(DevboxError, match="the controller's guest devbox-none is gone"):
            attach(
                Running("devbox-none", URI, 22),
                profile,
                IMAGE,
                settings,
                whose="the controller's guest",
            )
    finally:
        d.destroy()


# --- what the controller hands a worker, what a kept record stores -------------------


def _machine(virt: libvirt.virConnect, link: Link, cache: Path) -> Machine:
    """A Machine on a test-driver domain, with a connection that is never opened."""
    d = _domain(virt)
    parts = GuestParts(
        profile=BUILTIN_PROFILES["debian-12"],
        image=IMAGE,
        virconn=dom.connect(URI),
        domain=d,
        ssh=link.connection(cache, 41022, "devbox-alias"),
        files=LocalFiles(Path("/pool/o.qcow2"), Path("/pool/o.console")),
        share="sync",
        code_dir=cache,
        site=link,
    )
    machine = Machine(parts)
    machine.boot_seconds = 3.0
    return machine


def test_the_workers_info_carries_the_guests_uri(virt: libvirt.virConnect, tmp_path: Path) -> None:
    machine = _machine(virt, Link(REMOTE), tmp_path)
    try:
        info = json.loads(json.dumps(describe(machine, REMOTE)))  # as it crosses the socket
        assert Running.from_dict(info) == Running(
            machine.name, REMOTE, 41022, "/pool/o.qcow2", "/pool/o.console", "sync"
        )
        assert info["key"] == "0123" and info["boot_seconds"] == 3.0
    finally:
        machine.domain.destroy()
        machine.detach()


def test_a_kept_record_stores_the_uri_the_hosts_map_chose(
    virt: libvirt.virConnect, tmp_path: Path
) -> None:
    settings = Settings(uri=BAD_URI, cache_dir=tmp_path, code_dir=tmp_path, hosts=(("*", URI),))
    ctx = Context(settings, dict(BUILTIN_PROFILES), [], project_files.locate(tmp_path))
    machine = _machine(virt, Link(URI), tmp_path)
    try:
        record = ctx.remember(machine)
        assert record.uri == URI
        (loaded,) = kept.load_all(tmp_path, kept.running_names, print)
        assert loaded == record and loaded.port == "41022"
        # --devbox-reuse finds it on the host the hosts map names, not at --devbox-uri.
        found = reuse.find(settings, BUILTIN_PROFILES["debian-12"], print)
        assert found is not None and found.name == machine.name
    finally:
        machine.domain.destroy()
        machine.detach()


# --- devbox ls and destroy over every URI of the project -----------------------------


def _node_file(path: Path, name: str) -> str:
    """A test-driver URI whose host runs one kept devbox guest `name` (each connection
    to it gets its own copy: a host of its own)."""
    meta = {"distro": "debian-11", "keep": "1", "started": str(int(time.time()) - 120)}
    xml = domain_xml.build_xml(spec_for("9p", "tcg", name=name, metadata=meta))
    path.write_text(f"<node>{xml}</node>")
    return f"test://{path}"


def test_ls_and_destroy_look_at_every_uri_of_the_project(
    virt: libvirt.virConnect, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    here = _domain(virt, "debian-12", image_key="0123")
    there = f"devbox-debian-11-{uuid.uuid4().hex[:8]}"
    other_host = _node_file(tmp_path / "node.xml", there)
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        "[tool.pytest-devbox.hosts]\n"
        f'"debian-11" = "{other_host}"\n"debian-12" = "{URI}"\n"centos-7" = "{BAD_URI}"\n'
    )
    argv = ["--uri", URI, "--cache", str(tmp_path / "cache"), "--project", str(project)]
    try:
        assert main(["ls", "--json", *argv]) == 0
        out = capsys.readouterr()
        rows = {r["name"]: r for r in json.loads(out.out)}
        assert rows[here.name]["uri"] == URI and rows[there]["uri"] == other_host
        assert list(rows).count(here.name) == 1  # --uri and the map name one URI: once
        assert f"cannot list the guests at {BAD_URI}" in out.err  # the others still listed
        assert main(["ls", *argv]) == 0
        text = capsys.readouterr().out
        assert text.splitlines()[0].split()[-2:] == ["HOST", "NAME"]
        assert any(ln.endswith(f"local  {there}") for ln in text.splitlines()), text
        # No record in this cache (a --devbox-keep guest): destroyed when named in full.
        assert main(["destroy", there, *argv]) == 0
        assert f"destroyed {there} (debian-11)" in capsys.readouterr().out
    finally:
        here.destroy()


def test_the_project_uris_are_the_uri_and_the_hosts_maps_once_each(tmp_path: Path) -> None:
    hosts = (("*", REMOTE), ("centos-7", "qemu+ssh://b2/system"), ("debian-12", REMOTE))
    ctx = Context(Settings(uri=URI, hosts=hosts), {}, [], project_files.locate(tmp_path))
    assert ctx.uris() == [URI, REMOTE, "qemu+ssh://b2/system"]
