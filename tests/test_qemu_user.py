"""Who QEMU runs as, and whether that user reaches our files: real directories, real
ACLs (setfacl), libvirt's real capabilities format and its test driver."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_devbox.cli.doctor import qemu_user_check
from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import qemu_user

# What `virsh capabilities` says on a Debian workstation (qemu.conf user libvirt-qemu).
WORKSTATION_CAPS = """<capabilities><host>
  <secmodel><model>apparmor</model><doi>0</doi></secmodel>
  <secmodel><model>dac</model><doi>0</doi>
    <baselabel type='kvm'>+64055:+107</baselabel>
    <baselabel type='qemu'>+64055:+107</baselabel>
  </secmodel>
</host></capabilities>"""
OTHER = 64055  # a uid that is neither ours nor root's

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="makes directories owned by another user: needs root"
)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory every user can reach (pytest's own tmp_path sits below a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="devbox-reach-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def test_libvirts_qemu_user_comes_from_the_dac_base_label() -> None:
    assert qemu_user.default_identity(WORKSTATION_CAPS) == (64055, 107)
    assert qemu_user.default_identity("<capabilities><host/></capabilities>") is None


class _Caps:
    """A libvirt connection as far as identity() looks at it: its capabilities."""

    def __init__(self, xml: str) -> None:
        self.xml = xml

    def getCapabilities(self) -> str:
        return self.xml


def test_caller_policy_labels_the_domain_with_our_ids() -> None:
    who = qemu_user.identity(_Caps(WORKSTATION_CAPS), "qemu:///system", "caller")
    # Our group, or libvirt's QEMU group (107 here) when we are not in it.
    gid = os.getgid() if 107 in qemu_user.groups_of(os.getuid(), os.getgid()) else 107
    assert (who.uid, who.gid, who.label) == (os.getuid(), gid, (os.getuid(), gid))
    kept = qemu_user.identity(_Caps(WORKSTATION_CAPS), "qemu:///system", "libvirt")
    assert (kept.uid, kept.gid, kept.label) == (64055, 107, None)
    assert not kept.is_root
    # Our uid means nothing to a remote host's QEMU: no label there.
    remote = qemu_user.identity(_Caps(WORKSTATION_CAPS), "qemu+ssh://h/system", "caller")
    assert remote.label is None


def test_a_user_outside_libvirts_qemu_group_gets_it_as_the_labels_group() -> None:
    # libvirt's per-domain dir is libvirt-qemu:kvm 0750: a QEMU running as a user in
    # `libvirt` alone enters it only with kvm as its group (the workstation test boots so).
    member = next(
        (g for g in grp.getgrall() if any(_uid_of(m) is not None for m in g.gr_mem)), None
    )
    assert qemu_user.label_gid(OTHER, OTHER, 107) == 107  # no such user: in no group
    assert qemu_user.label_gid(OTHER, 107, 107) == 107  # it is their own group
    if member is not None:
        name = next(m for m in member.gr_mem if _uid_of(m) is not None)
        uid = _uid_of(name)
        assert uid is not None
        own = pwd.getpwuid(uid).pw_gid
        assert qemu_user.label_gid(uid, own, member.gr_gid) == own  # a member keeps theirs


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def test_test_driver_without_dac_model_is_taken_as_root() -> None:
    conn = dom.connect("test:///default")
    try:
        who = qemu_user.identity(conn, "test:///default", "caller")
    finally:
        conn.close()
    if os.geteuid() == 0:
        assert who.label is None and who.is_root
    else:
        assert who.label == (os.getuid(), os.getgid())


@needs_root
def test_a_private_home_blocks_another_user_and_names_the_directory(open_tmp: Path) -> None:
    home = open_tmp / "home"
    cache = home / ".cache" / "pytest-devbox"
    cache.mkdir(parents=True)
    os.chown(home, 1000, 1000)
    home.chmod(0o750)
    assert qemu_user.unreachable(cache, OTHER, 107) == home
    assert qemu_user.unreachable(cache, 1000, 1000) is None  # the owner gets in
    assert qemu_user.unreachable(cache, 0, 0) is None
    who = qemu_user.QemuIdentity(OTHER, 107, label=None)
    problem = who.reach_problem([cache])
    assert problem is not None and str(home) in problem[0] and "setfacl" in problem[1]


@needs_root
@pytest.mark.skipif(shutil.which("setfacl") is None, reason="needs setfacl (package acl)")
def test_a_search_acl_is_the_fix_doctor_names(open_tmp: Path) -> None:
    home = open_tmp / "home"
    home.mkdir()
    os.chown(home, 1000, 1000)
    home.chmod(0o750)
    assert qemu_user.unreachable(home / "code", OTHER, 107) == home
    subprocess.run(["setfacl", "-m", f"u:{OTHER}:x", str(home)], check=True)
    (home / "code").mkdir()
    assert qemu_user.unreachable(home / "code", OTHER, 107) is None
    subprocess.run(["setfacl", "-m", "m::-", str(home)], check=True)  # the mask wins
    assert qemu_user.unreachable(home / "code", OTHER, 107) == home


@needs_root
def test_group_membership_counts(open_tmp: Path) -> None:
    d = open_tmp / "grp"
    d.mkdir()
    os.chown(d, 1000, 107)
    d.chmod(0o710)
    assert qemu_user.unreachable(d / "x", OTHER, 107) is None
    assert qemu_user.unreachable(d / "x", OTHER, 5555) == d


def test_doctor_check_on_the_test_driver(tmp_path: Path) -> None:
    check = qemu_user_check("test:///default", [tmp_path], "caller")
    assert check.ok, check
