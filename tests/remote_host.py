"""A "remote" libvirt host for the VM tier (issue 13): there is one machine, so a
private sshd on loopback (local_sshd.py) stands for the remote host, and libvirt
reaches the same libvirtd through it: qemu+ssh://root@127.0.0.1:PORT/system.

libvirt's ssh transport runs the `ssh` binary; `command=` points it at a wrapper that
keeps its known_hosts in the test's directory (no_verify=1 would otherwise record the
key in root's ~/.ssh). The pool directory is under the test's directory, not the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
from local_sshd import client_files, host_key, run_sshd

from pytest_devbox.virt import domain as dom
from pytest_devbox.virt import volumes

LOCAL_URI = "qemu:///system"


@dataclass
class RemoteHost:
    uri: str
    pool_dir: str


@contextlib.contextmanager
def remote_host(d: Path) -> Iterator[RemoteHost]:
    """The remote host, its pool under `d`; afterwards the pool and its volumes go."""
    key, authorized = client_files(d)
    wrapper = d / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec ssh -o UserKnownHostsFile={d}/known_hosts "$@"\n')
    wrapper.chmod(0o755)
    pool_dir = str(d / "pool")
    with run_sshd(d / "sshd", authorized, host_key(d / "host_key")) as sshd:
        uri = (
            f"qemu+ssh://root@127.0.0.1:{sshd.port}/system"
            f"?keyfile={key}&no_verify=1&command={wrapper}"
        )
        yield RemoteHost(uri, pool_dir)
    conn = dom.connect(LOCAL_URI)
    try:
        pool = conn.storagePoolLookupByName(volumes.pool_name(pool_dir))
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
        pool.destroy()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


def pool_volumes(pool_dir: str) -> list[str]:
    """The volumes of our pool over `pool_dir`, as libvirt sees them now."""
    conn = dom.connect(LOCAL_URI)
    try:
        pool = conn.storagePoolLookupByName(volumes.pool_name(pool_dir))
        pool.refresh(0)
        return sorted(pool.listVolumes())
    finally:
        conn.close()
