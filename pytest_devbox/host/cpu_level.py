"""The x86-64 micro-architecture levels a distro's userland may need, and whether this
host's CPU has them: a guest on KVM (host-passthrough) gets exactly the host's CPU.

The levels are the x86-64 psABI's (gitlab.com/x86-psABIs/x86-64-ABI, "Micro-
architecture levels"), by the feature names /proc/cpuinfo uses (abm is LZCNT). Under
TCG the domain's CPU is `-cpu max` (virt/domain_xml.py), which has v3 since QEMU 7.2
(AVX/AVX2 in TCG); tests/test_cpu_level_vm.py boots it and asks glibc.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

_V2 = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")
_V3 = (*_V2, "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
LEVEL_FLAGS: Mapping[str, tuple[str, ...]] = MappingProxyType({"x86-64-v2": _V2, "x86-64-v3": _V3})
# What the message names for a level: the features people know it by.
_KNOWN_AS = {"x86-64-v2": "SSE4.2, POPCNT, CX16, ...", "x86-64-v3": "AVX2, BMI2, FMA, MOVBE, ..."}


def host_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of this host's first CPU (all CPUs of a host have the same)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def missing(level: str, flags: Iterable[str]) -> list[str]:
    """The features of `level` that `flags` lacks, in the psABI's order."""
    have = set(flags)
    return [f for f in LEVEL_FLAGS[level] if f not in have]


def kvm_problem(distro: str, level: str | None, flags: Iterable[str] | None = None) -> str | None:
    """Why `distro`, whose userland needs `level`, cannot run on this host's CPU under
    KVM; None when it can (or needs no level). One sentence saying what to do."""
    if level is None:
        return None
    lacks = missing(level, host_flags() if flags is None else flags)
    if not lacks:
        return None
    return (
        f"{distro} needs an {level} CPU ({_KNOWN_AS[level]}); this host's CPU lacks "
        f"{', '.join(lacks)}, and a KVM guest gets the host's CPU: use TCG "
        "(--devbox-accel=tcg, which emulates them, slowly) or another host"
    )
