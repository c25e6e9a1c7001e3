"""Local template repository: up-to-date decision, locking, real builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import filelock
import pytest

from pytest_devbox.errors import CacheLockTimeout, UnknownDistro
from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.image.index import format_index
from pytest_devbox.image.selinux import RELABEL_SHELL, guestfish_quote
from pytest_devbox.image.templates.recipes import TEMPLATE_RECIPES
from pytest_devbox.image.templates.repository import (
    DEBIAN_SUITES,
    DEFAULT_MIRROR,
    REPO_ID,
    BuildOutcome,
    TemplateRepo,
    default_repo_dir,
    next_revision,
    packages_for,
    recipe_hash,
)


def fake_template(repo: TemplateRepo, distro: str, revision: int, mirror: str) -> None:
    """Lay out what a finished build leaves: file, sidecar state, index entry."""
    repo.root.mkdir(parents=True, exist_ok=True)
    name = f"{distro}-r{revision}.qcow2.xz"
    (repo.root / name).write_bytes(b"not really xz")
    (repo.root / f"{distro}.json").write_text(
        json.dumps({"recipe": recipe_hash(distro, mirror), "revision": revision})
    )
    sections = repo.entries()
    sections[distro] = {
        "name": distro,
        "osinfo": distro.replace("-", ""),
        "arch": "x86_64",
        "file": name,
        "format": "qcow2",
        "size": "4294967296",
        "compressed_size": str(len(b"not really xz")),
        "checksum[sha512]": "0" * 128,
        "revision": str(revision),
        "expand": "/dev/sda1",
    }
    repo.index_path.write_text(format_index(sections))


def test_recipe_hash_changes_with_what_shapes_the_template() -> None:
    base = recipe_hash("debian-12", DEFAULT_MIRROR)
    assert base == recipe_hash("debian-12", DEFAULT_MIRROR)
    assert base != recipe_hash("debian-11", DEFAULT_MIRROR)
    assert base != recipe_hash("debian-12", "http://mirror.example/debian")


def test_plain_recipe_hashes_are_pinned_so_built_templates_and_ci_caches_survive() -> None:
    # The hashes the debian-11/12 templates in the shared cache (and CI's) are built
    # with: adding a variant must not rebuild them. (Build script 2, no xz, changed them
    # on purpose, once.)
    assert recipe_hash("debian-11", DEFAULT_MIRROR) == (
        "afea80700f75c6f1bc43a44fdd68b6480601c0d768aa089113ea1c0aa786be8a"
    )
    assert recipe_hash("debian-12", DEFAULT_MIRROR) == (
        "80ed102d4a7c4c32582bf9406e0ed096ad7274f502cd81df45f0bd50f2dedd83"
    )


def test_the_selinux_variant_is_debian_12_enforcing_and_labelled_at_build() -> None:
    plain, se = TEMPLATE_RECIPES["debian-12"], TEMPLATE_RECIPES["debian-12-selinux"]
    assert recipe_hash("debian-12-selinux", DEFAULT_MIRROR) != recipe_hash(
        "debian-12", DEFAULT_MIRROR
    )
    assert (se.suite, se.osinfo) == ("bookworm", "debian12")
    assert se.packages == (*plain.packages, "selinux-basics", "selinux-policy-default", "auditd")
    assert se.customize.startswith(plain.customize)
    assert "SELINUX=enforcing" in se.customize and "SELINUXTYPE=default" in se.customize
    assert "security=selinux selinux=1" in se.customize  # on the extlinux APPEND line
    assert "(genfscon virtiofs" in se.customize  # the policy labels the share
    # Labelled by the same step an image build ends with, after extlinux, before unmount.
    lines = se.guestfish.splitlines()
    relabel = lines.index(f"sh {guestfish_quote(RELABEL_SHELL)}")
    assert lines.index("extlinux /boot/extlinux") < relabel < lines.index("umount-all")
    assert [line for line in lines if line != lines[relabel] and "e2attrs" not in line] == (
        plain.guestfish.splitlines()
    )


def test_packages_use_the_full_kernel_and_resolved_where_separate() -> None:
    assert "linux-image-amd64" in packages_for("bullseye")
    assert "linux-image-cloud-amd64" not in packages_for("bookworm")
    assert "systemd-resolved" not in packages_for("bullseye")
    assert "systemd-resolved" in packages_for("bookworm")


def test_next_revision_always_grows() -> None:
    assert next_revision(None, now=1000.0) == 1000
    assert next_revision(999, now=1000.0) == 1000
    assert next_revision(5000, now=1000.0) == 5001


def test_unknown_distro_lists_the_known(tmp_path: Path) -> None:
    repo = TemplateRepo(tmp_path, log=lambda _: None)
    with pytest.raises(UnknownDistro) as info:
        repo.build("centos-7")
    for known in DEBIAN_SUITES:
        assert known in str(info.value)
    assert not (tmp_path / "index").exists()


def test_paths_and_conf(tmp_path: Path) -> None:
    repo = TemplateRepo(default_repo_dir(tmp_path))
    assert repo.index_path == tmp_path / "templates" / "index"
    assert repo.uri == f"file://{tmp_path}/templates/index"
    conf = repo.conf_text()
    assert conf.startswith(f"[{REPO_ID}]\n")
    assert f"uri={repo.uri}\n" in conf
    assert "gpgkey" not in conf  # unsigned: virt-builder accepts it without a key
    assert repo.write_conf().read_text() == conf


def test_up_to_date_template_is_not_rebuilt(tmp_path: Path) -> None:
    lines: list[str] = []
    repo = TemplateRepo(tmp_path, log=lines.append)
    fake_template(repo, "debian-12", 42, DEFAULT_MIRROR)
    outcome = repo.build("debian-12")
    assert outcome == BuildOutcome(
        "debian-12", False, outcome.seconds, 42, tmp_path / "debian-12-r42.qcow2.xz"
    )
    assert any("up to date" in line for line in lines)
    assert repo.conf_path.read_text() == repo.conf_text()


def test_up_to_date_decision(tmp_path: Path) -> None:
    repo = TemplateRepo(tmp_path)
    assert not repo.is_up_to_date("debian-12")
    fake_template(repo, "debian-12", 3, DEFAULT_MIRROR)
    assert repo.is_up_to_date("debian-12")
    # Another mirror is another recipe.
    assert not TemplateRepo(tmp_path, mirror="http://mirror.example/debian").is_up_to_date(
        "debian-12"
    )
    # A truncated template file is not trusted.
    (tmp_path / "debian-12-r3.qcow2.xz").write_bytes(b"short")
    assert not repo.is_up_to_date("debian-12")


def test_state_from_an_interrupted_build_is_not_trusted(tmp_path: Path) -> None:
    repo = TemplateRepo(tmp_path)
    fake_template(repo, "debian-12", 3, DEFAULT_MIRROR)
    # Sidecar already says revision 4, the index still publishes revision 3.
    (tmp_path / "debian-12.json").write_text(
        json.dumps({"recipe": recipe_hash("debian-12", DEFAULT_MIRROR), "revision": 4})
    )
    assert not repo.is_up_to_date("debian-12")


def test_entries_keep_other_distros(tmp_path: Path) -> None:
    repo = TemplateRepo(tmp_path)
    assert repo.entries() == {}
    fake_template(repo, "debian-11", 1, DEFAULT_MIRROR)
    fake_template(repo, "debian-12", 2, DEFAULT_MIRROR)
    fake_template(repo, "debian-11", 3, DEFAULT_MIRROR)
    entries = repo.entries()
    assert set(entries) == {"debian-11", "debian-12"}
    assert entries["debian-11"]["revision"] == "3"
    assert entries["debian-12"]["revision"] == "2"


def test_build_waits_for_its_distros_lock(tmp_path: Path) -> None:
    held = filelock.FileLock(str(tmp_path / ".lock-debian-12"))
    impatient = TemplateRepo(tmp_path, log=lambda _: None, lock_timeout=0.2)
    with held, pytest.raises(CacheLockTimeout, match="another process"):
        impatient.build("debian-12")

    # A waiter that needs a build blocks on the lock; when the holder finishes
    # building, the waiter sees the fresh template and does not build it again.
    patient = TemplateRepo(tmp_path, log=lambda _: None, lock_timeout=10)
    results: list[BuildOutcome] = []
    with held:
        waiter = threading.Thread(target=lambda: results.append(patient.build("debian-12")))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()
        fake_template(patient, "debian-12", 9, DEFAULT_MIRROR)
    waiter.join(10)
    assert [(r.built, r.revision) for r in results] == [(False, 9)]


def test_up_to_date_template_is_answered_while_another_build_holds_the_lock(
    tmp_path: Path,
) -> None:
    repo = TemplateRepo(tmp_path, log=lambda _: None, lock_timeout=0.2)
    fake_template(repo, "debian-11", 1, DEFAULT_MIRROR)
    with filelock.FileLock(str(tmp_path / ".lock-debian-11")):
        assert repo.build("debian-11").built is False
        with pytest.raises(CacheLockTimeout):
            repo.build("debian-11", force=True)


def test_two_distros_build_at_once_and_both_are_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tool runs are replaced (they take minutes, and the VM tier runs them for
    # real); what is checked is the locking: debian-11's build does not wait for
    # debian-12's, and the index ends up listing both.
    import pytest_devbox.image.templates.repository as repository

    both_building = threading.Barrier(2, timeout=10)

    def fake_build_disk(recipe: object, steps: object, work: Path) -> Path:
        both_building.wait()  # raises BrokenBarrierError if the builds were serialised
        out = work / "disk.qcow2.xz"
        out.write_bytes(work.name.encode())
        return out

    monkeypatch.setattr(repository, "build_disk", fake_build_disk)
    repo = TemplateRepo(tmp_path, log=lambda _: None, lock_timeout=10)
    outcomes: dict[str, BuildOutcome] = {}
    threads = [
        threading.Thread(target=lambda d=d: outcomes.__setitem__(d, repo.build(d)))
        for d in ("debian-11", "debian-12")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(outcomes) == ["debian-11", "debian-12"]
    assert all(o.built for o in outcomes.values())
    assert set(repo.entries()) == {"debian-11", "debian-12"}
    assert repo.is_up_to_date("debian-11") and repo.is_up_to_date("debian-12")


@pytest.mark.vm
def test_build_debian_12_into_the_shared_cache(tmp_path: Path) -> None:
    # The persistent cache, so the minutes spent here are reused by every later run.
    repo = TemplateRepo(default_repo_dir(default_cache_dir()))
    first = repo.build("debian-12")
    assert first.path.is_file()

    again = repo.build("debian-12")
    assert again.built is False
    assert again.revision == first.revision
    assert again.seconds < 5

    proc = subprocess.run(
        ["virt-index-validate", str(repo.index_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    entry = repo.entries()["debian-12"]
    assert entry["expand"] == "/dev/sda1"
    assert int(entry["compressed_size"]) == first.path.stat().st_size

    # virt-builder sees exactly this repository and lists the template.
    config = tmp_path / "config"
    (config / "virt-builder" / "repos.d").mkdir(parents=True)
    shutil.copy(repo.conf_path, config / "virt-builder" / "repos.d" / repo.conf_path.name)
    env = dict(os.environ, VIRT_BUILDER_DIRS=str(config), XDG_CONFIG_HOME=str(config))
    listing = subprocess.run(
        ["virt-builder", "--list", "--no-cache"], capture_output=True, text=True, env=env
    )
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[0] for line in listing.stdout.splitlines() if line.strip()]
    assert "debian-12" in names
    assert "fedora-42" not in names  # the public repo is not consulted
