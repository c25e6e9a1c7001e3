"""A session's settings, in a module light enough for the plugin to import on every run
(no libvirt, no paramiko)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .host import default_cache_dir


@dataclass(frozen=True)
class Settings:
    """Everything a session decides once: where, how and with what guests run."""

    uri: str = "qemu:///system"
    cache_dir: Path = field(default_factory=default_cache_dir)
    code_dir: Path = field(default_factory=Path.cwd)
    accel: str = "auto"
    rebuild: bool = False
    keep: bool = False
    offline: bool = False
    repos: tuple[str, ...] = ()
    boot_timeout: float | None = None
    boot_retries: int = 1
