"""Which share and id mode a guest's /code gets, so guest root is not host root there.

With ids passed through (virtiofs as libvirt starts it; 9p when QEMU runs as root), guest
root can leave a setuid-root file or a device node in the host's working tree. No stack
maps virtiofs ids under libvirt's system daemon (host/stack.py): libvirt (>= 10.0) passes
<idmap> on as --uid-map/--gid-map, and virtiofsd, which that daemon runs as root, refuses
them ("uid_map can only be used by unprivileged user", seen with libvirt 11.3 and the
Rust virtiofsd 1.13.2 in a Debian 13 root); squashing every guest id onto one host id
needs the Rust virtiofsd's --translate-uid/--translate-gid, which libvirt does not pass.
So virtiofs stays the opt-in below on every system-daemon host, Debian 13 included
(where it also restores from save slots). 9p in "mapped" mode can:
QEMU keeps the guest's owner, mode and device numbers in xattrs, and the host file is
QEMU's user's, with a plain mode (no setuid, no device node).

So by default (`auto`): 9p stays 9p, mapped; a virtiofs profile moves to 9p where its
guest kernel has 9p (Debian, Ubuntu), else to sync (a copy: nothing reaches the host).
`passthrough` is the explicit opt-in to guest ids being host ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ProfileError
from .profiles import Profile
from .settings import DEFAULT_CODE_IDS

# Templates whose kernels build the 9p transport (9pnet_virtio): Debian's and Ubuntu's.
# RHEL-family kernels leave CONFIG_NET_9P out.
_HAS_9P = re.compile(r"^(debian|ubuntu)-")
# DomainSpec.ids: "mapped" (9p owner and mode in xattrs), "passthrough", "none" (sync).
IDS_MAPPED, IDS_PASSTHROUGH, IDS_NONE = "mapped", "passthrough", "none"
OPT_IN = "--devbox-code-ids=passthrough"


@dataclass(frozen=True)
class CodeShare:
    """How /code reaches one profile's guests, and why, for the log line."""

    share: str  # virtiofs | 9p | sync
    ids: str  # IDS_MAPPED | IDS_PASSTHROUGH | IDS_NONE
    why: str

    def describe(self) -> str:
        mode = {IDS_MAPPED: "9p mapped", IDS_NONE: "a copy"}.get(self.ids, "ids passed through")
        return f"/code over {self.share} ({mode}): {self.why}"


def kernel_has_9p(profile: Profile) -> bool:
    """Whether the guest kernel of `profile` can mount 9p (its template's family says).
    A cloud image's kernel is the vendor's choice, not its family's: Debian's cloud kernel
    (linux-image-cloud-amd64) has no 9p. Only its own `share = "9p"` says it has."""
    if profile.cloud_image:
        return profile.share == "9p"
    return profile.share == "9p" or bool(_HAS_9P.match(profile.template))


def override_problem(share: str, code_ids: str) -> str | None:
    """Why `--devbox-share=share` cannot be had with `code_ids`, or None: checked before
    any guest starts (config/resolve.py) and again for each profile (code_share)."""
    if share != "virtiofs" or code_ids == "passthrough":
        return None
    return (
        "--devbox-share=virtiofs passes guest ids through on this host (its virtiofsd "
        "cannot map them: guest root would be host root on the code dir): use "
        f"--devbox-share=9p or sync, or opt in with {OPT_IN}"
    )


def code_share(profile: Profile, override: str = "", code_ids: str = DEFAULT_CODE_IDS) -> CodeShare:
    """The share and id mode of `profile`'s guests: `override` (--devbox-share) or the
    profile's share, made safe unless `code_ids` is passthrough."""
    asked = override or profile.share
    if asked == "sync":
        return CodeShare(
            "sync", IDS_NONE, "a copy over SSH: nothing the guest writes reaches the host"
        )
    if code_ids == "passthrough":
        return CodeShare(
            asked, IDS_PASSTHROUGH, f"{OPT_IN}: guest root is host root on the code dir"
        )
    if asked == "9p":
        return CodeShare("9p", IDS_MAPPED, "guest owners and modes stay in xattrs on the host")
    problem = override_problem(override, code_ids)
    if problem is not None:
        raise ProfileError(problem)
    if kernel_has_9p(profile):
        return CodeShare(
            "9p", IDS_MAPPED, "instead of virtiofs, whose ids this host cannot map (guest root)"
        )
    return CodeShare(
        "sync",
        IDS_NONE,
        "instead of virtiofs, whose ids this host cannot map, and no 9p in its kernel",
    )


def header_line(code_ids: str) -> str:
    """The one line the pytest header and `devbox doctor` say about guest ids on /code."""
    if code_ids == "passthrough":
        return (
            f"/code ids: passthrough ({OPT_IN}): guest root is host root on the code dir "
            "(setuid and device files it makes there are real)"
        )
    return (
        "/code ids: safe: 9p in mapped mode (virtiofs profiles moved to 9p or sync), guest "
        "root cannot make root-owned, setuid or device files in the code dir"
    )
