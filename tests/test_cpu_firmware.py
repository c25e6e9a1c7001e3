"""The CPU floor (host/cpu_level.py) and UEFI firmware (virt/domain.py) checks that
fail before boot, with what to do, instead of a boot timeout."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_devbox.errors import DomainError
from pytest_devbox.host import cpu_level
from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import domain_xml

# A Westmere-class CPU: x86-64-v2, no AVX.
V2_ONLY = "fpu sse sse2 ssse3 cx16 sse4_1 sse4_2 popcnt lahf_lm aes"


def test_host_flags_read_the_first_cpu(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {V2_ONLY}\n\nprocessor\t: 1\nflags\t: x\n")
    assert cpu_level.host_flags(info) == frozenset(V2_ONLY.split())
    assert cpu_level.host_flags(tmp_path / "none") == frozenset()


def test_a_host_without_the_level_gets_the_sentence() -> None:
    flags = V2_ONLY.split()
    assert cpu_level.kvm_problem("rocky-9", "x86-64-v2", flags) is None
    assert cpu_level.kvm_problem("debian-12", None, []) is None
    problem = cpu_level.kvm_problem("rocky-10", "x86-64-v3", flags)
    assert problem == (
        "rocky-10 needs an x86-64-v3 CPU (AVX2, BMI2, FMA, MOVBE, ...); this host's CPU "
        "lacks avx, avx2, bmi1, bmi2, f16c, fma, abm, movbe, xsave, and a KVM guest gets "
        "the host's CPU: use TCG (--devbox-accel=tcg, which emulates them, slowly) or "
        "another host"
    )
    assert cpu_level.missing("x86-64-v2", ["sse4_2"]) == [
        "cx16", "lahf_lm", "popcnt", "sse4_1", "ssse3",
    ]  # fmt: skip


def spec(firmware: str) -> domain_xml.DomainSpec:
    return domain_xml.DomainSpec(
        name="devbox-x-r0", disk=Path("/nonexistent.qcow2"), code_dir=Path("/tmp"),
        share="sync", accel="tcg", console_log=Path("/tmp/c.log"), ids="none",
        firmware=firmware,
    )  # fmt: skip


def test_uefi_is_efi_firmware_autoselection_without_seabios_options() -> None:
    root = ET.fromstring(domain_xml.build_xml(spec("uefi")))
    assert root.find("os").get("firmware") == "efi"  # type: ignore[union-attr]
    assert root.find("os/bios") is None
    assert root.find("os/firmware/feature").attrib == {"enabled": "no", "name": "secure-boot"}  # type: ignore[union-attr]
    bios = ET.fromstring(domain_xml.build_xml(spec("bios")))
    assert bios.find("os").get("firmware") is None  # type: ignore[union-attr]
    with pytest.raises(DomainError, match="unknown firmware 'coreboot'"):
        spec("coreboot")


@pytest.mark.vm  # asks the host's libvirtd (no guest starts)
def test_uefi_without_ovmf_fails_before_boot_saying_what_to_install() -> None:
    conn = dom.connect("qemu:///system")
    try:
        caps = ET.fromstring(conn.getDomainCapabilities(None, "x86_64", "pc", "qemu", 0))
        has_efi = "efi" in [v.text for v in caps.findall("os/enum[@name='firmware']/value")]
        problem = dom.uefi_problem(conn)
        assert (problem is None) == has_efi
        if has_efi:
            pytest.skip("this host has OVMF: nothing to refuse")
        assert problem is not None and "apt-get install ovmf" in problem
        with pytest.raises(DomainError, match="it boots with UEFI but libvirt at qemu:///system"):
            dom.Domain.create(conn, spec("uefi"))
    finally:
        conn.close()


class _OldQemu:
    """What a libvirt connection to a QEMU older than 7.2 answers: no such host here."""

    def getVersion(self) -> int:
        return 7_001_000


def test_tcg_refuses_x86_64_v3_on_a_qemu_before_7_2() -> None:
    v3 = domain_xml.DomainSpec(
        name="devbox-rocky-10-r0", disk=Path("/nonexistent.qcow2"), code_dir=Path("/tmp"),
        share="sync", accel="tcg", console_log=Path("/tmp/c.log"), ids="none",
        cpu_level="x86-64-v3",
    )  # fmt: skip
    problem = dom.tcg_level_problem(_OldQemu(), v3)  # type: ignore[arg-type]
    assert problem is not None and "QEMU 7.1" in problem and "from 7.2 on" in problem
    with pytest.raises(DomainError, match="cannot start devbox-rocky-10-r0: its distro needs"):
        dom.Domain.create(_OldQemu(), v3)  # type: ignore[arg-type]
    # v2 and no level need nothing of TCG's version.
    for level in ("x86-64-v2", None):
        spec_ = domain_xml.DomainSpec(**{**v3.__dict__, "cpu_level": level})
        assert dom.tcg_level_problem(_OldQemu(), spec_) is None  # type: ignore[arg-type]
