"""The vendor-image catalogue (config/catalogue.py): its rows, aliases, EOL handling,
the offline error, `devbox build --dry-run` and `devbox catalog [--check]`.

Vendor sites are not reachable here: `--check` is proven against a plain HTTP server
on 127.0.0.1 that this file starts, and on the real URLs only answers "unreachable".
"""

from __future__ import annotations

import contextlib
import datetime
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pytest_devbox.config import catalogue
from pytest_devbox.config.profiles import (
    BUILTIN_PROFILES,
    builtin_profiles,
    canonical,
    eol_warning,
    load_profiles,
    select,
)
from pytest_devbox.config.settings import SHARE_CHOICES
from pytest_devbox.image.availability import cache_state, offline_problem

REQUIRED = (
    *(f"{d}-{v}" for d in ("rocky", "almalinux") for v in (8, 9, 10)),
    "centos-stream-9",
    "centos-stream-10",
    "ubuntu-22.04",
    "ubuntu-24.04",
    "ubuntu-26.04",
    "fedora-43",
    "fedora-44",
    "debian-12-cloud",
    "debian-13-cloud",
)
# What existed before the catalogue, still there with their recipes (or as an alias).
OLD = (
    "centos-7", "centos-8", "centosstream-8", "debian-10", "debian-11", "debian-12",
    "debian-12-selinux", "debian-13", "fedora-40", "fedora-41", "fedora-42",
    "ubuntu-18.04", "ubuntu-20.04",
)  # fmt: skip
DATED = re.compile(r"(20[0-9]{6}|[0-9]+\.[0-9]+-[0-9]+|-[0-9]+-[0-9]+\.[0-9]+\.)")


def devbox(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_devbox.cli", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=cwd,
    )  # fmt: skip


# --- the rows -------------------------------------------------------------------------


def test_every_required_distro_and_every_old_builtin_is_there() -> None:
    assert set(REQUIRED) <= set(BUILTIN_PROFILES)
    for name in OLD:
        assert canonical(name, BUILTIN_PROFILES) in BUILTIN_PROFILES, name
    assert canonical("centosstream-9", BUILTIN_PROFILES) == "centos-stream-9"


@pytest.mark.parametrize("entry", catalogue.ENTRIES, ids=lambda e: e.name)
def test_each_row_names_its_image_checksum_share_and_eol(entry: catalogue.Entry) -> None:
    p = BUILTIN_PROFILES[entry.name]
    assert p.cloud_image == entry.image and p.cloud_image_latest == entry.latest
    assert entry.image.startswith("https://") and entry.latest.startswith("https://")
    assert entry.image != entry.latest
    assert DATED.search(entry.image), entry.image  # a dated file or directory
    assert p.checksum_url == entry.checksum_file and entry.checksum_file
    assert entry.checksum_format in ("bsd", "bsd-pgp", "gnu")
    assert (
        entry.signed == "clearsigned"
        or entry.signed == "unsigned"
        or entry.signed.startswith("detached ")
    )
    assert (entry.checksum_format == "bsd-pgp") == (entry.signed == "clearsigned")
    assert p.share in SHARE_CHOICES and p.share != "9p"  # no 9p in these kernels
    datetime.date.fromisoformat(entry.eol)
    assert p.eol == entry.eol
    assert entry.source.startswith("lima-vm/lima templates/_images/")
    assert p.template == entry.name  # the name it is imported under
    if entry.digest is not None:
        algo, _, hexdigest = entry.digest.partition(":")
        assert len(hexdigest) == {"sha256": 64, "sha512": 128}[algo]
        int(hexdigest, 16)
    # The Red Hat family is SELinux-enforcing: its build ends with the relabel step.
    assert p.relabels == (entry.family in ("rhel", "fedora"))


def test_cpu_floor_and_firmware_follow_the_release() -> None:
    for name in ("rocky-9", "almalinux-9", "centos-stream-9"):
        assert BUILTIN_PROFILES[name].cpu_level == "x86-64-v2"
    for name in ("rocky-10", "almalinux-10", "centos-stream-10"):
        assert BUILTIN_PROFILES[name].cpu_level == "x86-64-v3"
    for name in ("rocky-8", "almalinux-8", "ubuntu-26.04", "fedora-44", "debian-13-cloud"):
        assert BUILTIN_PROFILES[name].cpu_level is None
    assert BUILTIN_PROFILES["centos-stream-9"].firmware == "bios"
    assert BUILTIN_PROFILES["centos-stream-10"].firmware == "bios"


def test_almalinux_8_imports_its_new_key_before_any_package_operation() -> None:
    p = BUILTIN_PROFILES["almalinux-8"]
    assert "RPM-GPG-KEY-AlmaLinux" in p.customize[0] and "ced7258b" in p.customize[0]
    # It asks rpm first: offline builds of an image that has the key need no network.
    assert p.customize[0].startswith("run-command rpm -q gpg-pubkey-ced7258b")


def test_the_old_builtins_keep_their_recipes() -> None:
    assert BUILTIN_PROFILES["centos-7"].customize[0].startswith("run-command sed -i -e 's/^mirror")
    assert "vault.centos.org/8.2.2004" in BUILTIN_PROFILES["centos-8"].customize[0]
    for name in ("debian-11", "debian-12", "debian-13", "debian-12-selinux"):
        p = BUILTIN_PROFILES[name]
        assert p.cloud_image is None and p.customize == () and p.template == name


# --- aliases ----------------------------------------------------------------------------


def test_aliases_are_unique_and_never_a_profile_name() -> None:
    aliases = [a for e in catalogue.ENTRIES for a in e.aliases]
    assert len(aliases) == len(set(aliases))
    assert not set(aliases) & set(BUILTIN_PROFILES)
    for e in catalogue.ENTRIES:
        for a in e.aliases:
            assert canonical(a, BUILTIN_PROFILES) == e.name


def test_select_resolves_aliases_to_the_canonical_profile_once() -> None:
    chosen = select(["alma-9", "almalinux-9", "centosstream-9", "rockylinux-10"], BUILTIN_PROFILES)
    assert [p.name for p in chosen] == ["almalinux-9", "centos-stream-9", "rocky-10"]


def test_a_project_profile_can_extend_or_reuse_an_alias(tmp_path: Path) -> None:
    (tmp_path / "devbox.toml").write_text(
        '[distros.alma-big]\nextends = "alma-9"\nmemory_mib = 4096\n'
        "[distros.centosstream-9]\nvcpus = 4\n"
    )
    profiles = load_profiles(tmp_path)
    big = profiles["alma-big"]
    assert big.cloud_image == BUILTIN_PROFILES["almalinux-9"].cloud_image
    assert big.memory_mib == 4096
    # A project profile named like an alias is the project's, starting from its target.
    own = profiles["centosstream-9"]
    assert own.vcpus == 4 and own.cloud_image == BUILTIN_PROFILES["centos-stream-9"].cloud_image
    assert canonical("centosstream-9", profiles) == "centosstream-9"


def test_markers_and_test_ids_use_the_canonical_name(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.devbox("alma-9")
        def test_only_alma(devbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "--devbox=almalinux-9,rocky-9", "--collect-only", "-q", "-p", "no:randomly"
    )
    out = result.stdout.str()
    assert "test_only_alma[almalinux-9]" in out and "rocky-9" not in out.split("\n\n")[0]


# --- end of life ------------------------------------------------------------------------


def test_the_eol_rewrite_applies_from_the_day_after_eol() -> None:
    before = builtin_profiles(datetime.date(2026, 12, 9))["fedora-43"]
    after = builtin_profiles(datetime.date(2026, 12, 10))["fedora-43"]
    assert before.customize == ()
    assert after.customize == (catalogue.FEDORA_ARCHIVE,)
    assert "archives.fedoraproject.org/pub/archive/fedora/linux/" in after.customize[0]
    assert not after.needs_network  # a sed: the offline build of a cached image still works
    for name in ("fedora-40", "fedora-41", "fedora-42"):  # long past EOL
        assert BUILTIN_PROFILES[name].customize == (catalogue.FEDORA_ARCHIVE,)
    assert eol_warning(before, datetime.date(2026, 12, 9)) is None
    warning = eol_warning(after, datetime.date(2026, 12, 10))
    assert warning is not None and "fedora-43" in warning and "2026-12-09" in warning


def test_an_eol_distro_warns_in_the_pytest_header_and_summary(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain(): pass")
    cache = pytester.path / "cache"
    result = pytester.runpytest_subprocess(
        "--devbox=fedora-41,debian-12", f"--devbox-cache={cache}", "-p", "no:randomly"
    )
    assert result.ret == 0
    warned = [line for line in result.outlines if "end of life" in line]
    # Once in the header, once in the summary; debian-12 is supported.
    assert len(warned) == 2 and all("fedora-41" in w and "2025-12-15" in w for w in warned)


def test_an_eol_distro_warns_on_the_command_line(tmp_path: Path) -> None:
    r = devbox("build", "--dry-run", "--offline", "--cache", str(tmp_path), "fedora-41")
    assert r.returncode == 0, r.stderr
    assert "warning: fedora-41 reached its end of life on 2025-12-15" in r.stderr


# --- offline ------------------------------------------------------------------------------


def test_offline_without_the_image_is_a_one_line_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(devbox): raise AssertionError('ran')")
    cache = pytester.path / "cache"
    result = pytester.runpytest_subprocess(
        "--devbox=rocky-9", "--devbox-offline", f"--devbox-cache={cache}"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.strip()]
    url = BUILTIN_PROFILES["rocky-9"].cloud_image
    assert errors == [
        f"ERROR: devbox: rocky-9 needs a download from {url}; run with network once, "
        "or `devbox image import FILE --distro rocky-9`"
    ]
    assert "ran" not in result.stdout.str()
    assert not (cache / "runs").exists()  # no guest was ever prepared


def test_offline_with_the_image_imported_passes_the_check(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    p = BUILTIN_PROFILES["rocky-9"]
    assert cache_state(p, cache) == "-" and offline_problem(p, cache) is not None
    # What an import leaves: the template in the local repository's index.
    index = cache / "templates" / "index"
    index.parent.mkdir(parents=True)
    index.write_text("[rocky-9]\nname=r\narch=x86_64\nfile=rocky-9.qcow2.xz\nrevision=1\n")
    assert cache_state(p, cache) == "imported" and offline_problem(p, cache) is None
    # A built image is enough too; one of another distro with a longer name is not.
    (cache / "images").mkdir()
    (cache / "images" / "rocky-9-x-0123456789abcdef.qcow2").touch()
    assert cache_state(BUILTIN_PROFILES["rocky-10"], cache) == "-"
    (cache / "images" / "rocky-10-0123456789abcdef.qcow2").touch()
    assert cache_state(BUILTIN_PROFILES["rocky-10"], cache) == "built"
    # Not a download at all: virt-builder templates and file:// images.
    assert offline_problem(BUILTIN_PROFILES["debian-12"], tmp_path / "empty") is None


# --- devbox build --dry-run ----------------------------------------------------------------


def test_dry_run_of_the_vendor_distros_offline(tmp_path: Path) -> None:
    names = ["rocky-9", "almalinux-9", "centos-stream-9", "ubuntu-24.04", "fedora-44",
             "debian-13-cloud", "debian-13"]  # fmt: skip
    r = devbox("build", "--dry-run", "--offline", "--cache", str(tmp_path), *names)
    assert r.returncode == 0, r.stderr
    plans = r.stdout.split("\n\n")
    assert [p.splitlines()[0].split(":")[0] for p in plans] == [f"# {n}" for n in names]
    for name, text in zip(names, plans):
        profile = BUILTIN_PROFILES[name]
        if profile.cloud_image is None:  # debian-13: the local mmdebstrap template
            assert "# cloud image" not in text
            continue
        entry = catalogue.BY_NAME[name]
        image_dir = entry.image.rsplit("/", 1)[0]
        assert f"# cloud image {entry.image}\n" in text
        assert f"# latest      {entry.latest}\n" in text
        assert f"# checksum    {image_dir}/{entry.checksum_file} ({entry.checksum_format}," in text
        assert f"# digest      {entry.digest} " in text
        assert "in the cache: not yet (a download)" in text
        # The template is the import's: no network index is asked about its name.
        assert "# template revision: made by the import, on the first run\n" in text
        assert "# cache key known after the import" in text
        assert "builder.libguestfs.org" not in text
        assert re.search(r"^# commands file .*\.commands:$", text, re.MULTILINE)
        assert "$ " in text and "--commands-from-file" in text
    assert not (tmp_path / "images").exists()


# --- devbox catalog -------------------------------------------------------------------------


def test_catalog_lists_every_builtin_with_its_facts(tmp_path: Path) -> None:
    r = devbox("catalog", "--cache", str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == [
        "NAME", "FAMILY", "RELEASE", "SOURCE", "SHARE", "FIRMWARE", "CPU", "EOL", "CACHE",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(BUILTIN_PROFILES) <= set(rows)
    assert rows["rocky-10"] == [
        "rocky-10", "rhel", "10.2", "cloud", "image", "virtiofs", "bios", "x86-64-v3",
        "2035-05-31", "-",
    ]  # fmt: skip
    assert rows["centos-7"][1:4] == ["rhel", "7", "virt-builder"]


@contextlib.contextmanager
def vendor_like_server() -> Iterator[str]:
    """/img.qcow2 is there, /gone.qcow2 is not (404), /old.qcow2 redirects to
    another file (moved), /mirror/img.qcow2 to the same file elsewhere (a mirror)."""

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            if self.path == "/img.qcow2":
                self.send_response(200)
                self.send_header("Content-Length", "4")
            elif self.path == "/old.qcow2":
                self.send_response(301)
                self.send_header("Location", "/img.qcow2")
            elif self.path == "/mirror/img.qcow2":
                self.send_response(302)
                self.send_header("Location", "/img.qcow2")
            else:
                self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_catalog_check_reports_ok_moved_vanished_unreachable(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{closed_port()}/x.qcow2"
    with vendor_like_server() as base:
        (tmp_path / "devbox.toml").write_text(
            f'[distros.vendor-a]\ncloud_image = "{base}/img.qcow2"\n'
            f'cloud_image_latest = "{base}/gone.qcow2"\nchecksum_url = "SHA256SUMS"\n'
            f'[distros.vendor-b]\ncloud_image = "{base}/old.qcow2"\n'
            f'cloud_image_latest = "{base}/mirror/img.qcow2"\n'
            f'[distros.vendor-c]\ncloud_image = "{dead}"\n'
        )
        r = devbox("catalog", "--check", "--cache", str(tmp_path / "cache"),
                   "--project", str(tmp_path), "vendor-a", "vendor-b", "vendor-c")  # fmt: skip
    assert r.returncode == 1, r.stderr
    verdicts = {
        line.split()[1]: line.split()[0] for line in r.stdout.split("\n\n")[1].splitlines()[:-1]
    }
    assert verdicts == {
        f"{base}/img.qcow2": "ok",
        f"{base}/gone.qcow2": "vanished",
        f"{base}/old.qcow2": "moved",
        f"{base}/mirror/img.qcow2": "ok",
        dead: "unreachable",
    }
    assert f"moved       {base}/old.qcow2 (now {base}/img.qcow2)" in r.stdout
    assert r.stdout.splitlines()[-1] == "2 of 5 vendor URLs answer"


def test_catalog_check_of_the_real_vendors_here_says_unreachable(tmp_path: Path) -> None:
    r = devbox("catalog", "--check", "--timeout", "3", "--cache", str(tmp_path), "rocky-9")
    assert r.returncode == 1
    checks = r.stdout.split("\n\n")[1].splitlines()
    p = BUILTIN_PROFILES["rocky-9"]
    assert [c.split()[:2] for c in checks[:-1]] == [
        ["unreachable", p.cloud_image],
        ["unreachable", p.cloud_image_latest],
    ]
