"""Doing one job per distro at the same time, bounded by the host's cores and memory.

Image builds (virt-builder runs a QEMU appliance) and guest boots are CPU- and
memory-bound: more jobs than cores only slows each down, and more guests than memory
makes the host swap or the OOM killer pick one. `limit` says how many at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..errors import DevboxError

T = TypeVar("T")
R = TypeVar("R")

# What a job needs beside its guest: QEMU's own overhead, libguestfs' appliance share.
JOB_OVERHEAD_MIB = 256
_MEMINFO = "/proc/meminfo"


def available_mib(meminfo: str = _MEMINFO) -> int | None:
    """The kernel's estimate of memory available to new work (MemAvailable), in MiB."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def limit(jobs: int, job_mib: int, *, cpus: int | None = None, free_mib: int | None = None) -> int:
    """How many of `jobs` jobs of `job_mib` MiB each to run at once: at most one a core,
    as many as the available memory holds, at least one."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    free_mib = free_mib if free_mib is not None else available_mib()
    by_memory = jobs if free_mib is None else free_mib // (job_mib + JOB_OVERHEAD_MIB)
    return max(1, min(jobs, cpus, by_memory))


def run_bounded(items: Sequence[T], work: Callable[[T], R], at_once: int) -> list[R | DevboxError]:
    """`work(item)` for every item, `at_once` at a time; each result or the DevboxError
    it raised, in the order of `items`.

    Daemon threads joined in slices, so Ctrl-C reaches the main thread at once; a guest
    still starting then goes with the process (libvirt destroys it with our connection).
    Anything but a DevboxError in a job is re-raised here, after every job has ended.
    """
    results: list[R | DevboxError] = [DevboxError("not run")] * len(items)
    unexpected: list[BaseException] = []
    slots = threading.BoundedSemaphore(max(1, at_once))

    def one(i: int) -> None:
        with slots:
            try:
                results[i] = work(items[i])
            except DevboxError as e:
                results[i] = e
            except Exception as e:  # a bug: re-raised in the caller's thread
                unexpected.append(e)

    if len(items) == 1 or at_once <= 1:
        for i in range(len(items)):
            one(i)
    else:
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(items))]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    if unexpected:
        raise unexpected[0]
    return results
