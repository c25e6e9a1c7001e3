"""What the VM-tier tests share about separate sessions on the host's libvirtd: the
command line of a pytest session that boots debian-12 from the cache, and the devbox
domains that libvirtd runs."""

from __future__ import annotations

import sys

from pytest_devbox.config.settings import DEFAULT_URI
from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.virt import domain as dom

# A project's pyproject.toml that adds the 9p profile debian-11-9p (debian-11 sharing
# /code over 9p), for sessions that start guests of it.
NINE_P_PROJECT = """\
[tool.pytest-devbox.distros.debian-11-9p]
extends = "debian-11"
share = "9p"
"""


def system_domains(uri: str = DEFAULT_URI) -> dict[str, dict[str, str]]:
    """Every devbox domain at `uri` (the host's libvirtd), name -> its devbox metadata."""
    conn = dom.connect(uri)
    try:
        return dict(dom.list_devbox_domains(conn))
    finally:
        conn.close()


def pytest_on_debian12(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--devbox=debian-12",
        "--devbox-offline",
        f"--devbox-cache={default_cache_dir()}",
        *args,
    ]
