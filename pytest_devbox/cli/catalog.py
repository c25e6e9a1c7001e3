"""`devbox catalog`: the distros devbox knows, where each comes from and what it needs;
`--check` asks each vendor URL whether its image is still there.

A dated vendor image goes away after some months and the catalogue then falls back to
the release's latest image; `--check` shows which rows need a new date. Every HEAD
runs at once with a short timeout, so a host without the network answers at once.
"""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from ..config.catalogue import family_release
from ..config.profiles import Profile, select
from ..image.availability import cache_state
from .context import Context

TIMEOUT = 5.0
# A redirect is how mirror networks answer (download.fedoraproject.org): one that
# keeps the file name is the same image; one that does not has moved.
_MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Verdict:
    url: str
    state: str  # "ok" | "moved" | "vanished" | "unreachable" | "error"
    detail: str = ""

    def line(self) -> str:
        return f"{self.state:<11} {self.url}" + (f" ({self.detail})" if self.detail else "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # raise the 3xx as an HTTPError: we follow by hand, counting


_OPENER = urllib.request.build_opener(_NoRedirect)


def _status(url: str, timeout: float) -> tuple[int, str]:
    """(HTTP status, Location) of a HEAD of `url`; a refused HEAD is asked by GET."""
    for method in ("HEAD", "GET"):
        req = urllib.request.Request(url, method=method, headers={"Range": "bytes=0-0"})
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                return resp.status, ""
        except urllib.error.HTTPError as e:
            if method == "HEAD" and e.code in (405, 501):
                continue
            return e.code, e.headers.get("Location", "") if e.headers else ""
    raise AssertionError("unreachable")  # pragma: no cover


def check_url(url: str, timeout: float = TIMEOUT) -> Verdict:
    """Whether `url` still serves its file: ok, moved (a redirect to another file),
    vanished (404/410), unreachable (no answer) or error (any other status)."""
    current = url
    name = PurePosixPath(urlsplit(url).path).name
    try:
        for _ in range(_MAX_REDIRECTS + 1):
            code, location = _status(current, timeout)
            if code in (301, 302, 303, 307, 308) and location:
                current = urllib.parse.urljoin(current, location)
                continue
            break
        else:
            return Verdict(url, "error", f"more than {_MAX_REDIRECTS} redirects")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return Verdict(url, "unreachable", str(reason))
    if code in (404, 410):
        return Verdict(
            url, "vanished", f"HTTP {code}" + (f" at {current}" if current != url else "")
        )
    if code >= 400:
        return Verdict(url, "error", f"HTTP {code}")
    if current != url and PurePosixPath(urlsplit(current).path).name != name:
        return Verdict(url, "moved", f"now {current}")
    return Verdict(url, "ok", f"via {current}" if current != url else "")


def check_all(urls: Sequence[str], timeout: float = TIMEOUT) -> list[Verdict]:
    """`check_url` of every URL, all at once."""
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(urls))) as pool:
        return list(pool.map(lambda u: check_url(u, timeout), urls))


def table(profiles: Iterable[Profile], cache_dir: Path) -> list[str]:
    """The catalogue as aligned text lines, a header first."""
    head = ("NAME", "FAMILY", "RELEASE", "SOURCE", "SHARE", "FIRMWARE", "CPU", "EOL", "CACHE")
    rows = [head]
    for p in profiles:
        family, release = family_release(p.name)
        source = "cloud image" if p.cloud_image else "virt-builder"
        rows.append(
            (p.name, family, release, source, p.share, p.firmware, p.cpu_level or "-",
             p.eol or "-", cache_state(p, cache_dir))
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def cmd_catalog(
    args: argparse.Namespace, ctx: Context, write: Callable[[str], object] = print
) -> int:
    profiles = select(ctx.distros, ctx.profiles) if ctx.distros else list(ctx.profiles.values())
    for line in table(profiles, ctx.settings.cache_dir):
        write(line)
    if not args.check:
        return 0
    urls = list(
        dict.fromkeys(
            u for p in profiles for u in (p.cloud_image, p.cloud_image_latest) if u is not None
        )
    )
    verdicts = check_all(urls, args.timeout)
    write("")
    for v in verdicts:
        write(v.line())
    bad = sum(v.state != "ok" for v in verdicts)
    write(f"{len(verdicts) - bad} of {len(verdicts)} vendor URLs answer")
    return 1 if bad else 0
