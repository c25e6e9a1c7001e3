"""Remote libvirt hosts, fast tier: URI parsing, pool and volume XML and names, and the
SSH tunnel (remote.Tunnel) through a real sshd on loopback, with the OpenSSH line a
person would paste run for real."""

from __future__ import annotations

import socket
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_sshd import HAVE_SSHD, Sshd, client_files, host_key, run_sshd, username

from pytest_devbox.errors import HostNotReady, SSHError
from pytest_devbox.host import owner
from pytest_devbox.transport.ssh import Connection
from pytest_devbox.transport.tunnel import (
    RemoteHost,
    Target,
    Tunnel,
    jump_options,
    parse_uri,
    resolve,
)
from pytest_devbox.virt import volumes

# --- URIs -------------------------------------------------------------------------------


def test_a_local_uri_has_no_remote_host() -> None:
    assert parse_uri("qemu:///system") is None
    assert parse_uri("qemu:///session") is None


def test_user_host_port_and_libvirt_query_parameters_are_read() -> None:
    r = parse_uri(
        "qemu+ssh://alice@build-3.example:2222/system?keyfile=/k/id&no_verify=1"
        "&known_hosts=/k/kh&command=/usr/bin/ssh"
    )
    assert r == RemoteHost(
        uri=r.uri if r else "",
        host="build-3.example",
        user="alice",
        port=2222,
        keyfile=Path("/k/id"),
        no_verify=True,
        known_hosts=Path("/k/kh"),
    )


def test_defaults_are_port_22_our_user_and_verified_host_keys() -> None:
    r = parse_uri("qemu+ssh://build-3/system")
    assert r is not None
    assert (r.user, r.port, r.keyfile, r.no_verify) == (username(), 22, None, False)
    assert parse_uri("qemu+ssh://h/system?no_verify=0") == RemoteHost(
        "qemu+ssh://h/system?no_verify=0", "h", username()
    )


def test_a_remote_uri_without_ssh_is_refused_with_the_reason() -> None:
    with pytest.raises(HostNotReady, match=r"SSH transport.*loopback"):
        parse_uri("qemu+tcp://build-3/system")


def test_the_jump_is_plain_minus_j_without_options() -> None:
    r = parse_uri("qemu+ssh://alice@h:2222/system")
    assert r is not None and jump_options(r) == ["-J", "alice@h:2222"]


def test_the_jump_carries_the_key_file_and_host_key_policy_of_the_uri() -> None:
    r = parse_uri("qemu+ssh://alice@h:2222/system?keyfile=/k/id&no_verify=1")
    assert r is not None
    (dash_o, proxy) = jump_options(r)
    assert dash_o == "-o" and proxy.startswith("ProxyCommand=ssh -p 2222 -i /k/id")
    assert "StrictHostKeyChecking=no" in proxy and proxy.endswith("-W %h:%p alice@h")


# --- pool and volumes ------------------------------------------------------------------


def test_pool_xml_is_a_dir_pool_over_the_path() -> None:
    root = ET.fromstring(volumes.pool_xml("devbox-x", "/srv/devbox"))
    assert root.get("type") == "dir"
    assert (root.findtext("name"), root.findtext("target/path")) == ("devbox-x", "/srv/devbox")


def test_a_pool_name_per_directory() -> None:
    a, b = volumes.pool_name("/srv/a"), volumes.pool_name("/srv/b")
    assert a != b and a == volumes.pool_name("/srv/a") and a.startswith("devbox-")


def test_an_overlay_volume_is_qcow2_backed_by_the_uploaded_image() -> None:
    root = ET.fromstring(volumes.volume_xml("g.qcow2", 10 << 30, backing="/srv/base.qcow2"))
    assert root.findtext("capacity") == str(10 << 30)
    assert root.find("target/format").get("type") == "qcow2"  # type: ignore[union-attr]
    assert root.findtext("backingStore/path") == "/srv/base.qcow2"
    assert root.find("backingStore/format").get("type") == "qcow2"  # type: ignore[union-attr]
    assert ET.fromstring(volumes.volume_xml("b.qcow2", 1)).find("backingStore") is None


def test_an_uploaded_image_is_named_like_the_cache_plus_its_build() -> None:
    name = volumes.image_volume(
        Path("/c/images/debian-12-0123456789abcdef.qcow2"), "2026-11-28T12:29:20+00:00"
    )
    assert name == "debian-12-0123456789abcdef-20261128122920.qcow2"


def test_a_guest_volume_names_its_domain_and_owner() -> None:
    name = volumes.guest_volume("devbox-debian-12-abcd1234-ef01", volumes.OVERLAY)
    assert volumes.parse_guest_volume(name) == (
        "devbox-debian-12-abcd1234-ef01",
        socket.gethostname(),
        owner.me().token,  # boot, PID namespace, pid and start time: not (host, pid)
        "qcow2",
    )
    assert volumes.parse_guest_volume("debian-12-0123.qcow2") is None
    assert volumes.parse_guest_volume("debian-12-0123.qcow2" + volumes.MARKER) is None


# --- the tunnel, through a real sshd ---------------------------------------------------

needs_sshd = pytest.mark.skipif(not HAVE_SSHD, reason="needs OpenSSH's sshd and ssh-keygen")


@pytest.fixture(scope="module")
def jump(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sshd, Path]]:
    d = tmp_path_factory.mktemp("jump")
    key, authorized = client_files(d)
    with run_sshd(d / "sshd", authorized, host_key(d / "host_key")) as sshd:
        yield sshd, key


def _remote(jump: tuple[Sshd, Path]) -> RemoteHost:
    sshd, key = jump
    uri = f"qemu+ssh://{username()}@127.0.0.1:{sshd.port}/system?keyfile={key}&no_verify=1"
    r = parse_uri(uri)
    assert r is not None
    return r


@pytest.fixture
def greeter() -> Iterator[int]:
    """A listener on 127.0.0.1 that greets like sshd and hangs up."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.sendall(b"SSH-2.0-greeter\r\n")
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield server.getsockname()[1]
    stop.set()
    t.join()
    server.close()


@needs_sshd
def test_the_tunnel_probes_a_banner_on_the_far_loopback(
    jump: tuple[Sshd, Path], greeter: int
) -> None:
    tunnel = Tunnel(_remote(jump))
    try:
        assert tunnel.probe_banner(greeter, 5.0)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        assert not tunnel.probe_banner(closed, 5.0)
    finally:
        tunnel.close()


@needs_sshd
def test_the_tunnel_reopens_after_its_connection_died(
    jump: tuple[Sshd, Path], greeter: int
) -> None:
    tunnel = Tunnel(_remote(jump))
    try:
        assert tunnel.probe_banner(greeter, 5.0)
        transport = tunnel._transport()
        transport.close()  # as if the remote host dropped us
        assert tunnel.probe_banner(greeter, 5.0)
        assert tunnel._transport() is not transport
    finally:
        tunnel.close()


@needs_sshd
def test_a_refused_login_says_how_to_check_it(jump: tuple[Sshd, Path], tmp_path: Path) -> None:
    sshd, _key = jump
    from pytest_devbox.transport.keys import ensure_keypair

    other = ensure_keypair(tmp_path / "other")
    r = parse_uri(
        f"qemu+ssh://{username()}@127.0.0.1:{sshd.port}/system?keyfile={other}&no_verify=1"
    )
    assert r is not None
    with pytest.raises(SSHError, match=r"cannot open the SSH tunnel.*ssh -p"):
        Tunnel(r).open(22, 5.0)


@needs_sshd
def test_an_unknown_host_key_is_refused_without_no_verify(
    jump: tuple[Sshd, Path], tmp_path: Path
) -> None:
    sshd, key = jump
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    r = parse_uri(
        f"qemu+ssh://{username()}@127.0.0.1:{sshd.port}/system?keyfile={key}&known_hosts={kh}"
    )
    assert r is not None
    with pytest.raises(SSHError, match="cannot open the SSH tunnel"):
        Tunnel(r).open(22, 5.0)


@needs_sshd
def test_a_guest_connection_through_the_tunnel_and_the_line_a_person_pastes(
    jump: tuple[Sshd, Path], tmp_path: Path
) -> None:
    """The "guest" is the sshd itself, reached as 127.0.0.1:PORT from the jump host's side;
    commands run over a direct-tcpip channel, and the printed ssh line works from a shell."""
    sshd, key = jump
    remote = _remote(jump)
    tunnel = Tunnel(remote)
    conn = Connection(
        "127.0.0.1",
        sshd.port,
        username=username(),
        key_path=key,
        known_hosts=tmp_path / "known_hosts",
        host_key_alias="jump-itself",
        opener=lambda timeout: tunnel.open(sshd.port, timeout),
        via=jump_options(remote),
    )
    try:
        conn.connect(timeout=10)
        assert conn.run("echo through", cwd=None).stdout == "through\n"
        tunnel.close()  # the tunnel dies under the connection: the next command reconnects
        assert conn.run("echo again", cwd=None).stdout == "again\n"
        argv = conn.ssh_command()
        assert argv[1:3] == ["-o", argv[2]] and argv[2].startswith("ProxyCommand=")
        out = subprocess.run(
            [*argv, "-o", "BatchMode=yes", "echo", "pasted"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.stdout == "pasted\n", out.stderr
    finally:
        conn.close()
        tunnel.close()


# --- ~/.ssh/config and known_hosts, as OpenSSH reads them (findings 24, 7) ---------------


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return path


def test_finding_24_the_uri_wins_over_ssh_config_which_wins_over_defaults(
    tmp_path: Path,
) -> None:
    config = _config(
        tmp_path,
        "Host buildbox\n  HostName 10.1.2.3\n  Port 2201\n  User bob\n  IdentityFile ~/k1\n",
    )
    plain = parse_uri("qemu+ssh://buildbox/system")
    spelled = parse_uri("qemu+ssh://alice@buildbox:2200/system?keyfile=/k/id")
    assert plain is not None and spelled is not None
    assert resolve(plain, config) == Target(
        "10.1.2.3", 2201, "bob", (str(Path("~/k1").expanduser()),)
    )
    assert resolve(spelled, config) == Target("10.1.2.3", 2200, "alice", ("/k/id",))
    assert resolve(plain, tmp_path / "none") == Target("buildbox", 22, username())
    # The line a person pastes leaves OpenSSH the same room: no port or user of ours.
    assert jump_options(plain) == ["-J", "buildbox"]


@needs_sshd
def test_finding_24_the_tunnel_reaches_an_ssh_config_alias(
    jump: tuple[Sshd, Path], greeter: int, tmp_path: Path
) -> None:
    sshd, key = jump
    config = _config(
        tmp_path,
        f"Host buildbox\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {username()}\n"
        f"  IdentityFile {key}\n",
    )
    r = parse_uri("qemu+ssh://buildbox/system?no_verify=1")
    assert r is not None
    tunnel = Tunnel(r, ssh_config=config)
    try:
        assert tunnel.probe_banner(greeter, 5.0)
    finally:
        tunnel.close()


@needs_sshd
def test_finding_24_no_verify_still_refuses_a_key_that_contradicts_known_hosts(
    jump: tuple[Sshd, Path], tmp_path: Path
) -> None:
    sshd, key = jump
    other = host_key(tmp_path / "not_the_servers")
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {Path(f'{other}.pub').read_text()}")
    base = f"qemu+ssh://{username()}@127.0.0.1:{sshd.port}/system?keyfile={key}"
    r = parse_uri(f"{base}&no_verify=1&known_hosts={kh}")
    assert r is not None
    with pytest.raises(SSHError, match=r"host key CHANGED"):
        Tunnel(r).open(22, 5.0)
    # A key known_hosts does not know at all is still accepted with no_verify.
    kh.write_text("")
    tunnel = Tunnel(r)
    try:
        tunnel.connect()
    finally:
        tunnel.close()


@needs_sshd
def test_finding_7_a_known_hosts_file_that_is_missing_is_a_clear_ssh_error(
    jump: tuple[Sshd, Path], tmp_path: Path
) -> None:
    sshd, key = jump
    missing = tmp_path / "known_hosts_build"
    r = parse_uri(
        f"qemu+ssh://{username()}@127.0.0.1:{sshd.port}/system?keyfile={key}&known_hosts={missing}"
    )
    assert r is not None
    with pytest.raises(SSHError, match=r"known_hosts=.*names no readable file.*fix the path"):
        Tunnel(r).connect()
    assert Tunnel(r).probe_banner(22, 5.0) is False  # an SSHError, as probe_banner expects
