"""Whose a guest, run dir or slot is, across PID namespaces, users and URIs (review
2026-12, findings 4, 6, 7, 10, 13, 19, 20, 21), on libvirt's test driver and real
processes: a pid in another PID namespace (`unshare`, as root), another user
(`setpriv`), a killed owner holding a run dir's lock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.errors import DomainError
from pytest_devbox.guest import restore
from pytest_devbox.guest.reaper import Reaper, reap
from pytest_devbox.guest.slots import Lease, SaveCache, host_fingerprint
from pytest_devbox.guest.sweep import abandoned, claim_run_dir, sweep_leftovers
from pytest_devbox.host import owner
from pytest_devbox.host.layout import CacheLayout
from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import domain_xml
from pytest_devbox.virt.qemu_user import QemuIdentity

URI = "test:///default"
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (unshare, setpriv)")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def dead_token() -> str:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return owner.Owner(owner.scope(), proc.pid, 0).token


def guest(
    conn: libvirt.virConnect, overlay: Path, token: str, *, keep: bool = False, name: str = ""
) -> dom.Domain:
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.write_bytes(b"qcow2")
    spec = domain_xml.DomainSpec(
        name=name or f"devbox-owner-{uuid.uuid4().hex[:8]}",
        disk=overlay,
        code_dir=overlay.parent,
        share="9p",
        accel="tcg",
        console_log=overlay.with_suffix(".log"),
        memory_mib=128,
        vcpus=1,
        metadata={"owner": token, "overlay": str(overlay), "keep": "1" if keep else "0"},
    )
    return dom.Domain.create(conn, spec, autodestroy=False)


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = dom.connect(URI)
    before = {n for n, _ in dom.list_devbox_domains(c)}
    yield c
    for name, _ in dom.list_devbox_domains(c):
        if name not in before:
            c.lookupByName(name).destroy()
    c.close()


def in_other_pid_namespace(script: str) -> subprocess.Popen[str]:
    """`script` (python) run in a PID namespace of its own, many pids deep."""
    code = "for i in $(seq 300); do /bin/true; done; " + sys.executable + ' -c "$0"'
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", code, script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


# --- finding 6: owner identity --------------------------------------------------------


def test_owner_6_a_dead_or_reused_pid_of_ours_is_dead_anything_else_alive() -> None:
    assert not owner.provably_dead(owner.me().token)
    assert owner.provably_dead(dead_token())
    me = owner.me()
    assert owner.provably_dead(owner.Owner(me.scope, me.pid, me.start + 1).token)  # reused
    assert not owner.provably_dead(owner.Owner("0123456789ab", 999999, 0).token)  # elsewhere
    assert not owner.provably_dead("garbage") and not owner.provably_dead("")


@ROOT_ONLY
def test_owner_6_a_guest_of_another_pid_namespace_is_not_swept(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    # A CI container sharing our libvirtd and hostname: its pid means nothing here.
    proc = in_other_pid_namespace(
        "import os,sys;from pytest_devbox.host import owner;"
        "print(os.getpid(), owner.me().token, flush=True);sys.stdin.read()"
    )
    try:
        assert proc.stdout is not None
        pid, token = proc.stdout.readline().split()
        d = guest(conn, tmp_path / "run" / "r1" / "g.qcow2", token)
        assert not owner.provably_dead(token)
        sweep_leftovers(URI, tmp_path)
        assert d.is_running()  # before: destroyed when its in-namespace pid was free here
        assert (tmp_path / "run" / "r1" / "g.qcow2").exists()
    finally:
        proc.communicate("")
    assert int(pid) > 1


@ROOT_ONLY
def test_owner_6_a_run_dir_is_swept_only_once_its_owner_lets_go_of_its_lock(
    tmp_path: Path,
) -> None:
    # The owner runs in another PID namespace (its token is not provable here); its
    # lock on the run dir is, whatever the namespace.
    proc = in_other_pid_namespace(
        "import sys;from pathlib import Path;from pytest_devbox.guest.sweep import "
        f"claim_run_dir;print(claim_run_dir(Path({str(tmp_path)!r}), 'rns'), flush=True);"
        "sys.stdin.read()"
    )
    assert proc.stdout is not None
    rdir = Path(proc.stdout.readline().strip())
    try:
        assert not abandoned(rdir)
        assert sweep_leftovers(URI, tmp_path) == [] and rdir.is_dir()
    finally:
        proc.communicate("")
    assert abandoned(rdir)
    assert sweep_leftovers(URI, tmp_path) == [f"removed leftover run directory {rdir}"]


def test_owner_6_an_old_owner_file_of_host_and_pid_proves_nothing(tmp_path: Path) -> None:
    rdir = CacheLayout(tmp_path).run("rold")
    rdir.mkdir(parents=True)
    (rdir / "owner").write_text("999999\nsomehost\n")  # (pid, host): maybe another container's
    assert not abandoned(rdir)


def test_owner_6_slot_leftover_of_a_live_owner_is_never_destroyed(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    job = restore.RestoreJob(
        profile=BUILTIN_PROFILES["debian-12"],
        share="9p",
        virconn=conn,
        image=None,  # type: ignore[arg-type]  # not used by _clear_leftover
        cache_root=tmp_path,
        workdir=tmp_path,
        make_spec=None,  # type: ignore[arg-type]
        timeout=1.0,
        connection=None,  # type: ignore[arg-type]
        tail=lambda _p, _n: "",
        log=lambda _line: None,
    )
    # Another job restored the same (copied) cache: same slot name, owner alive.
    live = guest(conn, tmp_path / "a.qcow2", owner.me().token, name="devbox-d-s0-abc-1")
    with pytest.raises(restore.SlotBusy, match="may be alive"):
        restore._clear_leftover(job, live.name)
    assert live.is_running()  # before: destroyed by the second job
    live.destroy()
    dead = guest(conn, tmp_path / "b.qcow2", dead_token(), name="devbox-d-s0-abc-1")
    restore._clear_leftover(job, dead.name)
    assert not dead.is_running()


# --- finding 4: kept guests' run dirs, every URI ---------------------------------------


def test_kept_4_a_kept_guest_at_another_uri_keeps_its_run_dir(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    other = tmp_path / "node.xml"
    other.write_text("<node/>\n")
    other_uri = f"test://{other}"
    rdir = CacheLayout(tmp_path).run("rkept")
    rdir.mkdir(parents=True)
    (rdir / "owner").write_text(f"1\nh\n{dead_token()}\n")  # its session ended
    kept = guest(conn, rdir / "g.qcow2", dead_token(), keep=True)
    # Pool._sweep_once: every URI of the session in one sweep.
    assert sweep_leftovers([other_uri, URI], tmp_path) == []
    assert (rdir / "g.qcow2").exists()  # before: removed by the other URI's sweep
    # A kept record's URI counts even for a sweep of another URI alone (devbox up).
    record = {"name": kept.name, "uri": URI, "overlay": str(rdir / "g.qcow2")}
    CacheLayout(tmp_path).kept.mkdir()
    (CacheLayout(tmp_path).kept / f"{kept.name}.json").write_text(json.dumps(record))
    assert sweep_leftovers(other_uri, tmp_path) == []
    assert (rdir / "g.qcow2").exists()


# --- finding 7: another user's overlay --------------------------------------------------


@ROOT_ONLY
def test_sweep_7_another_users_overlay_is_reported_not_raised(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        alice = base / "alice-run"
        alice.mkdir()
        (alice / "g.qcow2").write_bytes(b"x")  # root's, in root's dir: nobody cannot unlink
        cache = base / "bob"
        cache.mkdir()
        os.chown(cache, 65534, 65534)
        script = textwrap.dedent(f"""
            import json, sys
            from pathlib import Path
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_owner_identity import dead_token, guest
            from pytest_devbox.guest.sweep import sweep_leftovers
            from pytest_devbox.virt import domain as dom
            conn = dom.connect("test:///default")
            d = guest(conn, Path({str(cache)!r}) / "x.qcow2", dead_token(), name="devbox-alice-1")
            # the overlay the metadata names is alice's (the file above)
            meta = {{"owner": dead_token(), "overlay": {str(alice / "g.qcow2")!r}, "keep": "0"}}
            d.set_metadata(meta)
            print(json.dumps(sweep_leftovers("test:///default", Path({str(cache)!r}))))
        """)
        out = subprocess.run(
            [*NOBODY, sys.executable, "-c", script], capture_output=True, text=True, cwd="/"
        )
        assert out.returncode == 0, out.stderr  # before: PermissionError escaped
        lines = json.loads(out.stdout)
        assert any("could not remove" in line and "Permission denied" in line for line in lines)
        assert (alice / "g.qcow2").exists()
    finally:
        shutil.rmtree(base)


# --- finding 10: slots heal, and know the host ------------------------------------------


def _valid_slot(tmp_path: Path) -> tuple[SaveCache, Lease]:
    saves = SaveCache(tmp_path)
    lease = saves.lease("d", "0123456789abcdef")
    assert lease is not None

    def fill(state: Path, disk: Path) -> None:
        state.write_bytes(b"state")
        disk.write_bytes(b"disk")

    saves.install(lease, fill)
    assert saves.valid(lease.slot)
    return saves, lease


def _job(tmp_path: Path, log: list[str]) -> restore.RestoreJob:
    return restore.RestoreJob(
        BUILTIN_PROFILES["debian-12"], "9p", None, None, tmp_path, tmp_path,  # type: ignore[arg-type]
        None, 1.0, None, lambda _p, _n: "", log.append,  # type: ignore[arg-type]
    )  # fmt: skip


def test_slots_10_a_failed_restore_invalidates_its_slot(tmp_path: Path) -> None:
    saves, lease = _valid_slot(tmp_path)
    log: list[str] = []
    restore._after_failure(_job(tmp_path, log), saves, lease, restore.SlotBusy("busy"))
    assert saves.valid(lease.slot)  # a busy name is no fault of the slot's
    restore._after_failure(_job(tmp_path, log), saves, lease, DomainError("cannot load"))
    assert not saves.valid(lease.slot)  # before: valid forever, every session boots
    assert any("rebuilt next time" in line for line in log)


def test_slots_10_the_save_key_knows_the_host_cpu_and_kernel() -> None:
    fingerprint = json.loads(host_fingerprint("<capabilities><host><cpu>X</cpu></host>"
                                              "</capabilities>"))  # fmt: skip
    assert fingerprint["kernel"] == os.uname().release
    assert fingerprint["libvirt_cpu"] == "<cpu>X</cpu>"
    if Path("/proc/cpuinfo").read_text().count("flags"):
        assert fingerprint["cpu"]["flags"]


# --- finding 9: the reseed is proven or the slot refused --------------------------------


def _run_reseed(tmp_path: Path, kernel: str, python: bool) -> str:
    """The reseed part of freshen_command in a shell whose PATH has only what we give."""
    bin_ = tmp_path / f"bin-{kernel}-{python}"
    bin_.mkdir()
    for tool in ("tr", "ls", "grep"):
        (bin_ / tool).symlink_to(shutil.which(tool) or tool)
    (bin_ / "uname").write_text(f"#!/bin/sh\necho {kernel}\n")
    (bin_ / "uname").chmod(0o755)
    if python:
        (bin_ / "python3").symlink_to(sys.executable)
    out = subprocess.run(
        ["/bin/sh", "-c", restore._RESEED_SH],
        input=restore.new_seed(),
        capture_output=True,
        text=True,
        env={"PATH": str(bin_)},
    )
    return out.stdout.strip()


def test_reseed_9_outcome_is_reported_and_seed_not_in_the_command(tmp_path: Path) -> None:
    seed = restore.new_seed()
    assert seed.strip() not in restore.freshen_command()  # it goes on stdin
    assert _run_reseed(tmp_path, "4.15.0-20-generic", python=False) == "reseed=none"
    vmgenid = Path("/sys/bus/acpi/drivers/vmgenid")
    if not (vmgenid.is_dir() and any(":" in p.name for p in vmgenid.iterdir())):
        assert _run_reseed(tmp_path, "6.1.0-9-amd64", python=False) == "reseed=none"
    if os.geteuid() == 0:  # the ioctls need CAP_SYS_ADMIN, as root in a guest has
        assert _run_reseed(tmp_path, "6.1.0-9-amd64", python=True) == "reseed=ioctl"


def test_reseed_9_an_unseeded_slot_is_refused_for_good(tmp_path: Path) -> None:
    saves, lease = _valid_slot(tmp_path)
    log: list[str] = []
    restore._after_failure(_job(tmp_path, log), saves, lease, restore.Unseeded("no reseed"))
    assert saves.valid(lease.slot) and saves.refused(lease.slot) == "no reseed"
    assert any("restore refused" in line for line in log)


# --- finding 19: leases across threads --------------------------------------------------


def test_lease_19_taken_in_a_thread_released_from_another(tmp_path: Path) -> None:
    saves = SaveCache(tmp_path, max_slots=1)
    taken: list[Lease | None] = []
    t = threading.Thread(target=lambda: taken.append(saves.lease("d", "0123456789abcdef")))
    t.start()
    t.join()
    assert taken[0] is not None
    taken[0].release()  # from the main thread
    again = saves.lease("d", "0123456789abcdef")
    assert again is not None  # before: still flocked by the thread's fd
    again.release()


# --- findings 20, 21: the reaper --------------------------------------------------------


def test_reaper_20_starts_in_a_project_with_its_own_signal_py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "signal.py").write_text("raise SystemExit('the project shadowed signal')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    reaper = Reaper(URI)  # before: "the reaper process ... did not start"
    reaper.stop()
    assert reaper._proc.returncode == 0


def test_reaper_21_spares_a_guest_kept_meanwhile(conn: libvirt.virConnect, tmp_path: Path) -> None:
    token = owner.me().token
    kept = guest(conn, tmp_path / "k.qcow2", token, keep=True)
    ended = guest(conn, tmp_path / "e.qcow2", token)
    assert reap(conn, token, {kept.name, ended.name}) == [ended.name]
    assert kept.is_running() and (tmp_path / "k.qcow2").exists()
    assert not (tmp_path / "e.qcow2").exists()


def test_reaper_21_says_when_it_cannot_connect(tmp_path: Path) -> None:
    log = tmp_path / "reaper.log"
    reaper = Reaper(f"test://{tmp_path}/missing.xml", log)
    reaper.watch("devbox-x-s0-1")
    reaper.stop()
    assert reaper._proc.returncode == 1
    assert "cannot connect" in log.read_text() and "devbox-x-s0-1" in log.read_text()
    assert "Traceback" not in log.read_text()


# --- finding 13: QEMU as libvirt's user reaches the run dir ----------------------------


@ROOT_ONLY
def test_qemu_user_13_run_dir_searchable_and_hint_names_stable_dirs() -> None:
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        cache = base / "cache"
        cache.mkdir()
        rdir = claim_run_dir(cache, "r13")
        assert rdir.stat().st_mode & 0o777 == 0o700  # mkdtemp's
        overlay = rdir / "g.qcow2"
        overlay.write_bytes(b"x")
        overlay.chmod(0o644)
        qemu = QemuIdentity(65534, 65534, label=None)  # libvirt's user, not us
        assert qemu.reach_problem([overlay], own=[rdir]) is None
        read = subprocess.run([*NOBODY, "cat", str(overlay)], capture_output=True)
        assert read.returncode == 0, read.stderr  # before: the run dir stopped it
        cache.chmod(0o700)  # a private parent: the hint names it, not the run dir
        problem = qemu.reach_problem([overlay], own=[rdir])
        assert problem is not None
        assert f"setfacl -m u:nobody:x {cache}" in problem[1] and "r13" not in problem[1]
    finally:
        shutil.rmtree(base)
