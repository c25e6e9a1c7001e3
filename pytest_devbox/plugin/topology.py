"""The `devbox_topology` marker: which roles a test's group of guests has, on which
distros, and the role -> distro combinations it is parametrized over.

    @pytest.mark.devbox_topology(server="debian-12", client="*")

A role named by a distro runs on it when that distro is selected (else the test is
skipped, as the `devbox` marker does); "*" runs on each selected distro that the test's
`devbox` markers allow, so two "*" roles run every pair.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import pytest

from ..config.option_table import HOW_TO_SELECT
from ..errors import DevboxError

if TYPE_CHECKING:
    from ..config.profiles import Profile
    from .session import DevboxSession

MARKER = "devbox_topology"
ANY = "*"
USAGE = '@pytest.mark.devbox_topology(server="debian-12", client="*")'


def marker_roles(node: Any, profiles: dict[str, Profile]) -> dict[str, str]:
    """{role: canonical distro or "*"} of the test's (closest) devbox_topology marker;
    a collection error saying how to write it when it is missing or wrong."""
    where = getattr(node, "nodeid", "") or getattr(node, "name", "")
    mark = node.get_closest_marker(MARKER)
    if mark is None:
        pytest.fail(f"{where}: the devbox_topology fixture needs {USAGE}", pytrace=False)
    if mark.args:
        pytest.fail(
            f"{where}: @pytest.mark.devbox_topology takes role=distro keywords, not "
            f"{list(mark.args)!r}: {USAGE}",
            pytrace=False,
        )
    from ..config.profiles import canonical

    roles: dict[str, str] = {}
    for role, distro in mark.kwargs.items():
        if not isinstance(distro, str) or (
            distro != ANY and canonical(distro, profiles) not in profiles
        ):
            pytest.fail(
                f"{where}: @pytest.mark.devbox_topology role {role}={distro!r} names no "
                f'known distro: use "*" or one of {", ".join(sorted(profiles))}',
                pytrace=False,
            )
        roles[role] = distro if distro == ANY else canonical(distro, profiles)
    from ..pool.topology import check_roles  # imports paramiko: only when a test uses it

    try:
        check_roles(roles)
    except DevboxError as e:
        pytest.fail(f"{where}: {e}: {USAGE}", pytrace=False)
    return roles


def combinations(state: DevboxSession, node: Any) -> tuple[list[dict[str, str]], str]:
    """Every {role: distro} the test runs with, and why there is none if so."""
    roles = marker_roles(node, state.profiles)
    selected = state.selected_names
    if not selected:
        return [], f"no devbox distro selected: {HOW_TO_SELECT}"
    for role, distro in roles.items():
        if distro != ANY and distro not in selected:
            return [], (
                f"devbox_topology role {role} runs on {distro}, which is not selected "
                f"({', '.join(selected)})"
            )
    anywhere, why = state.distros_for(node)
    if ANY in roles.values() and not anywhere:
        return [], why
    choices = [anywhere if distro == ANY else [distro] for distro in roles.values()]
    return [dict(zip(roles, combo)) for combo in itertools.product(*choices)], ""


def combination_id(roles: dict[str, str]) -> str:
    """A test id part: server=debian-12,client=debian-11-9p."""
    return ",".join(f"{role}={distro}" for role, distro in roles.items())
