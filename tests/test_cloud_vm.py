"""A vendor-like cloud image from a mirror on 127.0.0.1, end to end (tests/vendor_mirror.py):
download with progress, resume after a killed download, import, the project's examples
on a profile that names the image by URL and checksum file, a second session that
downloads nothing, and a wrong digest refused with nothing cached.

The cache is this module's own (a temporary directory): what it holds is what these
tests did. Downloading and building happen in this process (an ImageCache without the
public index, as tests/guests.py has it: this host cannot reach that index, and a
pytest session that is not offline needs it); the examples then run as a pytest session
of their own, offline as examples/pyproject.toml says, on what was imported.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from vendor_mirror import IMAGE_NAME, MirrorServer, publish, serve, vendor_image

from pytest_devbox.config.profiles import Profile, load_profiles
from pytest_devbox.config.settings import GUEST_USER
from pytest_devbox.host.layout import CacheLayout
from pytest_devbox.host.probes import resolve_accel
from pytest_devbox.image.cache import ImageCache
from pytest_devbox.image.checksums import ChecksumMismatch
from pytest_devbox.image.templates.repository import TemplateRepo

pytestmark = pytest.mark.vm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAME = "debian-13-cloud"


@dataclass
class Site:
    server: MirrorServer
    cache_dir: Path
    project: Path
    sums: dict[str, str]

    def cache(self, log: list[str]) -> ImageCache:
        return ImageCache(
            self.cache_dir,
            public_index=False,
            tcg=resolve_accel() == "tcg",
            log=log.append,
            # The guest user a pytest session of this host asks for, so the examples'
            # session finds the image under the same key.
            guest_user=(GUEST_USER, os.getuid(), os.getgid()),
        )

    def profile(self) -> Profile:
        return load_profiles(self.project)[NAME]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    image = vendor_image()  # built once per recipe into the shared cache (minutes)
    www = tmp_path_factory.mktemp("www")
    sums = publish(image, www)
    project = tmp_path_factory.mktemp("examples") / "examples"
    shutil.copytree(EXAMPLES, project, ignore=shutil.ignore_patterns("__pycache__", ".pytest*"))
    with serve(www) as server:
        # Named debian-13 as its template: the examples tell the release by the template.
        (project / "devbox.toml").write_text(
            textwrap.dedent(
                f"""
                [distros.{NAME}]
                template = "debian-13"
                cloud_image = "{server.url(IMAGE_NAME)}"
                checksum_url = "{server.url("SHA256SUMS")}"
                customize = ["install gcc,make,libc6-dev"]
                """
            )
        )
        yield Site(server, tmp_path_factory.mktemp("cache"), project, sums)


def test_a_killed_download_resumes_where_it_stopped(site: Site, tmp_path: Path) -> None:
    faults = site.server.faults
    faults.stall_after = 100 * 1024 * 1024
    faults.stall.clear()
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from pytest_devbox.image.download import download
        download({site.server.url(IMAGE_NAME)!r}, Path({str(tmp_path / IMAGE_NAME)!r}),
                 "sha256:{site.sums["sha256"]}", print, label="killed")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        assert faults.stall.wait(120), "the download never reached the stall"
        part = tmp_path / (IMAGE_NAME + ".part")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        faults.stall_after = None
        if proc.poll() is None:
            proc.kill()
    have = part.stat().st_size
    assert 0 < have <= 100 * 1024 * 1024 + (1 << 20)
    from pytest_devbox.image.download import download

    lines: list[str] = []
    ranges_before = list(site.server.ranges)
    got = download(
        site.server.url(IMAGE_NAME),
        tmp_path / IMAGE_NAME,
        "sha256:" + site.sums["sha256"],
        lines.append,
        label="resumed",
    )
    assert got.stat().st_size == Path(site.server.directory / IMAGE_NAME).stat().st_size
    assert site.server.ranges[len(ranges_before) :] == [f"bytes={have}-"]
    assert any(f"resuming {IMAGE_NAME} at" in ln for ln in lines), lines


def test_a_wrong_digest_is_refused_and_nothing_enters_the_cache(site: Site, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    wrong = "sha256:" + "0" * 64
    profile = Profile(
        name="wrong", template="wrong", cloud_image=site.server.url(IMAGE_NAME), checksum=wrong
    )
    cache = ImageCache(cache_dir, public_index=False, log=print)
    with pytest.raises(ChecksumMismatch) as e:
        cache.image_for(profile)
    assert wrong in str(e.value) and site.sums["sha256"] in str(e.value)
    assert site.server.url(IMAGE_NAME) in str(e.value)
    layout = CacheLayout(cache_dir)
    assert [p.name for p in layout.downloads.iterdir()] == [IMAGE_NAME + ".lock"]
    assert TemplateRepo(layout.templates).entries() == {}
    assert not layout.images.exists() or not list(layout.images.glob("*.qcow2"))


def test_download_with_progress_import_and_image(site: Site) -> None:
    log: list[str] = []
    gets = site.server.gets.get(IMAGE_NAME, 0)
    info = site.cache(log).image_for(site.profile())
    assert info.built and info.path.is_file()
    assert site.server.gets[IMAGE_NAME] == gets + 1
    text = "\n".join(log)
    assert f"downloading {site.server.url(IMAGE_NAME)}" in text
    assert "(100%)" in text and "MB/s" in text
    assert "imported " in text and "as template 'debian-13'" in text
    state = TemplateRepo(CacheLayout(site.cache_dir).templates).state("debian-13")
    assert state["cloud"]["digest"] == "sha256:" + site.sums["sha256"]  # type: ignore[index]


def test_the_examples_pass_and_a_second_session_downloads_nothing(site: Site) -> None:
    gets = dict(site.server.gets)
    again: list[str] = []
    info = site.cache(again).image_for(site.profile())
    assert not info.built
    # Only the checksum file is read again (has the vendor changed the image?).
    assert site.server.gets.get(IMAGE_NAME) == gets.get(IMAGE_NAME)
    assert not any("imported" in ln or "downloading" in ln for ln in again), again
    gets = dict(site.server.gets)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            f"--devbox-cache={site.cache_dir}",
            f"--devbox={NAME}",
            "-v",
            "-rs",
        ],
        cwd=site.project,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert " passed" in last and " failed" not in last and " error" not in last, last
    assert f"[{NAME}]" in r.stdout
    # The session is offline (examples/pyproject.toml): it asked the mirror nothing.
    assert site.server.gets == gets
