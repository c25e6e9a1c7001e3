"""The recipe: commands file, hostname and cache key as pure functions of a profile."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pytest_devbox.config.profiles import BUILTIN_PROFILES, Profile
from pytest_devbox.image import recipe

USER = ("devbox", 1000, 1000)
PUB = Path("/k/id_ed25519.pub")
VIRTIOFS = "append-line /etc/fstab:/code /code virtiofs defaults,nofail 0 0"
NINEP = (
    "append-line /etc/fstab:/code /code 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0"
)


def test_dotted_names_make_valid_hostnames() -> None:
    assert recipe.hostname(BUILTIN_PROFILES["ubuntu-18.04"]) == "devbox-ubuntu-18-04"
    assert recipe.hostname(Profile("a_b.c", "t")) == "devbox-a-b-c"


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (VIRTIOFS, "virtiofs"),
        (NINEP, "9p"),
        ("append-line /etc/fstab:/code /code 9p trans=virtio 0 0", "9p"),
        ("append-line /etc/fstab:/srv /srv nfs defaults 0 0", None),
        ("append-line /etc/hosts:/code /code 9p", None),
        ("run-command echo /etc/fstab:/code /code 9p >> /etc/fstab", None),
        ("mkdir /code", None),
    ],
)
def test_code_mount_type(line: str, kind: str | None) -> None:
    assert recipe.code_mount_type(line) == kind


def test_the_share_decides_the_fstab_line() -> None:
    p = Profile("p", "debian-12", customize=("mkdir /opt/x",))
    assert recipe.commands(p, USER, PUB)[:3] == ["mkdir /opt/x", "mkdir /code", VIRTIOFS]
    assert recipe.commands(replace(p, share="9p"), USER, PUB)[:3] == [
        "mkdir /opt/x",
        "mkdir /code",
        NINEP,
    ]


def test_a_profile_line_for_its_own_share_stands_one_for_another_is_dropped() -> None:
    own = "append-line /etc/fstab:/code /code 9p trans=virtio 0 0"
    p = Profile("p", "debian-11", share="9p", customize=(own,))
    lines = recipe.commands(p, USER, PUB)
    assert own in lines and NINEP not in lines  # the profile's own line, alone
    # Extended with the other share, the inherited 9p line would mount the wrong thing.
    other = recipe.commands(replace(p, name="pv", share="virtiofs"), USER, PUB)
    assert own not in other and VIRTIOFS in other
    assert [c for c in other if recipe.code_mount_type(c)] == [VIRTIOFS]


def test_centos7_mounts_code_once_with_the_full_9p_options() -> None:
    lines = recipe.commands(BUILTIN_PROFILES["centos-7"], USER, PUB)
    assert [c for c in lines if recipe.code_mount_type(c)] == [NINEP]
    assert "append-line /etc/fstab:" + recipe.FSTAB_LINES["9p"] == NINEP


def test_commands_text_is_the_lines_one_per_line() -> None:
    p = BUILTIN_PROFILES["debian-12"]
    text = recipe.commands_text(p, USER, PUB)
    assert text.endswith("\n") and text.splitlines() == recipe.commands(p, USER, PUB)
    assert f"ssh-inject devbox:file:{PUB}" in text


def test_key_is_stable_and_ignores_the_key_file_path() -> None:
    p = BUILTIN_PROFILES["debian-12"]
    revs = [["file:///i", "x86_64", "3", "ab"]]
    k = recipe.key(p, revisions=revs, guest_user=USER, public_key_text="ssh-ed25519 AAA x\n")
    assert len(k) == 16 and int(k, 16) >= 0
    same = recipe.key(p, revisions=revs, guest_user=USER, public_key_text="ssh-ed25519 AAA x")
    assert same == k
    assert recipe.key(p, revisions=[], guest_user=USER, public_key_text="ssh-ed25519 AAA x") != k
    assert recipe.IMAGE_FORMAT_VERSION == 1
