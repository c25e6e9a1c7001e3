"""scripts/setup-host on the hosts users have (fast tier: `--list` reads an os-release
file of ours and changes nothing; an unknown host stops before anything).

Each name below is pinned against the source it was checked in. Debian 12 is this
machine (apt); Debian 13 is checked for real by scripts/host-test, whose mmdebstrap root
is built from this very list (an unknown name fails the build) and runs setup-host.
Ubuntu and Fedora cannot run here; their sources:

- [mkosi] github.com/systemd/mkosi @70ce10d1 (2026-07), mkosi/resources/mkosi-tools/
  mkosi.profiles/runtime/mkosi.conf.d/: debian-kali-ubuntu/mkosi.conf (ovmf,
  openssh-client), debian-kali-ubuntu/mkosi.conf.d/virtiofsd.conf (virtiofsd on Debian
  but bullseye/bookworm, Ubuntu but jammy), azure-centos-fedora/ (virtiofsd,
  openssh-clients, edk2-ovmf); mkosi.conf.d/debian-kali-ubuntu/mkosi.conf
  (openssh-server); mkosi-tools/mkosi.conf.d/debian.conf (debian-archive-keyring on
  Ubuntu); mkosi-vm/.../kernel-generic.conf (linux-image-generic on Ubuntu).
- [lcitool] github.com/libvirt/libvirt-ci @aaac0e47, lcitool/facts/mappings.yml: the deb
  and rpm names libvirt's own CI installs on every target (ubuntu-2404; ubuntu-2204 until
  0b468fe8 "Drop Ubuntu 22.04", 2026-04, whose parent has no 22.04 override for these):
  libvirt-dev/libvirt-devel, qemu-utils, python3-venv, python3-dev, pkgconf, gcc,
  xz-utils, sudo, openssh-client, libguestfs-tools.
- [cockpit] github.com/cockpit-project/bots @a3fa706c, images/scripts/debian.setup (run
  for its ubuntu-2204/2404 images, see 919535187^): libvirt-daemon-system, virtiofsd
  dropped on ubuntu-2204 ("older libvirt have this builtin"), `systemctl restart
  libvirtd`; images/scripts/fedora.setup: libvirt-daemon-driver-qemu,
  libvirt-daemon-driver-storage-core, libvirt-client, qemu-kvm-core, virtiofsd.
- [ubuntu-pages] manpages.ubuntu.com: jammy virt-builder "Provided by:
  guestfs-tools_1.46.1-4ubuntu2", noble guestfish "guestfish_1.52.0-5ubuntu3", jammy and
  noble virsh "libvirt-clients_8.0.0-1ubuntu7.13" / "_10.0.0-2ubuntu8.9";
  packages.ubuntu.com: mmdebstrap (universe) and qemu-system-x86 in jammy and noble.
- [fedora-specs] github.com/major/fedora-rpm-specs @10e71f1b (2026-08-22, Fedora's dist-git
  specs): libvirt.spec 12.6.0 (with_modular_daemons on every Fedora; subpackages
  daemon-driver-qemu, daemon-driver-storage-core, daemon-proxy, client, devel; units
  virtqemud{,-ro,-admin}.socket, virtlogd.socket, virtstoraged.socket,
  virtproxyd.socket), qemu.spec (kvm-core, -n qemu-img), virtiofsd.spec 1.14.0,
  edk2.spec (ovmf), guestfs-tools.spec (virt-builder), libguestfs.spec (guestfish is in
  libguestfs), pkgconf.spec (pkg-config), openssh.spec (clients, server), kernel.spec
  (kernel-core), python3.14.spec (pkgname python3: python3-devel); no mmdebstrap.spec.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

Proc = subprocess.CompletedProcess[str]
SETUP_HOST = Path(__file__).resolve().parents[1] / "scripts" / "setup-host"


def names(text: str) -> list[str]:
    return text.split()


OS_RELEASE = {
    "debian-12": 'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n',
    "debian-13": 'ID=debian\nVERSION_ID="13"\nPRETTY_NAME="Debian GNU/Linux 13 (trixie)"\n',
    "ubuntu-22.04": 'ID=ubuntu\nID_LIKE=debian\nVERSION_ID="22.04"\nPRETTY_NAME="Ubuntu 22.04"\n',
    "ubuntu-24.04": 'ID=ubuntu\nID_LIKE=debian\nVERSION_ID="24.04"\nPRETTY_NAME="Ubuntu 24.04"\n',
    "fedora": 'ID=fedora\nVERSION_ID=43\nPRETTY_NAME="Fedora Linux 43 (Workstation Edition)"\n',
}

# Debian and Ubuntu alike (same package sources): this machine's apt for Debian 12, the
# root for 13; Ubuntu: libvirt-daemon-system [cockpit], libvirt-clients [ubuntu-pages],
# qemu-system-x86 [ubuntu-pages], qemu-utils [lcitool], ovmf [mkosi], guestfs-tools
# [ubuntu-pages], libguestfs-tools [lcitool] (guestfish and guestmount), mmdebstrap
# [ubuntu-pages], xz-utils [lcitool], openssh-client [lcitool, mkosi], openssh-server
# [mkosi], sudo, python3-venv, python3-dev, libvirt-dev, pkgconf, gcc [lcitool]; gpg:
# virt-builder will not start without it ("no GNU Privacy Guard (GnuPG, gpg) binary was
# found", seen in the Debian 13 root), guestfs-tools only Recommends gnupg
# (`apt-cache show guestfs-tools`), and setup-host installs no recommends. Fedora's
# guestfs-tools.spec has "Requires: gnupg2" [fedora-specs].
APT = names("""
    libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils ovmf
    guestfs-tools libguestfs-tools gpg mmdebstrap xz-utils openssh-client openssh-server sudo
    python3-venv python3-dev libvirt-dev pkgconf gcc
""")
# libvirtd and virtlogd by their sockets: the units libvirt-daemon-system enables
# (Debian 13 root: /etc/systemd/system/sockets.target.wants), monolithic on Ubuntu too
# [cockpit].
APT_UNITS = ["libvirtd.socket", "virtlogd.socket"]

FEDORA = names("""
    libvirt-daemon-driver-qemu libvirt-daemon-driver-storage-core libvirt-daemon-proxy
    libvirt-client qemu-kvm-core qemu-img virtiofsd edk2-ovmf guestfs-tools libguestfs xz
    openssh-clients openssh-server sudo python3-devel libvirt-devel pkgconf-pkg-config gcc
""")
FEDORA_UNITS = names("""
    virtqemud.socket virtqemud-ro.socket virtqemud-admin.socket virtlogd.socket
    virtstoraged.socket virtproxyd.socket
""")

EXPECTED = {
    # The C virtiofsd comes with qemu-system-common (/usr/lib/qemu/virtiofsd here); no
    # virtiofsd package in bookworm (`apt-cache policy virtiofsd` is empty; [mkosi]).
    "debian-12": ("apt", APT, "linux-image-amd64", APT_UNITS),
    # The Rust virtiofsd is its own package (1.13.2 in the root).
    "debian-13": ("apt", [*APT, "virtiofsd"], "linux-image-amd64", APT_UNITS),
    # QEMU 6.2 still has the C virtiofsd [cockpit, mkosi]; Debian's keyring for
    # mmdebstrap's Debian templates [mkosi].
    "ubuntu-22.04": ("apt", [*APT, "debian-archive-keyring"], "linux-image-generic", APT_UNITS),
    "ubuntu-24.04": (
        "apt",
        [*APT, "virtiofsd", "debian-archive-keyring"],
        "linux-image-generic",
        APT_UNITS,
    ),
    # All [fedora-specs]; cross-checked in [cockpit] fedora.setup and [mkosi].
    "fedora": ("dnf", FEDORA, "kernel-core", FEDORA_UNITS),
}


def setup_host(tmp_path: Path, os_release: str, *args: str, **env: str) -> Proc:
    path = tmp_path / "os-release"
    path.write_text(os_release)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SETUP_HOST_")}
    environ.update(SETUP_HOST_OS_RELEASE=str(path), **env)
    return subprocess.run(
        [str(SETUP_HOST), *args], env=environ, capture_output=True, text=True, timeout=30
    )


def listed(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines())


@pytest.mark.parametrize("host", list(EXPECTED))
def test_each_host_gets_its_packages_and_units(tmp_path: Path, host: str) -> None:
    family, packages, kernel, units = EXPECTED[host]
    proc = setup_host(tmp_path, OS_RELEASE[host], "--list")
    assert proc.returncode == 0, proc.stderr
    seen = listed(proc.stdout)
    assert seen["host"] == f"{host} ({family})"
    assert seen["packages"].split() == packages
    assert seen["kernel package (where /boot has no kernel)"] == kernel
    assert seen["systemd units"].split() == units


def test_without_systemd_fedora_starts_virtqemud_and_debian_libvirtd(tmp_path: Path) -> None:
    fedora = listed(setup_host(tmp_path, OS_RELEASE["fedora"], "--list").stdout)
    assert fedora["without systemd"] == "virtqemud -d (socket /run/libvirt/virtqemud-sock)"
    debian = listed(setup_host(tmp_path, OS_RELEASE["debian-13"], "--list").stdout)
    assert debian["without systemd"] == "libvirtd -d (socket /run/libvirt/libvirt-sock)"


def test_an_unknown_host_lists_the_tools_and_fails(tmp_path: Path) -> None:
    # Not --list: the real run, which must stop before installing or starting anything.
    proc = setup_host(tmp_path, 'ID=arch\nPRETTY_NAME="Arch Linux"\n')
    assert proc.returncode == 1
    assert "Arch Linux (arch) is not a host this script knows" in proc.stdout
    for tool in ("libvirt", "qemu-img", "virtiofsd", "OVMF", "virt-builder", "mmdebstrap"):
        assert tool in proc.stdout
    assert "SETUP_HOST_AS" not in proc.stdout  # it claims no likeness


@pytest.mark.parametrize("version", ["11", "14", ""])
def test_other_debian_releases_are_unknown(tmp_path: Path, version: str) -> None:
    proc = setup_host(tmp_path, f'ID=debian\nVERSION_ID="{version}"\n', "--list")
    assert proc.returncode == 1
    assert "is not a host this script knows" in proc.stdout


def test_a_derivative_is_told_how_to_pass_as_its_base(tmp_path: Path) -> None:
    mint = 'ID=linuxmint\nID_LIKE="ubuntu debian"\nVERSION_ID="22"\nPRETTY_NAME="Linux Mint 22"\n'
    proc = setup_host(tmp_path, mint, "--list")
    assert proc.returncode == 1
    assert "It says it is like ubuntu debian" in proc.stdout
    assert "SETUP_HOST_AS=" in proc.stdout
    passed = setup_host(tmp_path, mint, "--list", SETUP_HOST_AS="ubuntu-24.04")
    assert passed.returncode == 0, passed.stdout
    assert listed(passed.stdout)["host"] == "ubuntu-24.04 (apt)"
    fedora = setup_host(tmp_path, mint, "--list", SETUP_HOST_AS="fedora")
    assert listed(fedora.stdout)["host"] == "fedora (dnf)"


def test_this_host_is_debian_12_and_has_every_package(tmp_path: Path) -> None:
    """The Debian 12 names are the packages this machine runs on (dpkg)."""
    osr = Path("/etc/os-release").read_text()
    if 'VERSION_ID="12"' not in osr or "ID=debian" not in osr:
        pytest.skip("this host is not Debian 12")
    proc = subprocess.run([str(SETUP_HOST), "--list"], capture_output=True, text=True, timeout=30)
    packages = listed(proc.stdout)["packages"].split()
    query = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Status}\\n", *packages],
        capture_output=True, text=True,
    )  # fmt: skip
    known = {line.split()[0] for line in query.stdout.splitlines()}
    # ovmf is new on the list: known to apt (a candidate), installed by the next run.
    missing = [p for p in packages if p not in known]
    policy = subprocess.run(["apt-cache", "policy", *missing], capture_output=True, text=True)
    for p in missing:
        assert f"{p}:\n  Installed:" in policy.stdout, f"{p} is no package of this host"
