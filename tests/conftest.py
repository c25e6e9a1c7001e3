"""Shared test set-up: the tiers, and what a test may touch on the host running it.

- default (`-m "not vm"`): no libvirtd but the in-process test:///default driver, no
  real cache directory, no host service;
- `vm`: the host's libvirtd (qemu:///system) and the real image cache;
- `host_service`: stops or reconfigures a host service (a developer's libvirtd holds
  their own VMs), so it runs only when asked: CI=true or PYTEST_DEVBOX_HOST_TESTS=1.
"""

from __future__ import annotations

import os

import pytest
from guests import cache, code_dir, debian11_9p, debian12, debian12_sync, sync_code_dir

pytest_plugins = ["pytester"]
# Session-scoped real guests for the VM tier, booted only when a test asks for one.
__all__ = ["cache", "code_dir", "debian11_9p", "debian12", "debian12_sync", "sync_code_dir"]

HOST_TESTS_ENV = "PYTEST_DEVBOX_HOST_TESTS"


def host_tests_allowed() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get(HOST_TESTS_ENV) == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if host_tests_allowed():
        return
    skip = pytest.mark.skip(
        reason=f"stops or reconfigures a host service: opt in with {HOST_TESTS_ENV}=1 (CI does)"
    )
    for item in items:
        if item.get_closest_marker("host_service"):
            item.add_marker(skip)
