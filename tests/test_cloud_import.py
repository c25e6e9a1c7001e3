"""The parts of a cloud-image import that need no appliance: what virt-inspector says,
the partition to grow, the offline refusal, `devbox image import`'s checks. The import
itself (virt-inspector, virt-customize, a boot) is in tests/test_cloud_vm.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_devbox.config.profiles import Profile
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.image.cloud_import import expand_partition, parse_inspection
from pytest_devbox.image.download import DownloadError
from pytest_devbox.image.neutralise import NEUTRALISE_SCRIPT
from pytest_devbox.image.templates.repository import TemplateRepo

# virt-inspector 1.48 (Debian 12) on the tests' vendor-like Debian 13 image, trimmed.
INSPECTOR_XML = """<?xml version="1.0"?>
<operatingsystems>
  <operatingsystem>
    <root>/dev/sda1</root>
    <name>linux</name>
    <arch>x86_64</arch>
    <distro>debian</distro>
    <product_name>13.2</product_name>
    <major_version>13</major_version>
    <minor_version>2</minor_version>
    <package_format>deb</package_format>
    <package_management>apt</package_management>
    <hostname>localhost</hostname>
    <osinfo>debian13</osinfo>
  </operatingsystem>
</operatingsystems>
"""


def test_the_inspection_gives_root_distro_and_osinfo() -> None:
    found = parse_inspection(INSPECTOR_XML, "disk.qcow2")
    assert (found.root, found.distro, found.version, found.osinfo) == (
        "/dev/sda1",
        "debian",
        "13.2",
        "debian13",
    )


def test_an_image_without_an_os_is_a_clear_error() -> None:
    with pytest.raises(Exception, match="holds no operating system libguestfs recognises"):
        parse_inspection("<operatingsystems/>", "x.qcow2")


@pytest.mark.parametrize(
    ("root", "expand"),
    [("/dev/sda1", "/dev/sda1"), ("/dev/sda4", "/dev/sda4"), ("/dev/vda2", "/dev/sda2"),
     ("btrfsvol:/dev/sda5/root", "/dev/sda5"), ("/dev/rl/root", None),
     ("/dev/mapper/almalinux-root", None)],
)  # fmt: skip
def test_only_a_root_partition_is_grown(root: str, expand: str | None) -> None:
    assert expand_partition(root) == expand


def test_the_neutralisation_script_is_valid_sh(tmp_path: Path) -> None:
    script = tmp_path / "n.sh"
    script.write_text(NEUTRALISE_SCRIPT)
    subprocess.run(["sh", "-n", str(script)], check=True)
    for step in ("/etc/machine-id", "ssh_host_", "cloud-init.disabled", "netplan",
                 "NetworkManager", "systemd-networkd", "/etc/network/interfaces",
                 "ssh-keygen -A", "console=ttyS0"):  # fmt: skip
        assert step in NEUTRALISE_SCRIPT


def test_offline_a_cloud_profile_not_imported_names_the_way_in(tmp_path: Path) -> None:
    p = Profile(
        name="rocky-9",
        template="rocky-9",
        cloud_image="https://dl.rockylinux.org/pub/rocky/9/images/x86_64/Rocky-9.qcow2",
        checksum_url="CHECKSUM",
    )
    cache = ImageCache(tmp_path, public_index=False, offline=True, log=print)
    with pytest.raises(DownloadError) as e:
        cache.image_for(p)
    assert "needs a download from https://dl.rockylinux.org" in str(e.value)
    assert "`devbox image import FILE --distro rocky-9`" in str(e.value)
    assert TemplateRepo(tmp_path / "templates").entries() == {}


def _devbox(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_devbox.cli", *args, "--cache", str(project / "cache")],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_devbox_image_import_refuses_what_it_cannot_import(tmp_path: Path) -> None:
    (tmp_path / "devbox.toml").write_text(
        textwrap.dedent(
            """
            [distros.mine]
            cloud_image = "https://images.example.com/mine.qcow2"
            checksum = "sha256:0000000000000000000000000000000000000000000000000000000000000000"
            """
        )
    )
    image = tmp_path / "mine.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    r = _devbox(tmp_path, "image", "import", str(image), "--distro", "mine")
    assert r.returncode == 1, r.stderr
    assert "is not the image profile 'mine' pins: expected sha256:0000" in r.stderr
    assert "nothing was imported" in r.stderr and "Traceback" not in r.stderr
    r = _devbox(tmp_path, "image", "import", str(image), "--distro", "debian-12")
    assert r.returncode == 2 and "profile 'debian-12' has no cloud_image" in r.stderr
    r = _devbox(tmp_path, "image", "import", str(tmp_path / "nope.qcow2"), "--distro", "mine")
    assert r.returncode == 1 and "nope.qcow2: no such file" in r.stderr
    assert TemplateRepo(tmp_path / "cache" / "templates").entries() == {}


def test_a_cloud_images_kernel_is_not_guessed_to_have_9p() -> None:
    from pytest_devbox.config.code_ids import code_share

    url = "https://cloud.debian.org/images/cloud/trixie/latest/debian-13-genericcloud-amd64.qcow2"
    cloud = Profile(name="d13", template="debian-13", cloud_image=url, checksum_url="SHA512SUMS")
    assert code_share(cloud).share == "sync"  # its cloud kernel has no 9p
    assert code_share(Profile(name="d13", template="debian-13")).share == "9p"
