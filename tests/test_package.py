"""The package's public names, and that importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest_devbox


def test_public_names() -> None:
    from pytest_devbox import errors
    from pytest_devbox.guest import machine
    from pytest_devbox.transport import ssh

    assert pytest_devbox.Machine is machine.Machine
    assert pytest_devbox.Result is ssh.Result
    assert issubclass(pytest_devbox.CommandFailed, pytest_devbox.DevboxError)
    assert issubclass(pytest_devbox.BootTimeout, errors.DevboxError)
    from pytest_devbox.config import profiles, settings
    from pytest_devbox.pool import pool

    assert pytest_devbox.Pool is pool.Pool
    assert pytest_devbox.Settings is settings.Settings
    assert pytest_devbox.load_profiles is profiles.load_profiles
    from pytest_devbox.pool import topology

    assert pytest_devbox.topology is topology.topology
    assert set(pytest_devbox.__all__) == {
        "Machine",
        "Pool",
        "Settings",
        "load_profiles",
        "Result",
        "Profile",
        "DevboxError",
        "CommandFailed",
        "CommandTimeout",
        "BootTimeout",
        "topology",
    }


def test_import_loads_no_libvirt_or_paramiko() -> None:
    code = "import sys, pytest_devbox; print('libvirt' in sys.modules, 'paramiko' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
