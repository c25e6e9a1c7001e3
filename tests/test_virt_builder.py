"""virt-builder plumbing: repositories, config dir, env, index reads, runs that fail."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from index_server import serve

from pytest_devbox.config.profiles import BUILTIN_PROFILES, Profile
from pytest_devbox.errors import ImageBuildError
from pytest_devbox.host.layout import CacheLayout
from pytest_devbox.image.virt_builder import PUBLIC_INDEX, VirtBuilder, read_index, redact

INDEX = (
    "[debian-12]\nfile=debian-12.qcow2.xz\narch=x86_64\nrevision=3\nsize=4294967296\nformat=qcow2\n"
)


def builder(root: Path, **kw: object) -> VirtBuilder:
    kw.setdefault("public_index", False)
    return VirtBuilder(CacheLayout(root), **kw)  # type: ignore[arg-type]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "cache"
    (r / "templates").mkdir(parents=True)
    (r / "templates" / "index").write_text(INDEX)
    return r


def test_config_dir_holds_only_the_wanted_repos(root: Path, tmp_path: Path) -> None:
    def confs(b: VirtBuilder, p: Profile | None = None) -> list[str]:
        env = b.env(p)
        assert env["VIRT_BUILDER_DIRS"] == env["XDG_CONFIG_HOME"]
        d = Path(env["VIRT_BUILDER_DIRS"]) / "virt-builder" / "repos.d"
        assert d.parent.parent.parent == b.layout.builder_config
        return [f.read_text() for f in sorted(d.glob("*.conf"))]

    local = f"uri={(root / 'templates' / 'index').as_uri()}\n"
    offline = confs(builder(root))
    assert len(offline) == 1 and offline[0].endswith(local)
    online = confs(builder(root, public_index=True))
    assert online[0].endswith(local)
    assert online[1].startswith(f"[libguestfs.org]\nuri={PUBLIC_INDEX}\n")
    assert PUBLIC_INDEX == "https://builder.libguestfs.org/index.asc"
    extra = tmp_path / "repo" / "index"
    p = replace(BUILTIN_PROFILES["debian-12"], repos=("https://example.org/index.asc",))
    three = confs(builder(root, repos=[str(extra)]), p)
    assert [t.splitlines()[1] for t in three] == [
        local.strip(),
        f"uri={extra.as_uri()}",
        "uri=https://example.org/index.asc",
    ]
    # Without a local repo nothing local is configured.
    assert confs(builder(tmp_path / "empty", public_index=True))[0].splitlines()[1] == (
        f"uri={PUBLIC_INDEX}"
    )
    env = builder(root).env()
    assert env["LIBGUESTFS_BACKEND_SETTINGS"] == "force_tcg"
    assert "LIBGUESTFS_BACKEND_SETTINGS" not in builder(root, tcg=False).env()


def test_read_index_says_why_an_index_is_unusable(tmp_path: Path) -> None:
    index = tmp_path / "index"
    index.write_text(INDEX)
    good = read_index(index.as_uri())
    assert good.problem == "" and good.sections == (("debian-12", {
        "file": "debian-12.qcow2.xz", "arch": "x86_64", "revision": "3",
        "size": "4294967296", "format": "qcow2",
    }),)  # fmt: skip
    index.write_text("<html>captive portal</html>\n")
    garbage = read_index(index.as_uri())
    assert garbage.sections is None and "is not a virt-builder index" in garbage.problem
    index.unlink()
    missing = read_index(index.as_uri())
    assert missing.sections is None and "cannot be read" in missing.problem


def test_each_index_is_downloaded_once_per_builder(root: Path) -> None:
    p = BUILTIN_PROFILES["debian-12"]
    with serve(INDEX) as server:
        b = builder(root, repos=[server.uri])
        first = b.indexes(p)
        server.body = b"garbage\n"  # what a later download would get
        assert b.indexes(p) == first and b.index(server.uri) == first[1]
        assert server.hits == 1
        assert builder(root, repos=[server.uri]).index(server.uri).sections is None


def test_failed_run_explains_a_missing_template(root: Path, tmp_path: Path) -> None:
    b = builder(root)
    p = Profile(name="nope", template="no-such-template")
    logs: list[str] = []
    with pytest.raises(ImageBuildError) as e:
        b.run(p, b.argv(p, tmp_path / "out.qcow2", tmp_path / "none", tmp_path / "k"), logs.append)
    msg = str(e.value)
    assert "virt-builder failed" in msg and "'no-such-template'" in msg
    assert "is in none of the configured virt-builder repositories" in msg, msg
    assert all(line.startswith("[nope] ") for line in logs) and logs


def test_unreadable_message_names_the_index_and_the_way_out(root: Path) -> None:
    b = builder(root, public_index=True, repos=["/nowhere/index"])
    p = BUILTIN_PROFILES["debian-12"]
    bad = [r for r in b.indexes(p) if r.sections is None]
    assert [r.uri for r in bad] == ["file:///nowhere/index", PUBLIC_INDEX]
    msg = b.unreadable_message(p, bad)
    assert "file:///nowhere/index cannot be read" in msg
    assert "--devbox-offline" in msg and "--devbox-repo" in msg


# virt-builder 1.48's real output of a build (Debian 12), password line included.
OUTPUT = Path(__file__).parent / "data" / "virt-builder-output.txt"
PASSWORD = "0FbqAmh1qqTy5eCT"


@pytest.mark.parametrize("exit_status", [0, 1], ids=["success", "failure"])
def test_the_root_password_never_reaches_the_log_or_the_error(root: Path, exit_status: int) -> None:
    # The real run loop over virt-builder's real output: the line must come through (so
    # the check cannot pass by the line being absent), with the password hidden.
    assert PASSWORD in OUTPUT.read_text()
    b = builder(root)
    logs: list[str] = []
    argv = ["sh", "-c", f'cat "$0"; exit {exit_status}', str(OUTPUT)]
    if exit_status:
        with pytest.raises(ImageBuildError) as e:
            b.run(BUILTIN_PROFILES["debian-12"], argv, logs.append)
        assert PASSWORD not in str(e.value)
        assert "random password of root to <hidden>" in str(e.value)
    else:
        b.run(BUILTIN_PROFILES["debian-12"], argv, logs.append)
    assert "[debian-12] virt-builder: Setting random password of root to <hidden>" in logs
    assert not [line for line in logs if PASSWORD in line]
    assert len(logs) == len(OUTPUT.read_text().splitlines())
    assert redact("nothing to hide") == "nothing to hide"
