"""The CPU floor under TCG, proven on a guest that runs here (VM tier): a Debian 12
guest of a profile with cpu_level = "x86-64-v3" (as rocky-10's) gets a CPU that has
the level, by glibc's own account (ld.so --help lists the hwcaps it would search) and
by the feature flags the level needs (host/cpu_level.py)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from guests import start_machine

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.guest.machine import Machine
from pytest_devbox.host import cpu_level
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.virt import domain as dom

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def v3_guest(cache: ImageCache, code_dir: Path) -> Iterator[Machine]:
    # Same name, so the same cached image: cpu_level shapes the domain, not the image.
    profile = replace(BUILTIN_PROFILES["debian-12"], cpu_level="x86-64-v3")
    with start_machine(profile, cache, code_dir, share="sync") as m:
        yield m


def test_glibc_in_the_guest_supports_x86_64_v3(v3_guest: Machine) -> None:
    out = v3_guest.run("/lib64/ld-linux-x86-64.so.2 --help").stdout
    assert "x86-64-v3 (supported, searched)" in out, out
    assert "x86-64-v2 (supported, searched)" in out, out


def test_the_guest_cpu_has_every_feature_of_the_level(v3_guest: Machine) -> None:
    flags = v3_guest.run("grep -m1 '^flags' /proc/cpuinfo").stdout.split(":", 1)[1].split()
    assert cpu_level.missing("x86-64-v3", flags) == []


def test_under_tcg_the_domain_asks_for_the_maximum_cpu(v3_guest: Machine) -> None:
    xml = ET.fromstring(v3_guest.domain.virdom.XMLDesc(0))
    assert xml.get("type") == "qemu"
    assert xml.find("cpu").get("mode") == "maximum"  # type: ignore[union-attr]
    # This host's QEMU is one the version check lets through, and it did boot.
    assert v3_guest.domain.virdom.connect().getVersion() >= dom.TCG_V3_QEMU
