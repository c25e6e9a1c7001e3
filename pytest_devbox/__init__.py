"""pytest-devbox: run the same tests in disposable VMs, one per Linux distribution.

The public names below are imported lazily: the pytest plugin imports this package on
every pytest run, and a run that selects no distro must not load libvirt or paramiko.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config.profiles import Profile, load_profiles
    from .config.settings import Settings
    from .errors import BootTimeout, CommandFailed, CommandTimeout, DevboxError
    from .guest.machine import Machine
    from .pool.pool import Pool
    from .pool.topology import topology
    from .result import Result

_EXPORTS = {
    "Machine": "guest.machine",
    "Pool": "pool.pool",
    "Settings": "config.settings",
    "load_profiles": "config.profiles",
    "Result": "result",
    "Profile": "config.profiles",
    "DevboxError": "errors",
    "CommandFailed": "errors",
    "CommandTimeout": "errors",
    "BootTimeout": "errors",
    "topology": "pool.topology",
}

__all__ = [
    "BootTimeout",
    "CommandFailed",
    "CommandTimeout",
    "DevboxError",
    "Machine",
    "Pool",
    "Profile",
    "Result",
    "Settings",
    "load_profiles",
    "topology",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_devbox' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
