#!/usr/bin/env python3
"""Print what this machine runs, as JSON (works with any Python 3 in any guest)."""

import json
import platform


def os_release(path: str = "/etc/os-release") -> dict:
    fields = {}
    with open(path) as f:
        for line in f:
            key, sep, value = line.rstrip("\n").partition("=")
            if sep:
                fields[key] = value.strip('"')
    return fields


if __name__ == "__main__":
    release = os_release()
    print(
        json.dumps(
            {
                "id": release.get("ID"),
                "version_id": release.get("VERSION_ID"),
                "pretty_name": release.get("PRETTY_NAME"),
                "kernel": platform.release(),
                "machine": platform.machine(),
                "python": platform.python_version(),
            }
        )
    )
