"""A pytest-testinfra backend over a guest's own logins: `machine.testinfra` is a
testinfra `Host` whose commands are `machine.run`'s, so it opens no SSH connection of
its own and every command it runs shows in the guest's recent commands.

Imported only when a test asks for it (`Machine.testinfra`): testinfra is an optional
extra (`pip install 'pytest-devbox[testinfra]'`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import DevboxError

try:
    from testinfra.backend.base import BaseBackend, CommandResult
    from testinfra.host import Host
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise DevboxError(
        f"machine.testinfra needs pytest-testinfra ({e}): pip install 'pytest-devbox[testinfra]'"
    ) from e

if TYPE_CHECKING:
    from .machine import Machine

NAME = "devbox"
ROOT = "root"


class DevboxBackend(BaseBackend):  # type: ignore[misc]  # testinfra has no type stubs
    """Runs testinfra's commands with `Machine.run` as `user` (None: the devbox user).

    testinfra's `host.sudo(user)` runs as that user through the guest's root login
    (`run(user=...)`), not through a sudo in the devbox user's shell.
    """

    NAME = NAME

    def __init__(self, machine: Machine, user: str | None) -> None:
        super().__init__(machine.name)
        self.machine = machine
        self.user = user

    def get_command(self, command: str, *args: str) -> str:
        # No sudo prefix: `run` picks the login instead.
        return str(self.quote(command, *args))

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        cmd = self.get_command(command, *args)
        user = (self.sudo_user or ROOT) if self.sudo else self.user
        # cwd None: the login's home, as testinfra's ssh backends run.
        r = self.machine.run(cmd, check=False, cwd=None, user=user)
        # exit_status None only on a timeout, which raises instead.
        status = -1 if r.exit_status is None else r.exit_status
        return self.result(status, self.encode(cmd), r.stdout, r.stderr)


def host_for(machine: Machine, user: str | None) -> Any:
    """A testinfra Host that runs its commands in `machine` as `user`."""
    backend = DevboxBackend(machine, user)
    host = Host(backend)
    backend.set_host(host)
    return host
