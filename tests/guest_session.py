"""The command line of a separate pytest session that boots debian-12 from the cache."""

from __future__ import annotations

import sys

from pytest_devbox.host import default_cache_dir


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
