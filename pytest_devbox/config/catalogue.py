"""The vendors' cloud images devbox knows by name: pure data, and the Profiles made of it.

Each row is checked against the vendor's published layout as peers read it (nothing
here can reach a vendor): Lima's templates/_images/*.yaml and hack/update-template-*.sh
(github.com/lima-vm/lima @183a60d, 2026-08-21) for URLs, digests, checksum files, 9p
and firmware; endoflife.date's products/*.md (@a70eca3, 2026-08-22) for EOL dates.
A dated URL goes away after some months (vendors prune them); ``latest`` is where the
same release's current image is, and ``checksum_file`` is a name beside either image
(one file lists both) unless it is a URL. ``digest`` is the dated image's, as the peer
recorded it: shown by ``devbox build --dry-run``, not enforced (the latest differs).

Checksum formats (the parsers are image/checksums.py's):
  bsd        ``SHA256 (FILE) = HEX`` lines, ``# FILE: N bytes`` comments
  bsd-pgp    the same inside a PGP clearsigned message
  gnu        ``HEX  FILE`` or ``HEX *FILE`` (sha256sum / sha512sum output)
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

# The release a distro's EOL rewrite names is the profile's own: written out per row.
FEDORA_ARCHIVE = (
    # After EOL Fedora's release and updates trees move to the archive and the
    # metalink stops listing them (docs.fedoraproject.org "End of life releases":
    # archives.fedoraproject.org/pub/archive/fedora/linux/{releases,updates}/N/).
    # Only the three repos whose baseurl the sed rewrites lose their metalink: the
    # openh264 repo keeps its own (it is skip_if_unavailable).
    "run-command sed -i -e 's/^metalink=/#metalink=/'"
    " -e 's|^#baseurl=http://download.example/pub/fedora/linux/"
    "|baseurl=https://archives.fedoraproject.org/pub/archive/fedora/linux/|'"
    " /etc/yum.repos.d/fedora.repo /etc/yum.repos.d/fedora-updates.repo"
    " /etc/yum.repos.d/fedora-updates-testing.repo"
)
# AlmaLinux 8's packages are signed by a new key since 2024-01-15 (almalinux.org blog
# 2023-12-20-almalinux-8-key-update; key id 2AE81E8ACED7258B, AlmaLinux/build-system#198).
# Images older than almalinux-release 8.8-3 lack it (AlmaLinux/cloud-images#167), so
# dnf refuses every package: import it first. A no-op (and offline) when it is there.
_ALMA8_KEY = (
    "run-command rpm -q gpg-pubkey-ced7258b >/dev/null"
    " || rpm --import https://repo.almalinux.org/almalinux/RPM-GPG-KEY-AlmaLinux"
)


@dataclass(frozen=True)
class Entry:
    """One vendor cloud image as devbox ships it."""

    name: str  # canonical: what test ids show
    family: str  # "rhel" | "fedora" | "debian" | "ubuntu"
    release: str
    image: str  # the dated URL
    latest: str  # the same release's current image
    checksum_file: str  # beside the image, or a URL
    checksum_format: str  # "bsd" | "bsd-pgp" | "gnu" (+ how it is signed, in `signed`)
    signed: str  # "clearsigned", "detached FILE" or "unsigned"
    share: str
    eol: str
    source: str  # where the row was checked
    firmware: str = "bios"
    cpu_level: str | None = None
    aliases: tuple[str, ...] = ()
    customize: tuple[str, ...] = ()  # known fixes, always
    eol_customize: tuple[str, ...] = ()  # the repository rewrite, once past `eol`
    digest: str | None = None
    selinux: bool = False
    memory_mib: int = 1024


_LIMA = "lima-vm/lima templates/_images/"
_RL = "https://dl.rockylinux.org/pub/rocky"
_AL = "https://repo.almalinux.org/almalinux"
_CS = "https://cloud.centos.org/centos"
_UB = "https://cloud-images.ubuntu.com/releases"
_FD = "https://download.fedoraproject.org/pub/fedora/linux/releases"
_FA = "https://archives.fedoraproject.org/pub/archive/fedora/linux/releases"
_DB = "https://cloud.debian.org/images/cloud"

# No 9p on any of these but Ubuntu's: RHEL kernels build no 9p (Lima: mountTypesUnsupported
# [9p] for every EL template), nor does Debian's cloud kernel (linux-image-cloud-amd64;
# Lima debian-12/13). virtiofs everywhere; config/code_ids.py turns it into sync unless
# --devbox-code-ids=passthrough, as for every virtiofs profile.
ENTRIES: tuple[Entry, ...] = (
    # Rocky: dl.rockylinux.org/pub/rocky/M.m/images/x86_64/, CHECKSUM lists every image
    # of the dir (Lima hack/update-template-rocky.sh reads "SHA256 (F) = H" lines).
    Entry("rocky-8", "rhel", "8.10",
          f"{_RL}/8.10/images/x86_64/Rocky-8-GenericCloud-Base-8.10-20240528.0.x86_64.qcow2",
          f"{_RL}/8/images/x86_64/Rocky-8-GenericCloud.latest.x86_64.qcow2",
          "CHECKSUM", "bsd", "unsigned", "virtiofs", "2029-05-31", _LIMA + "rocky-8.yaml",
          aliases=("rockylinux-8",), selinux=True,
          digest="sha256:e56066c58606191e96184de9a9183a3af33c59bcbd8740d8b10ca054a7a89c14"),
    Entry("rocky-9", "rhel", "9.8",
          f"{_RL}/9.8/images/x86_64/Rocky-9-GenericCloud-Base-9.8-20260525.0.x86_64.qcow2",
          f"{_RL}/9/images/x86_64/Rocky-9-GenericCloud.latest.x86_64.qcow2",
          "CHECKSUM", "bsd", "unsigned", "virtiofs", "2032-05-31", _LIMA + "rocky-9.yaml",
          cpu_level="x86-64-v2", aliases=("rockylinux-9",), selinux=True,
          digest="sha256:92c206cc6f790c61583247eefe87890f8828420662c17cacf247cec78ab4eec8"),
    Entry("rocky-10", "rhel", "10.2",
          f"{_RL}/10.2/images/x86_64/Rocky-10-GenericCloud-Base-10.2-20260525.0.x86_64.qcow2",
          f"{_RL}/10/images/x86_64/Rocky-10-GenericCloud-Base.latest.x86_64.qcow2",
          "CHECKSUM", "bsd", "unsigned", "virtiofs", "2035-05-31", _LIMA + "rocky-10.yaml",
          cpu_level="x86-64-v3", aliases=("rockylinux-10",), selinux=True,
          digest="sha256:9fc9e9ff16888bb68ac39b0392e25c9c92684d50c85f1cce6ab549363bbc4b48"),
    # AlmaLinux: repo.almalinux.org/almalinux/M.m/cloud/x86_64/images/, CHECKSUM in
    # sha256sum style ("sha256sum -c CHECKSUM", AlmaLinux/wiki docs/cloud/Generic-cloud.md;
    # Lima's awk takes field 1) with a detached CHECKSUM.asc.
    Entry("almalinux-8", "rhel", "8.10",
          f"{_AL}/8.10/cloud/x86_64/images/AlmaLinux-8-GenericCloud-8.10-20260518.x86_64.qcow2",
          f"{_AL}/8/cloud/x86_64/images/AlmaLinux-8-GenericCloud-latest.x86_64.qcow2",
          "CHECKSUM", "gnu", "detached CHECKSUM.asc", "virtiofs", "2029-05-31",
          _LIMA + "almalinux-8.yaml", aliases=("alma-8",), selinux=True,
          customize=(_ALMA8_KEY,),
          digest="sha256:9e6e3f98b809bca9bc89d8ac3c7fbb7d5aed76e34b7339233138319adb7f0343"),
    Entry("almalinux-9", "rhel", "9.8",
          f"{_AL}/9.8/cloud/x86_64/images/AlmaLinux-9-GenericCloud-9.8-20260526.x86_64.qcow2",
          f"{_AL}/9/cloud/x86_64/images/AlmaLinux-9-GenericCloud-latest.x86_64.qcow2",
          "CHECKSUM", "gnu", "detached CHECKSUM.asc", "virtiofs", "2032-05-31",
          _LIMA + "almalinux-9.yaml", cpu_level="x86-64-v2", aliases=("alma-9",), selinux=True,
          digest="sha256:c397eed7023e92c841155831b1f47e26300e5bef0f0256c129322307c897a251"),
    # The x86_64 build of AlmaLinux 10 is x86-64-v3 (an x86_64_v2 build exists beside it).
    Entry("almalinux-10", "rhel", "10.2",
          f"{_AL}/10.2/cloud/x86_64/images/AlmaLinux-10-GenericCloud-10.2-20260526.0.x86_64.qcow2",
          f"{_AL}/10/cloud/x86_64/images/AlmaLinux-10-GenericCloud-latest.x86_64.qcow2",
          "CHECKSUM", "gnu", "detached CHECKSUM.asc", "virtiofs", "2035-05-31",
          _LIMA + "almalinux-10.yaml", cpu_level="x86-64-v3", aliases=("alma-10",),
          selinux=True,
          digest="sha256:47f2218668dd4776be140dd92fa3bea700be1766e2c7d88bdfd6a4b50f477b4d"),
    # CentOS Stream: cloud.centos.org/centos/N-stream/x86_64/images/, one dir for dated
    # and latest; CHECKSUM (and per-image .SHA256SUM) in BSD style. Lima: "still
    # requires legacyBIOS" for 9 and 10. No vault rewrite yet: EOL is after today.
    Entry("centos-stream-9", "rhel", "9",
          f"{_CS}/9-stream/x86_64/images/CentOS-Stream-GenericCloud-9-20260720.0.x86_64.qcow2",
          f"{_CS}/9-stream/x86_64/images/CentOS-Stream-GenericCloud-9-latest.x86_64.qcow2",
          "CHECKSUM", "bsd", "unsigned", "virtiofs", "2027-05-31",
          _LIMA + "centos-stream-9.yaml", cpu_level="x86-64-v2",
          aliases=("centosstream-9",), selinux=True,
          digest="sha256:c2bde1f49fcb2efa55c40c4ec5011a8f2fb227c63254774b2a4d186b41f3a9a5"),
    Entry("centos-stream-10", "rhel", "10",
          f"{_CS}/10-stream/x86_64/images/CentOS-Stream-GenericCloud-10-20260720.0.x86_64.qcow2",
          f"{_CS}/10-stream/x86_64/images/CentOS-Stream-GenericCloud-10-latest.x86_64.qcow2",
          "CHECKSUM", "bsd", "unsigned", "virtiofs", "2030-05-31",
          _LIMA + "centos-stream-10.yaml", cpu_level="x86-64-v3",
          aliases=("centosstream-10",), selinux=True,
          digest="sha256:93796945df5e54952be21ca85067f0c9f3b11a2dd6ee2163154fd9748c4c41d7"),
    # Ubuntu: cloud-images.ubuntu.com/releases/CODENAME/release-DATE/ and .../release/;
    # SHA256SUMS "HEX *FILE" beside each, signed by SHA256SUMS.gpg. The generic kernel
    # has 9p and virtiofs. EOL: end of standard support (ESM needs Ubuntu Pro).
    Entry("ubuntu-22.04", "ubuntu", "22.04",
          f"{_UB}/jammy/release-20260705/ubuntu-22.04-server-cloudimg-amd64.img",
          f"{_UB}/jammy/release/ubuntu-22.04-server-cloudimg-amd64.img",
          "SHA256SUMS", "gnu", "detached SHA256SUMS.gpg", "virtiofs", "2027-04-01",
          _LIMA + "ubuntu-22.04.yaml", aliases=("ubuntu-jammy",),
          digest="sha256:ec3cdc1bf496078f645ccc8ac823e17609658753477ebc4e5fb730729ac5b434"),
    Entry("ubuntu-24.04", "ubuntu", "24.04",
          f"{_UB}/noble/release-20260705/ubuntu-24.04-server-cloudimg-amd64.img",
          f"{_UB}/noble/release/ubuntu-24.04-server-cloudimg-amd64.img",
          "SHA256SUMS", "gnu", "detached SHA256SUMS.gpg", "virtiofs", "2029-05-31",
          _LIMA + "ubuntu-24.04.yaml", aliases=("ubuntu-noble",),
          digest="sha256:ffe6203da54deeb6db5d2a98a83f9ec8e55f149d3f7ba622e1abe5fa966ee3d6"),
    # The plain amd64 image (an amd64v3 build exists beside it): no CPU floor.
    Entry("ubuntu-26.04", "ubuntu", "26.04",
          f"{_UB}/resolute/release-20260720/ubuntu-26.04-server-cloudimg-amd64.img",
          f"{_UB}/resolute/release/ubuntu-26.04-server-cloudimg-amd64.img",
          "SHA256SUMS", "gnu", "detached SHA256SUMS.gpg", "virtiofs", "2031-04-30",
          _LIMA + "ubuntu-26.04.yaml", aliases=("ubuntu-resolute",),
          digest="sha256:117816726abbdefc5ef3e38902e81a76f1c76c3610e709999d0885f9d5d9b477"),
    # Fedora: releases/N/Cloud/x86_64/images/, Fedora-Cloud-N-B-x86_64-CHECKSUM (PGP
    # clearsigned, BSD lines; Lima hack/update-template-fedora.sh). Fedora never prunes a
    # release's image: after EOL it is in the archive, the fallback here. 43 and 44 are
    # the releases supported on 2026-12-02 (endoflife.date: 43 until 2026-12-09, 44
    # until 2027-06-02; 45 is due then but no source here records its build).
    Entry("fedora-43", "fedora", "43",
          f"{_FD}/43/Cloud/x86_64/images/Fedora-Cloud-Base-Generic-43-1.6.x86_64.qcow2",
          f"{_FA}/43/Cloud/x86_64/images/Fedora-Cloud-Base-Generic-43-1.6.x86_64.qcow2",
          "Fedora-Cloud-43-1.6-x86_64-CHECKSUM", "bsd-pgp", "clearsigned", "virtiofs",
          "2026-12-09", _LIMA + "fedora-43.yaml", selinux=True,
          eol_customize=(FEDORA_ARCHIVE,),
          digest="sha256:846574c8a97cd2d8dc1f231062d73107cc85cbbbda56335e264a46e3a6c8ab2f"),
    Entry("fedora-44", "fedora", "44",
          f"{_FD}/44/Cloud/x86_64/images/Fedora-Cloud-Base-Generic-44-1.7.x86_64.qcow2",
          f"{_FA}/44/Cloud/x86_64/images/Fedora-Cloud-Base-Generic-44-1.7.x86_64.qcow2",
          "Fedora-Cloud-44-1.7-x86_64-CHECKSUM", "bsd-pgp", "clearsigned", "virtiofs",
          "2027-06-02", _LIMA + "fedora-44.yaml", selinux=True,
          eol_customize=(FEDORA_ARCHIVE,),
          digest="sha256:28680fe5b371a5a82ebf43a31926e086a168e59949d03969c5093e7071f90b7f"),
    # Debian: cloud.debian.org/images/cloud/CODENAME/STAMP/ and .../latest/, SHA512SUMS
    # beside each (sha512sum style; Lima pins sha512 digests). "-cloud": debian-12 and
    # debian-13 are the local mmdebstrap templates CI and the demo use, and a cloud
    # import is a template of the same local repository under its profile's name.
    # EOL: the end of Debian LTS, which keeps serving deb.debian.org (endoflife.date eoes).
    Entry("debian-12-cloud", "debian", "12",
          f"{_DB}/bookworm/20260712-2537/debian-12-genericcloud-amd64-20260712-2537.qcow2",
          f"{_DB}/bookworm/latest/debian-12-genericcloud-amd64.qcow2",
          "SHA512SUMS", "gnu", "unsigned", "virtiofs", "2028-06-30",
          _LIMA + "debian-12.yaml", aliases=("bookworm-cloud",),
          digest="sha512:6c2607f1846ee86040830c87d0b723f0967da3e884ea4673d9db4aa8eee13a4b"
          "7c663524bfa42082c16fc6919f3aa1bf425c004d07ff06c53a319ad0c42647bb"),
    Entry("debian-13-cloud", "debian", "13",
          f"{_DB}/trixie/20260712-2537/debian-13-genericcloud-amd64-20260712-2537.qcow2",
          f"{_DB}/trixie/latest/debian-13-genericcloud-amd64.qcow2",
          "SHA512SUMS", "gnu", "unsigned", "virtiofs", "2030-06-30",
          _LIMA + "debian-13.yaml", aliases=("trixie-cloud",),
          digest="sha512:7ae53e9dbee282bfc16f289dec483dde3a8598769c38a267948310f7a2a52c66"
          "2620198603bc52c142627efba379863d16079698a10b34102d55bcedd40e8d32"),
)  # fmt: skip

BY_NAME: Mapping[str, Entry] = MappingProxyType({e.name: e for e in ENTRIES})

# EOL dates of the built-ins that are not cloud images (endoflife.date products/*.md;
# Debian and Ubuntu: the end of the support their mirrors still serve).
OTHER_EOL: Mapping[str, str] = MappingProxyType(
    {
        "centos-7": "2024-06-30",
        "centos-8": "2021-12-31",
        "centosstream-8": "2024-05-31",
        "debian-10": "2024-06-30",
        "debian-11": "2026-08-31",
        "debian-12": "2028-06-30",
        "debian-13": "2030-06-30",
        "fedora-40": "2025-05-13",
        "fedora-41": "2025-12-15",
        "fedora-42": "2026-05-27",
        "ubuntu-18.04": "2023-05-31",
        "ubuntu-20.04": "2025-05-31",
    }
)

# Aliases of names that are not catalogue rows: none yet; rows carry their own.
ALIASES: Mapping[str, str] = MappingProxyType(
    {alias: e.name for e in ENTRIES for alias in e.aliases}
)


def past_eol(eol: str | None, today: datetime.date | None = None) -> bool:
    """Whether `eol` (YYYY-MM-DD) is before `today` (default: the real today)."""
    if eol is None:
        return False
    return datetime.date.fromisoformat(eol) < (today or datetime.date.today())


def customize_lines(entry: Entry, today: datetime.date | None = None) -> tuple[str, ...]:
    """The entry's customize lines: the EOL rewrite first once past EOL (every
    package operation after it needs the moved repositories), then the known fixes."""
    rewrite = entry.eol_customize if past_eol(entry.eol, today) else ()
    return (*rewrite, *entry.customize)


def family_release(name: str) -> tuple[str, str]:
    """(family, release) of a built-in's name: the row's, else read from the name."""
    entry = BY_NAME.get(name)
    if entry is not None:
        return entry.family, entry.release
    head, _, release = name.partition("-")
    family = {"centos": "rhel", "centosstream": "rhel"}.get(head, head)
    return family, release.split("-")[0]


def rows(names: Iterable[str] = ()) -> list[Entry]:
    """The entries for `names` (all when empty), in catalogue order."""
    wanted = set(names)
    return [e for e in ENTRIES if not wanted or e.name in wanted]
