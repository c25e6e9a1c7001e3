"""[tool.pytest-devbox.hosts]: a session's distros spread over several libvirt hosts."""

from __future__ import annotations

from pathlib import Path

import pytest
from seeded_cache import TEST_URI

from pytest_devbox.config.profiles import BUILTIN_PROFILES, load_hosts
from pytest_devbox.config.settings import Settings
from pytest_devbox.errors import HostNotReady, ProfileError
from pytest_devbox.pool.pool import Pool

BAD_URI = "qemu:///system?socket=/nonexistent/libvirt-sock"


def _project(tmp_path: Path, table: str) -> Path:
    (tmp_path / "pyproject.toml").write_text(f"[tool.pytest-devbox.hosts]\n{table}\n")
    return tmp_path


def test_the_table_maps_distros_and_a_star(tmp_path: Path) -> None:
    hosts = load_hosts(
        _project(
            tmp_path, '"centos-7" = "qemu+ssh://ci@b2/system"\n"*" = "qemu+ssh://ci@b1/system"'
        )
    )
    s = Settings(uri="qemu:///system", hosts=hosts)
    assert s.uri_for("centos-7") == "qemu+ssh://ci@b2/system"
    assert s.uri_for("debian-12") == "qemu+ssh://ci@b1/system"
    assert s.uris(["debian-12", "centos-7", "debian-11"]) == [
        "qemu+ssh://ci@b1/system",
        "qemu+ssh://ci@b2/system",
    ]


def test_without_a_star_the_others_use_devbox_uri(tmp_path: Path) -> None:
    s = Settings(
        uri="qemu:///session", hosts=load_hosts(_project(tmp_path, '"c7" = "x+ssh://h/s"'))
    )
    assert (s.uri_for("c7"), s.uri_for("debian-12")) == ("x+ssh://h/s", "qemu:///session")
    assert load_hosts(tmp_path / "nowhere") == () and load_hosts(None) == ()


def test_a_value_that_is_no_uri_names_the_file_and_entry(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"pyproject.toml: \[tool.pytest-devbox.hosts\] 'c7'"):
        load_hosts(_project(tmp_path, '"c7" = "build-2"'))


def test_a_pool_starts_each_distro_on_its_host(tmp_path: Path) -> None:
    """debian-12 is mapped to a libvirt that cannot be reached: its start fails there,
    naming that URI, though --devbox-uri (the test driver) is fine."""
    settings = Settings(
        uri=TEST_URI,
        cache_dir=tmp_path / "cache",
        code_dir=tmp_path,
        accel="tcg",
        offline=True,
        hosts=(("debian-12", BAD_URI),),
    )
    pool = Pool([BUILTIN_PROFILES["debian-12"]], settings)
    with pytest.raises(HostNotReady, match="nonexistent/libvirt-sock"):
        pool.get("debian-12")
    pool.close()


def test_pytest_reads_the_table(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml('[tool.pytest-devbox.hosts]\n"*" = "build-1"\n')
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--devbox=debian-12")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "[tool.pytest-devbox.hosts] '*' = 'build-1' is not a libvirt URI" in result.stderr.str()
