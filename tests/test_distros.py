"""Profiles: built-ins, user profiles from pyproject.toml / devbox.toml, selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_devbox.config.profiles import BUILTIN_PROFILES, Profile, load_profiles, select
from pytest_devbox.errors import ProfileError, UnknownDistro

# DESIGN.md's six lines for CentOS 7, as the design wrote them.
CENTOS7_DESIGN_LINES = (
    "run-command yum-config-manager --enable centosplus",
    'run-command sed -ie "s/DEFAULTKERNEL=kernel/DEFAULTKERNEL=kernel-plus/" /etc/sysconfig/kernel',
    "append-line /etc/dracut.conf.d/virtio.conf:"
    'add_drivers+="virtio_scsi virtio_pci virtio_console"',
    "append-line /etc/modules-load.d/9pnet_virtio.conf:9pnet_virtio",
    "install kernel-plus",
    "append-line /etc/fstab:/code /code 9p trans=virtio 0 0",
)
# The same six, fixed on paper against their sources (issue 9), plus yum-utils first.
CENTOS7_LINES = (
    "install yum-utils",
    "run-command yum-config-manager --enable centosplus",
    "run-command sed -i -e 's/^DEFAULTKERNEL=kernel$/DEFAULTKERNEL=kernel-plus/'"
    " /etc/sysconfig/kernel",
    "append-line /etc/dracut.conf.d/virtio.conf:"
    'add_drivers+=" virtio_blk virtio_scsi virtio_pci virtio_console "',
    "append-line /etc/modules-load.d/9pnet_virtio.conf:9pnet_virtio",
    "install kernel-plus",
    "append-line /etc/fstab:/code /code 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0",
)


def test_centos7_points_yum_at_its_own_vault_release_then_runs_the_fixed_design_recipe() -> None:
    p = BUILTIN_PROFILES["centos-7"]
    assert (p.template, p.share) == ("centos-7.8", "9p")
    assert p.customize[-len(CENTOS7_LINES) :] == CENTOS7_LINES

    # Each design line is still there, in order, by its operation and target.
    def shape(line: str) -> tuple[str, str]:
        op, arg = line.split()[:2]
        return op, arg.split(":")[0]

    assert [shape(c) for c in p.customize[-6:]] == [shape(c) for c in CENTOS7_DESIGN_LINES]
    assert not any("sed -ie" in c for c in p.customize)  # -ie = backup suffix "e"
    vault = p.customize[0]
    assert "#mirrorlist=" in vault and "baseurl=http://vault.centos.org/7.8.2003/" in vault
    assert vault.startswith("run-command sed -i -e ")
    assert p.needs_network and p.relabels


def test_centos8_uses_its_own_vault_release_and_virtiofs_without_network() -> None:
    p = BUILTIN_PROFILES["centos-8"]
    assert (p.template, p.share) == ("centos-8.2", "virtiofs")
    assert "baseurl=http://vault.centos.org/8.2.2004/" in p.customize[0]
    assert "#mirrorlist=" in p.customize[0]
    # No /code line of its own: the recipe derives it from the share (issue 8, defect 5).
    assert not any("/etc/fstab" in c for c in p.customize)
    assert not p.needs_network and p.relabels


def test_selinux_templates_relabel_and_the_field_overrides_the_family(tmp_path: Path) -> None:
    relabel = {n for n, p in BUILTIN_PROFILES.items() if p.relabels}
    assert relabel == {
        "centos-7",
        "centos-8",
        "centosstream-8",
        "fedora-40",
        "fedora-41",
        "fedora-42",
        "debian-12-selinux",
        # The vendor images of the Red Hat family: enforcing (config/catalogue.py).
        *(f"{d}-{v}" for d in ("rocky", "almalinux") for v in (8, 9, 10)),
        "centos-stream-9",
        "centos-stream-10",
        "fedora-43",
        "fedora-44",
    }
    assert Profile("r", "rocky-9").relabels and not Profile("u", "ubuntu-22.04").relabels
    write(
        tmp_path / "devbox.toml",
        '[distros.mine]\ntemplate = "my-debian"\nselinux = true\n'
        '[distros.f]\nextends = "fedora-42"\nselinux = false\n',
    )
    profiles = load_profiles(tmp_path)
    assert profiles["mine"].relabels and not profiles["f"].relabels
    write(tmp_path / "devbox.toml", '[distros.bad]\ntemplate = "x"\nselinux = "yes"\n')
    with pytest.raises(ProfileError, match="'selinux' must be true or false"):
        load_profiles(tmp_path)


def test_debian12_selinux_is_the_local_enforcing_variant() -> None:
    p = BUILTIN_PROFILES["debian-12-selinux"]
    assert (p.template, p.share, p.selinux) == ("debian-12-selinux", "virtiofs", True)
    assert not p.needs_network
    assert p.customize == ()  # the template teaches its policy virtiofs: the plain line


@pytest.mark.parametrize(
    ("name", "share"),
    [
        ("debian-10", "9p"),
        ("debian-11", "virtiofs"),
        ("debian-12", "virtiofs"),
        ("debian-13", "virtiofs"),
        ("ubuntu-18.04", "9p"),
        ("ubuntu-20.04", "virtiofs"),
        ("fedora-42", "virtiofs"),
        ("centos-stream-9", "virtiofs"),
    ],
)
def test_share_follows_the_guest_kernel(name: str, share: str) -> None:
    p = BUILTIN_PROFILES[name]
    assert p.share == share
    assert p.template == name
    assert not p.needs_network


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("install gcc", True),
        ("update", True),
        ("uninstall nano", True),
        ("firstboot-install foo", True),
        ("run-command yum -y install make", True),
        ("run-command dnf install -y make", True),
        ("run-command apt-get update && apt-get install -y make", True),
        ("run-command /usr/bin/apt install make", True),
        ("run-command yum-config-manager --enable centosplus", False),
        ("run-command echo yummy", False),
        ("append-line /etc/fstab:/code /code 9p trans=virtio 0 0", False),
        ("mkdir /opt/apt", False),
    ],
)
def test_needs_network(line: str, expected: bool) -> None:
    assert Profile("x", "debian-12", customize=(line,)).needs_network is expected


def test_no_project_dir_gives_the_builtins() -> None:
    assert load_profiles(None) == dict(BUILTIN_PROFILES)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_user_profiles_from_pyproject_with_extends_chain(tmp_path: Path) -> None:
    write(
        tmp_path / "pyproject.toml",
        """
[project]
name = "x"

[tool.pytest-devbox.distros.debian-12-9p]
extends = "debian-12"
share = "9p"

[tool.pytest-devbox.distros.big]
extends = "debian-12-9p"
memory_mib = 4096
vcpus = 4
disk_size = "8G"
customize = ["install make"]

[tool.pytest-devbox.distros.alma]
template = "alma-9"
repos = ["https://example.org/index.asc"]
""",
    )
    profiles = load_profiles(tmp_path)
    assert set(BUILTIN_PROFILES) <= set(profiles)
    assert profiles["debian-12-9p"] == Profile(
        "debian-12-9p", "debian-12", share="9p", extends="debian-12", eol="2028-06-30"
    )
    big = profiles["big"]
    assert (big.template, big.share, big.memory_mib, big.vcpus, big.disk_size) == (
        "debian-12",
        "9p",
        4096,
        4,
        "8G",
    )
    assert big.customize == ("install make",) and big.needs_network
    assert profiles["alma"] == Profile("alma", "alma-9", repos=("https://example.org/index.asc",))


def test_devbox_toml_and_overriding_a_builtin_by_name(tmp_path: Path) -> None:
    write(tmp_path / "devbox.toml", "[distros.debian-12]\nmemory_mib = 2048\n")
    p = load_profiles(tmp_path)["debian-12"]
    assert p == Profile("debian-12", "debian-12", memory_mib=2048, eol="2028-06-30")


def test_a_user_profile_may_extend_a_builtin_of_its_own_name(tmp_path: Path) -> None:
    write(tmp_path / "devbox.toml", '[distros.centos-7]\nextends = "centos-7"\nvcpus = 1\n')
    p = load_profiles(tmp_path)["centos-7"]
    assert p.customize == BUILTIN_PROFILES["centos-7"].customize and p.vcpus == 1


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        (
            '[distros.x]\nextends = "debian-12"\nmemory = 3',
            ["'x'", "unknown field 'memory'", "memory_mib", "vcpus"],
        ),
        (
            '[distros.x]\nextends = "debian-12"\nmemory_mib = "lots"',
            ["'x'", "'memory_mib'", "positive integer", "'lots'"],
        ),
        ('[distros.x]\nextends = "debian-12"\nvcpus = true', ["'vcpus'", "positive integer"]),
        ('[distros.x]\nextends = "debian-12"\nvcpus = 0', ["'vcpus'", "positive integer"]),
        (
            '[distros.x]\nextends = "debian-12"\nshare = "nfs"',
            ["'share'", "'virtiofs'", "'9p'", "'nfs'"],
        ),
        (
            '[distros.x]\nextends = "debian-12"\ncustomize = "install make"',
            ["'customize'", "list of strings"],
        ),
        ('[distros.x]\nextends = "debian-12"\ndisk_size = "big"', ["'disk_size'", '"8G"']),
        (
            '[distros.x]\nextends = "debian-99"',
            ["'x'", "'extends'", "'debian-99'", "known profiles:", "centos-7, centos-8"],
        ),
        ("[distros.x]\nvcpus = 1", ["'x'", "'template'", "required", "extends"]),
        (
            '[distros.a]\nextends = "b"\n[distros.b]\nextends = "c"\n[distros.c]\nextends = "a"',
            ["cycle", "->"],
        ),
        ('[distros.a]\nextends = "a"', ["cycle", "a -> a"]),
        ('[distros."bad name"]\ntemplate = "x"', ["'bad name'", "letters, digits"]),
        ("[distros.x\n", ["not valid TOML"]),
    ],
)
def test_profile_errors_name_file_profile_field_and_allowed_values(
    tmp_path: Path, body: str, needles: list[str]
) -> None:
    path = write(tmp_path / "devbox.toml", body)
    with pytest.raises(ProfileError) as e:
        load_profiles(tmp_path)
    msg = str(e.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg


def test_same_profile_in_both_files_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[tool.pytest-devbox.distros.x]\ntemplate = "debian-12"\n')
    write(tmp_path / "devbox.toml", '[distros.x]\ntemplate = "debian-11"\n')
    with pytest.raises(ProfileError, match=r"also defined in .*pyproject\.toml"):
        load_profiles(tmp_path)


def test_select_keeps_order_dedupes_and_expands_all() -> None:
    profiles = dict(BUILTIN_PROFILES)
    got = select(["debian-12", "centos-7", "debian-12", " centos-7 ", ""], profiles)
    assert [p.name for p in got] == ["debian-12", "centos-7"]
    everything = select(["centos-8", "all"], profiles)
    assert everything[0].name == "centos-8"
    assert sorted(p.name for p in everything) == sorted(profiles)


def test_select_unknown_lists_known_names_sorted() -> None:
    profiles = {n: BUILTIN_PROFILES[n] for n in ("debian-12", "centos-7")}
    with pytest.raises(UnknownDistro) as e:
        select(["debian-12", "windows-11"], profiles)
    assert "'windows-11'" in str(e.value)
    assert "known distros: centos-7, debian-12" in str(e.value)
