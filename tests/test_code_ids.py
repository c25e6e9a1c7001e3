"""Guest root must not be host root on the code dir (review finding 1), fast tier: the
domain XML of each id mode, the share each profile gets, the option, the header and
doctor lines, and the audit of setuid files and device nodes left in the code dir."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from test_domain import check_golden, spec_for

from pytest_devbox.config.code_ids import code_share, header_line
from pytest_devbox.config.option_table import spell_for_command
from pytest_devbox.config.profiles import BUILTIN_PROFILES
from pytest_devbox.config.resolve import Places, resolve
from pytest_devbox.errors import DomainError, ProfileError
from pytest_devbox.guest import code_audit
from pytest_devbox.host.probes import find_virtiofsd, virtiofsd_ids
from pytest_devbox.virt import domain as dom

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="makes root's setuid files and devices")

# --- the domain XML of each mode ----------------------------------------------------------

GOLDEN = {
    # The default: QEMU as root (CI) or as the caller (workstation), 9p mapped either way
    # (9p-kvm.xml and 9p-as-user.xml in test_domain.py).
    # The opt-in: guest ids passed through by a root QEMU, squashed to a caller's QEMU.
    "9p-passthrough-root.xml": spec_for("9p", "kvm", ids="passthrough"),
    "9p-passthrough-as-user.xml": spec_for(
        "9p", "tcg", ids="passthrough", run_as=(1000, 1000), qemu_is_root=False
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_xml_of_the_opt_in(name: str) -> None:
    check_golden(name, dom.build_xml(GOLDEN[name]))


@pytest.mark.parametrize("root", [True, False], ids=["qemu-root", "qemu-caller"])
def test_9p_is_mapped_by_default_whoever_runs_qemu(root: bool) -> None:
    xml = dom.build_xml(spec_for("9p", "kvm", qemu_is_root=root))
    assert 'accessmode="mapped"' in xml and 'accessmode="passthrough"' not in xml


def test_virtiofs_is_only_the_explicit_passthrough() -> None:
    with pytest.raises(DomainError, match="code-ids=passthrough"):
        spec_for("virtiofs", "kvm", ids="mapped")
    xml = dom.build_xml(spec_for("virtiofs", "kvm", ids="passthrough"))
    assert 'accessmode="passthrough"' in xml


# --- which share and mode each profile gets -----------------------------------------------


@pytest.mark.parametrize(
    ("distro", "share", "ids"),
    [
        ("debian-12", "9p", "mapped"),  # virtiofs profile, a kernel with 9p
        ("ubuntu-20.04", "9p", "mapped"),
        ("debian-10", "9p", "mapped"),  # a 9p profile stays 9p, now mapped
        ("centos-7", "9p", "mapped"),  # its kernel-plus has 9p: the profile says 9p
        ("centos-stream-9", "sync", "none"),  # RHEL-family kernel: no 9p
        ("debian-13-cloud", "sync", "none"),  # Debian's cloud kernel: no 9p
        ("fedora-42", "sync", "none"),
    ],
)
def test_the_default_share_of_each_profile(distro: str, share: str, ids: str) -> None:
    got = code_share(BUILTIN_PROFILES[distro])
    assert (got.share, got.ids) == (share, ids)
    assert got.why and share in got.describe()


def test_passthrough_keeps_the_profiles_share_and_says_so() -> None:
    got = code_share(BUILTIN_PROFILES["debian-12"], code_ids="passthrough")
    assert (got.share, got.ids) == ("virtiofs", "passthrough")
    assert "guest root is host root" in got.describe()
    assert code_share(BUILTIN_PROFILES["debian-10"], code_ids="passthrough").ids == "passthrough"


def test_sync_is_a_copy_whatever_the_mode() -> None:
    for mode in ("auto", "passthrough"):
        got = code_share(BUILTIN_PROFILES["debian-12"], "sync", mode)
        assert (got.share, got.ids) == ("sync", "none")


def test_an_extended_profile_follows_its_template() -> None:
    mine = replace(BUILTIN_PROFILES["debian-12"], name="mine", template="rocky-9")
    assert code_share(mine).share == "sync"


def test_asking_for_virtiofs_without_the_opt_in_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="code-ids=passthrough"):
        code_share(BUILTIN_PROFILES["debian-12"], "virtiofs")
    places = Places(tmp_path, tmp_path, tmp_path)
    with pytest.raises(pytest.UsageError, match="guest root would be host root"):
        resolve({"share": "virtiofs"}, lambda _: None, places, env={})
    ok = resolve({"share": "virtiofs", "code_ids": "passthrough"}, lambda _: None, places, env={})
    assert ok.settings.code_ids == "passthrough"


def test_the_option_has_an_ini_twin_and_checks_its_value(tmp_path: Path) -> None:
    places = Places(tmp_path, tmp_path, tmp_path)
    assert resolve({}, lambda _: None, places, env={}).settings.code_ids == "auto"
    ini = {"devbox_code_ids": "passthrough"}
    assert resolve({}, ini.get, places, env={}).settings.code_ids == "passthrough"
    with pytest.raises(pytest.UsageError, match="use auto or passthrough"):
        resolve({"code_ids": "root"}, lambda _: None, places, env={})


# --- the header and doctor say which mode is in force --------------------------------------


def _ids_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in result.outlines if line.startswith("devbox: /code ids:")]


@pytest.mark.parametrize("mode", ["auto", "passthrough"])
def test_the_header_names_the_mode(pytester: pytest.Pytester, tmp_path: Path, mode: str) -> None:
    pytester.makepyfile("def test_plain(): pass")
    args = ["--devbox=debian-12", "--devbox-uri=test:///default", f"--devbox-cache={tmp_path}"]
    result = pytester.runpytest(*args, f"--devbox-code-ids={mode}")
    result.assert_outcomes(passed=1)
    assert _ids_lines(result) == [f"devbox: {header_line(mode)}"]
    assert ("guest root is host root" in _ids_lines(result)[0]) == (mode == "passthrough")


DOCTOR_ARGS = ("--uri", "test:///default", "--code-ids", "passthrough")


def test_doctor_names_the_mode(tmp_path: Path) -> None:
    env = {**os.environ, "PYTEST_DEVBOX_CACHE": str(tmp_path)}
    r = subprocess.run(
        [*(sys.executable, "-m", "pytest_devbox.cli", "doctor", "--json"), *DOCTOR_ARGS],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    checks = {c["name"]: c for c in json.loads(r.stdout)}
    # Spelt for the command: its flag is --code-ids.
    assert checks["code ids"]["detail"].startswith(spell_for_command(header_line("passthrough")))
    assert "(--code-ids=passthrough): guest root is host root" in checks["code ids"]["detail"]


def test_this_hosts_virtiofsd_is_said_to_pass_ids_through(tmp_path: Path) -> None:
    daemon = find_virtiofsd()
    if daemon is None:
        pytest.skip("no virtiofsd on this host")
    said = virtiofsd_ids(daemon)
    assert said.startswith(daemon) and "translate ids" in said
    fake = tmp_path / "virtiofsd"
    fake.write_text("#!/bin/sh\necho '  --translate-uid <MAP>'\n")
    fake.chmod(0o755)
    assert virtiofsd_ids(str(fake)).endswith("can translate ids, but libvirt does not ask it to")


# --- the audit ------------------------------------------------------------------------------


def _plant(root: Path) -> None:
    """What a guest root with passthrough ids leaves behind, made here as root."""
    shutil.copy("/bin/sh", root / "x")
    os.chown(root / "x", 0, 0)
    os.chmod(root / "x", 0o4755)
    os.mknod(root / "n", 0o666 | stat.S_IFCHR, os.makedev(1, 3))


@AS_ROOT
def test_the_audit_finds_a_setuid_file_and_a_device_node(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "plain.py").write_text("")
    (tmp_path / ".git").mkdir()
    os.mknod(tmp_path / ".git" / "skipped", 0o600 | stat.S_IFBLK, os.makedev(8, 0))
    (tmp_path / "link").symlink_to("/usr/bin/passwd")  # a symlink is not followed
    before = code_audit.scan(tmp_path)
    assert before == frozenset()
    _plant(tmp_path)
    os.chmod(tmp_path / "src", 0o2755)  # a setgid directory is ordinary
    new = code_audit.appeared(before, code_audit.scan(tmp_path))
    assert [(f.path, f.kind, f.uid) for f in new] == [("n", "char device", 0), ("x", "setuid", 0)]
    lines = code_audit.summary_lines(tmp_path, new)
    assert "2 setuid/setgid file(s) or device node(s) appeared" in lines[0]
    assert lines[2].startswith("  x: setuid, owner uid 0, mode -rwsr-xr-x")


def test_what_was_there_before_is_not_reported(tmp_path: Path) -> None:
    (tmp_path / "tool").write_text("")
    os.chmod(tmp_path / "tool", 0o2755)
    first = code_audit.scan(tmp_path)
    assert [f.kind for f in first] == ["setgid"]
    assert code_audit.appeared(first, code_audit.scan(tmp_path)) == []
    assert code_audit.summary_lines(tmp_path, []) == []


@AS_ROOT
def test_the_session_summary_reports_what_appeared(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makepyfile(
        """
        import os, shutil, stat

        def test_plants():
            shutil.copy("/bin/sh", "x")
            os.chmod("x", 0o4755)
            os.mknod("n", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        """
    )
    args = ["--devbox=debian-12", "--devbox-uri=test:///default", f"--devbox-cache={tmp_path}"]
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "WARNING: 2 setuid/setgid file(s) or device node(s) appeared in the code dir *",
            "  n: char device, owner uid 0, mode crw-*",
            "  x: setuid, owner uid 0, mode -rwsr-xr-x",
        ]
    )
