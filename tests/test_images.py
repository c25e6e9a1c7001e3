"""The image cache: recipe keys, the exact virt-builder invocation, locking, validation.

The fast tier builds nothing with virt-builder: keys come from indexes written into a
temporary cache (read as file:// or from a local HTTP server), cached images are real
qcow2 files made by qemu-img; the VM tier builds a real image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from index_server import serve

from pytest_devbox.config.profiles import BUILTIN_PROFILES, Profile, load_profiles
from pytest_devbox.errors import CacheLockTimeout, ImageBuildError
from pytest_devbox.image import qemu_img
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.image.selinux import RELABEL_COMMAND, builder_flags

VB = "/usr/bin/virt-builder"


def index_text(revisions: dict[str, int]) -> str:
    return "".join(
        f"[{name}]\nname={name}\narch=x86_64\nfile={name}.qcow2.xz\nrevision={rev}\n"
        f"size=4294967296\nformat=qcow2\nexpand=/dev/sda1\n"
        f"checksum[sha512]={'ab' * 8}\n\n"
        for name, rev in revisions.items()
    )


def write_index(root: Path, revisions: dict[str, int]) -> Path:
    index = root / "templates" / "index"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(index_text(revisions))
    return index


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "cache"
    write_index(r, {"centos-7.8": 1, "centos-8.2": 1, "debian-12": 3})
    return r


def cache(root: Path, **kw: object) -> ImageCache:
    kw.setdefault("public_index", False)
    kw.setdefault("guest_user", ("devbox", 1000, 1000))
    kw.setdefault("log", lambda s: None)
    return ImageCache(root, **kw)  # type: ignore[arg-type]


def expected_argv(c: ImageCache, p: Profile, out: Path, *tail: str) -> list[str]:
    key = c.key_for(p)
    return [
        VB, p.template, "--format", "qcow2", "-o", str(out),
        "--cache", str(c.root / "virt-builder-cache"),
        "--hostname", f"devbox-{p.name}",
        "--ssh-inject", f"root:file:{c.root}/ssh/id_ed25519.pub",
        "--root-password", "random",
        "--commands-from-file", str(c.root / "recipes" / f"{p.name}-{key}.commands"),
        *tail,
    ]  # fmt: skip


def user_lines(c: ImageCache) -> list[str]:
    return [
        "run-command getent group devbox >/dev/null || groupadd -o -g 1000 devbox",
        "run-command id -u devbox >/dev/null 2>&1 || "
        "useradd -o -m -u 1000 -g 1000 -s /bin/bash devbox",
        "mkdir /etc/sudoers.d",
        "append-line /etc/sudoers.d/devbox:devbox ALL=(ALL) NOPASSWD:ALL",
        "chmod 0440:/etc/sudoers.d/devbox",
        f"ssh-inject devbox:file:{c.root}/ssh/id_ed25519.pub",
        # Many threads on one connection per login (issue 16): sshd's limits raised.
        "append-line /etc/ssh/sshd_config:MaxSessions 64",
        "append-line /etc/ssh/sshd_config:MaxStartups 64:30:128",
        "run-command ssh-keygen -A",
    ]


def commands_file(argv: list[str]) -> list[str]:
    return Path(argv[argv.index("--commands-from-file") + 1]).read_text().splitlines()


def test_centos7_argv_and_commands_file(root: Path, tmp_path: Path) -> None:
    c, p = cache(root), BUILTIN_PROFILES["centos-7"]
    out = tmp_path / "out.qcow2"
    argv = c.builder_command(p, out)
    # kernel-plus comes from the network: no --no-network. 1.48 takes no relabel flag.
    assert argv == expected_argv(c, p, out, *builder_flags(c.builder.version()))
    # The DESIGN recipe already mounts /code over 9p: no second fstab line. The SELinux
    # relabel is the very last step.
    assert commands_file(argv) == [
        *p.customize,
        "mkdir /code",
        *user_lines(c),
        RELABEL_COMMAND,
    ]


def test_centos8_argv_and_commands_file(root: Path, tmp_path: Path) -> None:
    c, p = cache(root), BUILTIN_PROFILES["centos-8"]
    out = tmp_path / "out.qcow2"
    argv = c.builder_command(p, out)
    assert argv == expected_argv(c, p, out, *builder_flags(c.builder.version()), "--no-network")
    assert commands_file(argv) == [
        *p.customize,
        "mkdir /code",
        "append-line /etc/fstab:/code /code virtiofs defaults,nofail 0 0",
        *user_lines(c),
        RELABEL_COMMAND,
    ]


def test_debian12_offline_gets_the_virtiofs_fstab_line_and_size(root: Path, tmp_path: Path) -> None:
    c = cache(root)
    p = replace(BUILTIN_PROFILES["debian-12"], disk_size="6G")
    out = tmp_path / "out.qcow2"
    argv = c.builder_command(p, out)
    assert argv == expected_argv(c, p, out, "--no-network", "--size", "6G")
    assert commands_file(argv) == [
        "mkdir /code",
        "append-line /etc/fstab:/code /code virtiofs defaults,nofail 0 0",
        *user_lines(c),
    ]
    p9 = replace(p, name="deb-9p", share="9p")
    assert commands_file(c.builder_command(p9, out))[1] == (
        "append-line /etc/fstab:/code /code 9p "
        "trans=virtio,version=9p2000.L,msize=262144,nofail 0 0"
    )
    assert c.builder_command(p9, out)[c.builder_command(p9, out).index("--hostname") + 1] == (
        "devbox-deb-9p"
    )


def test_key_changes_with_every_shaping_input_and_nothing_else(root: Path) -> None:
    p = BUILTIN_PROFILES["debian-12"]
    base = cache(root).key_for(p)
    assert len(base) == 16 and int(base, 16) >= 0
    assert cache(root).key_for(p) == base  # stable across instances
    # Not shaping the image: memory, vcpus, profile repos order of no consequence, tcg.
    assert cache(root).key_for(replace(p, memory_mib=4096, vcpus=1)) == base
    assert cache(root, tcg=False).key_for(p) == base
    changed = {
        "customize": cache(root).key_for(replace(p, customize=("mkdir /opt/x",))),
        "share": cache(root).key_for(replace(p, share="9p")),
        "disk_size": cache(root).key_for(replace(p, disk_size="8G")),
        "template": cache(root).key_for(replace(p, template="centos-8.2")),
        "name/hostname": cache(root).key_for(replace(p, name="other")),
        "uid": cache(root, guest_user=("devbox", 1001, 1000)).key_for(p),
        "gid": cache(root, guest_user=("devbox", 1000, 1001)).key_for(p),
    }
    pub = root / "ssh" / "id_ed25519.pub"
    other_key = root / "other.pub"
    other_key.write_text(pub.read_text().replace("A", "B", 1))
    changed["public key"] = cache(root, public_key=other_key).key_for(p)
    write_index(root, {"centos-7.8": 1, "centos-8.2": 1, "debian-12": 4})
    changed["revision"] = cache(root).key_for(p)
    assert base not in changed.values(), changed
    assert len(set(changed.values())) == len(changed)


def test_missing_template_says_where_it_looked_and_what_to_do(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write_index(root, {"debian-11": 1})
    with pytest.raises(ImageBuildError) as e:
        cache(root).key_for(BUILTIN_PROFILES["debian-12"])
    msg = str(e.value)
    assert "'debian-12'" in msg and (root / "templates" / "index").as_uri() in msg
    assert "devbox template build debian-12" in msg
    with pytest.raises(ImageBuildError, match="drop --devbox-offline"):
        cache(root).key_for(BUILTIN_PROFILES["centos-8"])


NINEP_LINE = (
    "append-line /etc/fstab:/code /code 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0"
)


def test_a_9p_profile_extending_centos8_mounts_9p(root: Path, tmp_path: Path) -> None:
    """Defect 5 (issue 8): the /code fstab line follows the profile's share."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[tool.pytest-devbox.distros.c8-9p]\nextends = "centos-8"\nshare = "9p"\n'
    )
    p = load_profiles(project)["c8-9p"]
    lines = commands_file(cache(root).builder_command(p, tmp_path / "out.qcow2"))
    assert NINEP_LINE in lines
    assert not [line for line in lines if "virtiofs" in line]


def test_the_key_hashes_the_one_download_of_each_index(root: Path, tmp_path: Path) -> None:
    """Defect 4 (issue 8): one download per index and cache, whatever a second would say."""
    p = BUILTIN_PROFILES["debian-12"]
    with serve(index_text({"debian-12": 9})) as server:
        c = cache(root, repos=[server.uri])
        key = c.key_for(p)
        server.body = b"garbage\n"  # a flaky server: any later download gets this
        argv = c.builder_command(p, tmp_path / "out.qcow2")
        assert argv[argv.index("--commands-from-file") + 1].endswith(f"/debian-12-{key}.commands")
        assert c.key_for(p) == key
        assert c.image_path(p) == root / "images" / f"debian-12-{key}.qcow2"
        assert server.hits == 1


def test_an_unreadable_index_keeps_the_key_of_the_cached_image(root: Path, tmp_path: Path) -> None:
    """Defect 4 (issue 8): an index gone bad never silently changes the key of a cached image."""
    extra = tmp_path / "repo" / "index"
    extra.parent.mkdir()
    extra.write_text(index_text({"debian-12": 7}))
    p = BUILTIN_PROFILES["debian-12"]
    first = cache(root, repos=[str(extra)])
    key = first.key_for(p)
    built = first.ensure(p, key, real_qcow2)
    assert built.built and built.metadata["template_sources"] == [
        [(root / "templates" / "index").as_uri(), "x86_64", "3", "ab" * 8],
        [extra.as_uri(), "x86_64", "7", "ab" * 8],
    ]
    for damage in ("garbage", "gone"):
        if damage == "garbage":
            extra.write_text("<html>a captive portal</html>\n")
        else:
            extra.unlink()
        logs: list[str] = []
        later = cache(root, repos=[str(extra)], log=logs.append)
        assert later.key_for(p) == key, damage
        info = later.image_for(p)
        assert (info.path, info.built, info.key) == (built.path, False, key)
        assert [line for line in logs if extra.as_uri() in line and "cached from it" in line]


def test_an_unreadable_index_with_no_matching_image_says_what_to_do(
    root: Path, tmp_path: Path
) -> None:
    extra = tmp_path / "repo" / "index"
    extra.parent.mkdir()
    extra.write_text(index_text({"debian-12": 7}))
    p = BUILTIN_PROFILES["debian-12"]
    c = cache(root, repos=[str(extra)])
    c.ensure(p, c.key_for(p), real_qcow2)
    extra.write_text("garbage\n")
    with pytest.raises(ImageBuildError) as nothing_cached:
        cache(tmp_path / "other", repos=[str(extra)]).key_for(p)
    msg = str(nothing_cached.value)
    assert f"the index {extra.as_uri()} is not a virt-builder index" in msg
    assert "--devbox-repo" in msg
    # The local template was rebuilt since: the cached image is stale, not a fallback.
    write_index(root, {"debian-12": 4})
    with pytest.raises(ImageBuildError, match="No image of 'debian-12' cached"):
        cache(root, repos=[str(extra)]).key_for(p)


# --- lock, replace, validation ---------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.image.selinux import RELABEL_COMMAND, builder_flags
final = Path(sys.argv[1])
def build(tmp):
    Path(sys.argv[2]).write_text("started")
    time.sleep(float(sys.argv[3]))
    tmp.write_text("image")
ImageCache(final.parent, log=print)._build_locked(
    final, build, label="holder", reuse=lambda: final.exists())
"""


def start_holder(final: Path, seconds: float) -> subprocess.Popen[str]:
    started = final.with_name("started")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(final), str(started), str(seconds)], text=True
    )
    deadline = time.monotonic() + 20
    while not started.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    return proc


def test_second_process_waits_says_for_whom_then_gets_a_cache_hit(tmp_path: Path) -> None:
    final = tmp_path / "img.qcow2"
    holder = start_holder(final, 1.5)
    logs: list[str] = []
    calls: list[Path] = []
    c = ImageCache(tmp_path, log=logs.append)
    t0 = time.monotonic()
    built = c._build_locked(final, calls.append, label="me", reuse=lambda: final.exists())
    waited = time.monotonic() - t0
    assert holder.wait(10) == 0
    assert built is False and calls == []
    assert final.read_text() == "image"
    assert waited > 0.5
    assert len(logs) == 1
    assert f"waiting for process {holder.pid} on " in logs[0] and "img.qcow2" in logs[0]
    assert not final.with_name("img.qcow2.owner").exists()


def test_lock_timeout_names_the_holder(tmp_path: Path) -> None:
    final = tmp_path / "img.qcow2"
    holder = start_holder(final, 3)
    c = ImageCache(tmp_path, log=lambda s: None, lock_timeout=0.3)
    with pytest.raises(CacheLockTimeout, match=f"process {holder.pid} on .* held the lock"):
        c._build_locked(final, lambda t: None, label="me", reuse=lambda: False)
    holder.wait(10)


def test_failed_build_leaves_nothing_and_stale_temp_is_removed(tmp_path: Path) -> None:
    final = tmp_path / "img.qcow2"
    logs: list[str] = []
    c = ImageCache(tmp_path, log=logs.append)

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise ImageBuildError("boom")

    with pytest.raises(ImageBuildError):
        c._build_locked(final, failing, label="x", reuse=lambda: False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.qcow2.lock"]

    # A killed build (no chance to clean up) leaves its temp file behind.
    final.with_name("img.qcow2.partial").write_text("half")
    seen: list[bool] = []

    def ok(tmp: Path) -> None:
        seen.append(tmp.exists())
        tmp.write_text("whole")

    assert c._build_locked(final, ok, label="x", reuse=lambda: False) is True
    assert seen == [False] and final.read_text() == "whole"
    assert any("interrupted build" in line for line in logs)
    assert not final.with_name("img.qcow2.partial").exists()


def real_qcow2(path: Path) -> None:
    raw = path.with_suffix(".raw")
    raw.write_bytes(os.urandom(3 * 1024 * 1024))
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
    )
    raw.unlink()


def test_cached_image_validation_detects_truncation(tmp_path: Path) -> None:
    logs: list[str] = []
    c = ImageCache(tmp_path, log=logs.append)
    img = tmp_path / "d-k.qcow2"
    real_qcow2(img)
    size = img.stat().st_size
    meta = {"key": "k", "image_size": size}
    img.with_suffix(".json").write_text(json.dumps(meta))
    assert c._cached(img, "k") == meta  # cheap path: no qemu-img

    # Metadata lost: qemu-img check vouches for the image, metadata is recovered.
    img.with_suffix(".json").unlink()
    assert c._cached(img, "k") == {"key": "k", "image_size": size, "recovered": True}

    # Truncated with metadata: the size gives it away.
    os.truncate(img, size // 3)
    assert c._cached(img, "k") is None
    assert "truncated" in logs[-1]

    # Truncated without metadata: qemu-img check catches it.
    img.with_suffix(".json").unlink()
    assert c._cached(img, "k") is None
    assert "qemu-img check failed" in logs[-1]


def test_same_size_corrupt_image_is_rebuilt(root: Path) -> None:
    """Issue 15: with metadata present, a zeroed qcow2 header of the right size is caught."""
    logs: list[str] = []
    c = cache(root, log=logs.append)
    p = BUILTIN_PROFILES["debian-12"]
    key = c.key_for(p)
    first = c.ensure(p, key, real_qcow2)
    size = first.path.stat().st_size
    with open(first.path, "r+b") as f:
        f.write(bytes(4096))  # a zeroed header; the size stays
    assert first.path.stat().st_size == size == first.metadata["image_size"]
    assert c._cached(first.path, key) is None
    assert "not a sound qcow2 header (no qcow2 magic" in logs[-1]
    again = cache(root, log=logs.append).ensure(p, key, real_qcow2)
    assert again.built and again.path == first.path
    assert qemu_img.header_problem(again.path) == ""
    assert cache(root).ensure(p, key, real_qcow2).built is False


# --- VM tier -----------------------------------------------------------------------------

SYSTEM_CACHE = Path("/var/cache/pytest-devbox")


@pytest.mark.vm
def test_real_debian12_image_then_cache_hit() -> None:
    if not (SYSTEM_CACHE / "templates" / "index").is_file():
        pytest.skip("no local template repository yet: run `devbox template build debian-12`")
    logs: list[str] = []
    c = ImageCache(SYSTEM_CACHE, public_index=False, log=logs.append)
    p = BUILTIN_PROFILES["debian-12"]
    t0 = time.monotonic()
    first = c.image_for(p)
    first_s = time.monotonic() - t0
    assert first.path.is_file() and first.path.name == f"debian-12-{first.key}.qcow2"
    assert first.metadata["key"] == first.key
    if first.built:
        assert first.build_seconds is not None
        assert not any(
            "random password of root to" in line and "<hidden>" not in line for line in logs
        )
    t0 = time.monotonic()
    second = ImageCache(SYSTEM_CACHE, public_index=False, log=logs.append).image_for(p)
    second_s = time.monotonic() - t0
    assert second.built is False and second.path == first.path
    assert second_s < 5
    print(f"\nfirst image_for: {first_s:.1f} s (built={first.built}); cache hit: {second_s:.2f} s")
