"""Two distros from a cold image cache at once vs each alone, printed (never asserted).

Each case gets its own empty cache directory, with the host's local templates as the
only repository, and starts its distros' shared guests the way `--devbox-eager` does
(`Pool.prepare(..., boot=True)`: image builds and boots, as many at once as cores and
memory allow). Prints each case's wall-clock time and the ratio of both-at-once to
the slower alone, in one run so the ratio holds however loaded the host is, and
ends with the figures as one JSON line (what benchmarks/run.py collects).

    .venv/bin/python benchmarks/bench_parallel.py [DISTRO_A DISTRO_B] [--vcpus N]

`--vcpus N` gives both guests N vCPUs: under TCG every vCPU is a busy host thread, so
with 2-vCPU guests on a 2-core host two boots at once cannot overlap; `--vcpus 1` shows
what the same host does when its cores can hold both guests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.settings import Settings
from pytest_devbox.host.parallel import available_mib, limit
from pytest_devbox.pool.pool import Pool

TEMPLATES = "file:///var/cache/pytest-devbox/templates/index"


def run_case(
    distros: list[str], scratch: Path, vcpus: int | None
) -> tuple[float, dict[str, float | None]]:
    """Seconds to have every distro's guest up from an empty cache; build seconds each."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=scratch))
    settings = Settings(
        cache_dir=cache,
        code_dir=scratch,
        offline=True,
        repos=(TEMPLATES,),
        restore="off",  # a boot, the same work in every case
    )
    profiles = [BUILTIN_PROFILES[d] for d in distros]
    if vcpus is not None:
        profiles = [dataclasses.replace(p, vcpus=vcpus) for p in profiles]
    pool = Pool(profiles, settings, log=lambda _: None)
    t0 = time.perf_counter()
    try:
        errors = pool.prepare(distros, boot=True)
        seconds = time.perf_counter() - t0
    finally:
        pool.close()
    if errors:
        raise SystemExit(f"{distros}: {errors}")
    return seconds, {d: pool.stats[d].build_seconds for d in distros}


def main() -> None:
    args = sys.argv[1:]
    vcpus = None
    if "--vcpus" in args:
        at = args.index("--vcpus")
        vcpus = int(args[at + 1])
        del args[at : at + 2]
    a, b = args[:2] if len(args) > 1 else ("debian-11", "debian-12")
    job_mib = max(BUILTIN_PROFILES[a].memory_mib, BUILTIN_PROFILES[b].memory_mib)
    print(
        f"host: {os.cpu_count()} cores, {available_mib()} MiB available, "
        f"load {os.getloadavg()[0]:.1f}; at once: {limit(2, job_mib)}; "
        f"vcpus: {vcpus or 'as each profile says'}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-parallel-", dir="/var/tmp") as tmp:
        scratch = Path(tmp)
        cases = [[a], [b], [a, b]]
        times: dict[str, float] = {}
        image_s: dict[str, float] = {}  # the slowest image build of each case
        for distros in cases:
            seconds, builds = run_case(distros, scratch, vcpus)
            label = " + ".join(distros)
            times[label] = seconds
            image_s[label] = max((s for s in builds.values() if s), default=0.0)
            each = ", ".join(f"{d} image {s:.0f} s" for d, s in builds.items() if s)
            print(f"{label:<24} {seconds:7.1f} s  ({each}; load {os.getloadavg()[0]:.1f})")
    slower = max(times[a], times[b])
    both = times[f"{a} + {b}"]
    print(f"both at once / slower alone: {both / slower:.2f}x")
    print(f"both at once / one after the other: {both / (times[a] + times[b]):.2f}x")
    # The image builds alone: with TCG each guest's boot keeps `vcpus` cores busy, so on
    # a host with no more cores than one guest's vCPUs two boots at once cannot overlap.
    images_ratio = image_s[f"{a} + {b}"] / max(image_s[a], image_s[b], 1e-9)
    print(f"images at once / slower image alone: {images_ratio:.2f}x")
    figures = {
        "parallel_alone_s": {a: round(times[a], 1), b: round(times[b], 1)},
        "parallel_both_s": round(both, 1),
        "parallel_over_slower": round(both / slower, 2),
        "parallel_over_sequential": round(both / (times[a] + times[b]), 2),
        "parallel_images_over_slower": round(images_ratio, 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
