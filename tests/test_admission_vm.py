"""A test that uses `devbox` and `devbox_fresh` of a profile two of whose guests do not
fit in this host's memory fails with the guests named, instead of hanging (finding 5 of
the 2026-12 review; VM tier: the host's libvirtd, debian-12 from the cache)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from guest_session import pytest_on_debian12

from pytest_devbox.virt import admission

pytestmark = pytest.mark.vm

BOTH = """
def test_both(devbox, devbox_fresh):
    pass
"""


def _memory_mib_one_fits_not_two() -> int:
    """A memory_mib with which one guest fits in this host's budget for guests, two do
    not, whatever else runs (guest memory is touched lazily: the big guest costs only
    what its kernel uses). Other sessions' guests may make the first one wait for them."""
    budget = admission.budget_mib(admission.meminfo_mib()["MemTotal"])
    return int(budget * 0.6) - admission.OVERHEAD_MIB


def test_finding5_devbox_and_devbox_fresh_that_cannot_both_fit_fail_at_once(
    tmp_path: Path,
) -> None:
    """Before: the fresh guest waited for the shared one, which waited for the test:
    forever. Now the fresh guest's admission fails at once, naming the shared guest."""
    memory = _memory_mib_one_fits_not_two()
    (tmp_path / "devbox.toml").write_text(f"[distros.debian-12]\nmemory_mib = {memory}\n")
    (tmp_path / "test_it.py").write_text(BOTH)
    t0 = time.monotonic()
    proc = subprocess.run(
        pytest_on_debian12("test_it.py"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    seconds = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "does not fit" in out and "waiting cannot help" in out, out
    assert f"({memory + admission.OVERHEAD_MIB} MiB, this session)" in out, out
    assert "devbox-debian-12-" in out
    assert seconds < 1200
