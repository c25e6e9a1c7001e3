"""Machine and Pool without pytest: the same guests from a plain script.

    python examples/without_pytest.py debian-11-9p debian-12

Each named distro of this project (pyproject.toml's profiles and the built-ins) gets one
guest; the script prints its kernel and what it sees at /code, then stops them all.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pytest_devbox import Pool, Settings, load_profiles

HERE = Path(__file__).resolve().parent


def main(distros: list[str]) -> int:
    profiles = load_profiles(HERE)
    # As this project's pyproject.toml says for pytest: the local templates only.
    pool = Pool([profiles[d] for d in distros], Settings(code_dir=HERE, offline=True))
    try:
        for distro in pool.distros:
            guest = pool.get(distro)
            kernel = guest.run("uname -r").stdout.strip()
            listing = guest.run("ls /code").stdout.split()
            print(f"{distro}: kernel {kernel}, /code has {len(listing)} entries")
    finally:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["debian-12"]))
