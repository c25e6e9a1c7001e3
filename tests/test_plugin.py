"""The pytest plugin seen from a user's pytest run (pytester; no guest boots here)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from pytest_devbox.host.layout import default_cache_dir
from pytest_devbox.plugin.hooks import state_key

BAD_URI = "qemu:///system?socket=/nonexistent"
# Read before any test changes the environment: the VM tier uses the real image cache.
REAL_CACHE = default_cache_dir()

TESTS = """
import pytest

def test_shared(devbox):
    pass

def test_fresh(devbox_fresh):
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_param(devbox, n):
    pass

@pytest.mark.devbox("debian-12")
def test_only_12(devbox):
    pass

@pytest.mark.devbox(exclude=["debian-12"])
def test_not_12(devbox):
    pass

def test_plain():
    pass
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The developer's own settings must not leak into the inner pytest runs.
    monkeypatch.delenv("PYTEST_DEVBOX", raising=False)
    monkeypatch.setenv("PYTEST_DEVBOX_CACHE", str(tmp_path / "cache"))


def header(result: pytest.RunResult) -> list[str]:
    # The /code ids line and the end-of-life warnings (debian-11's passed on 2026-08-31)
    # have tests of their own (test_code_ids.py, test_catalogue*.py).
    lines = [line for line in result.outlines if line.startswith("devbox:")]
    return [
        line
        for line in lines
        if not line.startswith("devbox: /code ids:") and "reached its end of life" not in line
    ]


def collected(result: pytest.RunResult) -> list[str]:
    return [line for line in result.outlines if "::" in line]


# --- selection: command line, env, ini ---------------------------------------------------


def test_ids_are_the_distro_names(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TESTS)
    result = pytester.runpytest("--collect-only", "-q", "--devbox=debian-11,debian-12")
    assert result.ret == 0
    # Each distro's tests run together (the distro is a session-scoped parameter).
    assert collected(result) == [
        "test_ids_are_the_distro_names.py::test_shared[debian-11]",
        "test_ids_are_the_distro_names.py::test_fresh[debian-11]",
        "test_ids_are_the_distro_names.py::test_param[debian-11-1]",
        "test_ids_are_the_distro_names.py::test_param[debian-11-2]",
        "test_ids_are_the_distro_names.py::test_not_12[debian-11]",
        "test_ids_are_the_distro_names.py::test_shared[debian-12]",
        "test_ids_are_the_distro_names.py::test_fresh[debian-12]",
        "test_ids_are_the_distro_names.py::test_param[debian-12-1]",
        "test_ids_are_the_distro_names.py::test_param[debian-12-2]",
        "test_ids_are_the_distro_names.py::test_only_12[debian-12]",
        "test_ids_are_the_distro_names.py::test_plain",
    ]


def test_header_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile("def test_plain(): pass")
    cache = tmp_path / "elsewhere"
    result = pytester.runpytest(
        "--devbox=debian-11,debian-12",
        "--devbox-uri=test:///default",
        f"--devbox-cache={cache}",
        "--devbox-accel=tcg",
    )
    result.assert_outcomes(passed=1)
    assert header(result) == [
        f"devbox: uri=test:///default accel=tcg distros=debian-11,debian-12 cache={cache}"
    ]


def _kvm_really_works() -> bool:
    """The README's rule for `auto`, read off this host's facts (not host/probes.py's code): an
    x86_64 host with a usable /dev/kvm from kvm_intel or kvm_amd, not PVM."""
    sysfs = Path("/sys/module")
    return (
        platform.machine() == "x86_64"
        and os.access("/dev/kvm", os.R_OK | os.W_OK)
        and ((sysfs / "kvm_intel").exists() or (sysfs / "kvm_amd").exists())
        and not (sysfs / "kvm_pvm").exists()
    )


def test_header_defaults_and_auto_accel(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest("--devbox=debian-12")
    accel = "kvm" if _kvm_really_works() else "tcg"
    assert header(result) == [
        f"devbox: uri=qemu:///system accel={accel} distros=debian-12 cache={tmp_path / 'cache'}"
    ]


def test_no_header_without_distros(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert header(result) == []
    assert "= devbox =" not in result.stdout.str()


def test_ini_options(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        devbox = debian-11, debian-12
        devbox_uri = test:///default
        devbox_cache = cachedir
        devbox_accel = tcg
        """
    )
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest()
    # A relative ini path is relative to the ini file.
    assert header(result) == [
        "devbox: uri=test:///default accel=tcg distros=debian-11,debian-12 "
        f"cache={pytester.path / 'cachedir'}"
    ]


def test_precedence_command_line_env_ini(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\ndevbox = debian-10\ndevbox_uri = test:///default\n")
    pytester.makepyfile(TESTS)

    def ids(*args: str) -> list[str]:
        result = pytester.runpytest("--collect-only", "-q", *args)
        assert result.ret == 0, result.stdout.str()
        shared = [line for line in collected(result) if "::test_shared[" in line]
        return [line.split("[")[1].rstrip("]") for line in shared]

    assert ids() == ["debian-10"]
    monkeypatch.setenv("PYTEST_DEVBOX", "debian-11")
    assert ids() == ["debian-11"]
    assert ids("--devbox=debian-12") == ["debian-12"]
    # An explicit empty --devbox selects nothing, whatever env and ini say.
    assert ids("--devbox=") == []
    result = pytester.runpytest("--devbox-uri=test:///other", "--devbox=debian-12")
    assert header(result)[0].startswith("devbox: uri=test:///other ")


def test_ini_booleans_and_code_dir_are_checked(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ndevbox = debian-12\ndevbox_code_dir = src\ndevbox_keep = true\n")
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*code dir {pytester.path / 'src'} does not exist*"])
    (pytester.path / "src").mkdir()
    pytester.runpytest().assert_outcomes(passed=1)
    settings = pytester.parseconfigure().stash[state_key].settings
    assert (settings.keep, settings.code_dir) == (True, pytester.path / "src")
    # (That keep reaches the guest: test_option_wiring.py.)


# --- usage errors: exit code 4 before anything boots --------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devbox=nosuch"], "*unknown distro 'nosuch'; known distros: *debian-11, debian-12*"),
        (["--devbox=debian-12,,debian-11"], "*contains an empty distro name*"),
        (["--devbox=debian-12", "--devbox-accel=fast"], "*unknown accel 'fast'*auto, kvm or tcg*"),
        (["--devbox-code-dir=does-not-exist"], "*code dir */does-not-exist does not exist*"),
    ],
    ids=["unknown-distro", "empty-name", "bad-accel", "missing-code-dir"],
)
def test_usage_errors(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_unknown_distro_from_env_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_DEVBOX", "debian-12,centos-99")
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown distro 'centos-99'; known distros: *centos-7*"])


def test_malformed_user_profile(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(
        """
        [tool.pytest-devbox.distros.mine]
        extends = "debian-12"
        memory = 2048
        """
    )
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*profile 'mine': unknown field 'memory'*"])


def test_user_profile_joins_all(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(
        """
        [tool.pytest-devbox.distros.debian-11-9p]
        extends = "debian-11"
        share = "9p"
        """
    )
    pytester.makepyfile("def test_shared(devbox): pass")
    result = pytester.runpytest("--collect-only", "-q", "--devbox=all")
    ids = [line.split("[", 1)[1].rstrip("]") for line in collected(result)]
    assert "debian-11-9p" in ids
    assert {"centos-7", "debian-11", "debian-12", "fedora-42"} <= set(ids)
    result = pytester.runpytest("--collect-only", "-q", "--devbox=debian-11-9p")
    assert collected(result) == ["test_user_profile_joins_all.py::test_shared[debian-11-9p]"]


# --- marker -----------------------------------------------------------------------------


def test_marker_on_class_and_function_narrow_each_other(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.devbox("debian-11", "debian-12")
        class TestDebian:
            def test_both(self, devbox):
                pass

            @pytest.mark.devbox(exclude="debian-11")
            def test_twelve(self, devbox):
                pass
        """
    )
    result = pytester.runpytest("--collect-only", "-q", "--devbox=centos-8,debian-11,debian-12")
    assert [line.split("::", 1)[1] for line in collected(result)] == [
        "TestDebian::test_both[debian-11]",
        "TestDebian::test_both[debian-12]",
        "TestDebian::test_twelve[debian-12]",
    ]


def test_marker_leaving_no_distro_skips_with_reason(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TESTS)
    result = pytester.runpytest(
        "-rs", "-k", "only_12 or not_12", f"--devbox-uri={BAD_URI}", "--devbox=debian-11"
    )
    # test_not_12[debian-11] needs a guest: it fails on the unreachable libvirt, which
    # is not what this test is about; test_only_12 must not even try.
    result.stdout.fnmatch_lines(
        ["SKIPPED * the devbox marker (only debian-12) excludes every selected distro (debian-11)"]
    )
    assert "test_only_12" not in "\n".join(line for line in result.outlines if "FAILED" in line)


def test_marker_with_unknown_distro_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.devbox("debian-12", "debain-11")
        def test_typo(devbox):
            pass
        """
    )
    result = pytester.runpytest("--devbox=debian-12")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        ["*@pytest.mark.devbox names unknown distro 'debain-11'; known distros: *debian-11*"]
    )


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.devbox(*distros, exclude=()):*"])
    pytester.makepyfile("import pytest\n@pytest.mark.devbox('debian-12')\ndef test_plain(): pass\n")
    pytester.runpytest("--strict-markers").assert_outcomes(passed=1)


# --- without a distro: skip, and never touch libvirt --------------------------------------


def test_skipped_without_distro_and_no_libvirt(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        TESTS
        + """
def test_pool(devbox_pool):
    pass

def test_nothing_heavy_imported():
    import sys
    assert "libvirt" not in sys.modules
    assert "paramiko" not in sys.modules
    assert "pytest_devbox.pool.pool" not in sys.modules
"""
    )
    result = pytester.runpytest_subprocess("-rs", f"--devbox-uri={BAD_URI}")
    result.assert_outcomes(passed=2, skipped=7)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED [[]*] *: no devbox distro selected: run with --devbox=debian-12 "
            "(or set PYTEST_DEVBOX / the devbox ini option)"
        ]
    )


def test_unreachable_libvirt_fails_the_tests_once(pytester: pytest.Pytester) -> None:
    """With a distro selected and libvirt gone, tests error out clearly; no retry storm."""
    pytester.makepyfile(
        """
        import pytest

        def test_one(devbox):
            pass

        def test_two(devbox):
            pass

        @pytest.mark.skip(reason="not today")
        def test_three(devbox):
            pass
        """
    )
    # -rN: no short summary, whose lines are cut to the terminal's width except in CI.
    result = pytester.runpytest_subprocess(f"--devbox-uri={BAD_URI}", "--devbox=debian-12", "-rN")
    result.assert_outcomes(errors=2, skipped=1)
    # One attempt: pytest keeps the session fixture's error and gives it to every test.
    assert result.stdout.str().count("devbox: could not start debian-12: libvirtd") == 2
    result.stdout.fnmatch_lines(
        [
            "*devbox: could not start debian-12: *",
            "*devbox: could not start debian-12: *",
            "*= devbox =*",
            "distro * boots * boot * image * passed * failed * skipped",
            "debian-12 * 0 * - * - * 0 * 2 * 1",
        ]
    )


# --- -p no:devbox -------------------------------------------------------------------------


def test_disabled_plugin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_shared(devbox): pass\ndef test_plain(): pass\n")
    result = pytester.runpytest("-p", "no:devbox", "--devbox=debian-12")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unrecognized arguments: --devbox=debian-12*"])
    result = pytester.runpytest("-p", "no:devbox")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'devbox' not found*"])


# --- VM tier: a real guest ----------------------------------------------------------------


@pytest.mark.vm
def test_failed_test_reports_console_and_commands(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_passes(devbox):
            assert devbox.run("echo hello").stdout == "hello\\n"

        def test_fails(devbox):
            devbox.run("echo about to fail")
            devbox.run("exit 3")
        """
    )
    result = pytester.runpytest_subprocess(
        "--devbox=debian-12", "--devbox-offline", f"--devbox-cache={REAL_CACHE}"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*CommandFailed: command `exit 3` exited with status 3*",
            "*- devbox debian-12 console -*",
            "*- devbox debian-12 commands -*",
            "exit    0 * s  echo hello",
            "exit    0 * s  echo about to fail",
            "exit    3 * s  exit 3",
            "*= devbox =*",
            "debian-12 * 1 * s * 1 * 1 * 0",
        ]
    )


def test_fixtures_of_any_scope_may_use_devbox(pytester: pytest.Pytester) -> None:
    """A user's session- or module-scoped fixture on `devbox` is no ScopeMismatch; with
    libvirt unreachable each fails with the start error (the VM tier counts real runs)."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="session")
        def built(devbox):
            return devbox

        @pytest.fixture(scope="module")
        def prepared(devbox):
            return devbox

        def test_session(built):
            pass

        def test_module(prepared):
            pass
        """
    )
    # -rN: no short summary, whose lines are cut to the terminal's width except in CI.
    result = pytester.runpytest_subprocess(f"--devbox-uri={BAD_URI}", "--devbox=debian-12", "-rN")
    result.assert_outcomes(errors=2)
    assert "ScopeMismatch" not in result.stdout.str()
    assert result.stdout.str().count("devbox: could not start debian-12: libvirtd") == 2


def test_an_empty_devbox_flag_says_so_in_the_header(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(devbox): pass")
    r = pytester.runpytest("--devbox=", "-p", "no:cacheprovider")
    r.stdout.fnmatch_lines(["devbox: no distro selected (--devbox= is empty)*skipped"])
    r.assert_outcomes(skipped=1)
