"""The four steps that make a local template disk, each a host tool run in a work dir:
``mmdebstrap`` (a minbase root file system as a tarball, with our customize hook),
``guestfish`` (a partitioned ext4 disk with extlinux), ``qemu-img convert`` (qcow2) and
``xz``. Each step's failure is a TemplateBuildError carrying the tool's output.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import TemplateBuildError
from ...log import Log
from .recipes import DISK_SIZE, TemplateRecipe

STEP_TIMEOUT = 3600.0


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass(frozen=True)
class Steps:
    """Runs the build steps of one template, logging each with its duration."""

    distro: str
    mirror: str
    env: Mapping[str, str]
    log: Log

    def run(self, title: str, argv: Sequence[str]) -> None:
        self.log(f"{self.distro}: {title} ...")
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                list(argv),
                env=dict(self.env),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=STEP_TIMEOUT,
            )
        except FileNotFoundError:
            raise TemplateBuildError(
                f"{argv[0]} is not installed; install the host packages listed by "
                "`devbox doctor` (mmdebstrap, guestfs-tools, qemu-utils, xz-utils)"
            ) from None
        except subprocess.TimeoutExpired as exc:
            raise TemplateBuildError(
                f"{self.distro}: {title} did not finish in {STEP_TIMEOUT:g} s; "
                f"check the mirror {self.mirror} and the host load, then retry"
            ) from exc
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            output = _tail(proc.stdout + "\n" + proc.stderr)
            raise TemplateBuildError(
                f"{self.distro}: {title} failed (exit {proc.returncode}) after {seconds:.0f} s: "
                f"{' '.join(argv)}\n{output}\n"
                "Fix the cause above and run `devbox template build` again; "
                "the repository was left unchanged."
            )
        self.log(f"{self.distro}: {title} done in {seconds:.1f} s")


def build_disk(recipe: TemplateRecipe, steps: Steps, work: Path, *, xz: bool = True) -> Path:
    """Make ``recipe``'s template in ``work``; return the qcow2 in it (xz-compressed
    unless ``xz`` is False: the tests' vendor-like cloud image is served as plain qcow2)."""
    root_uuid = str(uuid.uuid4())
    rootfs = _rootfs(recipe, steps, work, root_uuid)
    disk = _disk(recipe, steps, work, rootfs, root_uuid)
    rootfs.unlink()
    return _compress(steps, work, disk, xz=xz)


def _rootfs(recipe: TemplateRecipe, steps: Steps, work: Path, root_uuid: str) -> Path:
    hook = work / "customize.sh"
    hook.write_text(recipe.customize.replace("@ROOT_UUID@", root_uuid))
    hook.chmod(0o755)
    rootfs = work / "rootfs.tar"
    steps.run(
        f"mmdebstrap {recipe.suite} (minbase + {len(recipe.packages)} packages)",
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(recipe.packages),
            f"--customize-hook={hook}",
            '--aptopt=Acquire::Retries "3"',
            recipe.suite,
            str(rootfs),
            steps.mirror,
        ],
    )
    return rootfs


def _disk(recipe: TemplateRecipe, steps: Steps, work: Path, rootfs: Path, root_uuid: str) -> Path:
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    script = work / "disk.guestfish"
    script.write_text(
        recipe.guestfish.replace("@DISK@", str(disk))
        .replace("@ROOTFS@", str(rootfs))
        .replace("@ROOT_UUID@", root_uuid)
    )
    steps.run("guestfish: partition, ext4, extlinux", ["guestfish", "-x", "-f", str(script)])
    return disk


def _compress(steps: Steps, work: Path, disk: Path, *, xz: bool = True) -> Path:
    qcow2 = work / "disk.qcow2"
    steps.run(
        "qemu-img convert to qcow2",
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(qcow2)],
    )
    disk.unlink()
    if not xz:
        return qcow2
    # 16 MiB blocks let virt-builder decompress in parallel; -T0 uses every core.
    steps.run(
        "xz compress",
        # -1: the repository is local, so speed beats ratio; the default -6 spent
        # over half of each build compressing (185-265 s of 340-480 s measured).
        ["xz", "-1", "--block-size=16777216", "-T0", "-f", str(qcow2)],
    )
    return work / "disk.qcow2.xz"
