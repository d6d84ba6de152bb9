"""The entry points as a user meets them: ``pytest cases`` and ``qiotests doctor``.

A configuration problem is one plain line and a non-zero exit, never a Python traceback.
Runs happen in subprocesses, in the real checkout, with the QEMU_* variables cleared.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.binaries import ROLES
from tests.conftest import REPO, fake_program, unpacked_qemu

BIN = Path(sys.executable).parent
QEMU_10 = unpacked_qemu()


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in {r.env for r in ROLES} | {"QEMU_BUILD_DIR", "PYTEST_ADDOPTS"}
             and not k.startswith("PYTEST_XDIST")}
    clean.update(env)
    return subprocess.run(argv, cwd=REPO, env=clean, capture_output=True, text=True,
                          timeout=120, check=False)


def lines(cp: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in (cp.stdout + cp.stderr).splitlines() if ln.strip()]


def assert_one_line_error(cp: subprocess.CompletedProcess[str], *words: str) -> str:
    out = lines(cp)
    assert "Traceback" not in cp.stdout + cp.stderr
    assert len(out) == 1, out
    for w in words:
        assert w in out[0], out
    return out[0]


def pytest_cmd(*args: str) -> list[str]:
    return [str(BIN / "pytest"), "cases", "-p", "no:cacheprovider", *args]


def test_pytest_with_qemu_prog_missing() -> None:
    cp = run(pytest_cmd("-q"), QEMU_PROG="/nonexistent")
    assert cp.returncode == pytest.ExitCode.USAGE_ERROR
    line = assert_one_line_error(cp, "QEMU_PROG", "/nonexistent")
    assert line == "ERROR: QEMU_PROG=/nonexistent: no executable file there"


def test_pytest_with_an_option_naming_a_missing_program() -> None:
    cp = run(pytest_cmd("-q", "--qemu-img", "/nonexistent/qemu-img"))
    assert cp.returncode == pytest.ExitCode.USAGE_ERROR
    assert_one_line_error(cp, "--qemu-img /nonexistent/qemu-img")


def test_pytest_with_a_qemu_build_that_does_not_exist() -> None:
    cp = run(pytest_cmd("-q", "--qemu-build", "/nonexistent/build"))
    assert cp.returncode == pytest.ExitCode.USAGE_ERROR
    assert_one_line_error(cp, "--qemu-build /nonexistent/build", "no such directory")


def test_pytest_accel_kvm_where_kvm_is_not_usable(qemu_system: str) -> None:
    cp = run(pytest_cmd("-q", "--accel", "kvm", "--collect-only"))
    if cp.returncode == 0:
        pytest.skip("KVM is usable on this machine: --accel kvm is no error here")
    assert cp.returncode == pytest.ExitCode.USAGE_ERROR
    line = assert_one_line_error(cp, "--accel kvm")
    assert re.fullmatch(r"ERROR: --accel kvm: KVM is not usable on this machine: .+", line)


def test_pytest_unknown_option_is_pytests_usage_error() -> None:
    cp = run(pytest_cmd("--no-such-option"))
    assert cp.returncode == pytest.ExitCode.USAGE_ERROR
    assert "usage: pytest [options]" in cp.stderr
    assert "unrecognized arguments: --no-such-option" in cp.stderr
    assert "Traceback" not in cp.stderr


def test_pytest_options_are_documented(qemu_system: str) -> None:
    cp = run([str(BIN / "pytest"), "--help"])
    assert cp.returncode == 0
    for option in ("--qemu-build=DIR", "--accel", "--regen",
                   *(r.option + "=PATH" for r in ROLES)):
        assert option in cp.stdout, option


def test_pytest_help_works_without_qemu() -> None:
    cp = run([str(BIN / "pytest"), "--help"], QEMU_PROG="/nonexistent")
    assert cp.returncode == 0
    assert "--qemu-build=DIR" in cp.stdout


def qemu_version(qemu: str) -> str:
    cp = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                        check=True)
    m = re.search(r"version (\d+\.\d+\.\d+)", cp.stdout)
    assert m is not None
    return m.group(1)


def test_doctor(qemu_system: str) -> None:
    cp = run([str(BIN / "qiotests"), "doctor"])
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout.splitlines()
    assert out[0].startswith(f"qemu: {qemu_version(qemu_system)} (")
    assert out[1].startswith("accel: ")
    assert any(re.fullmatch(r"qmp commands: \d+", ln) for ln in out)
    assert "  + blockdev-add" in out and "  + block-dirty-bitmap-add" in out
    assert cp.stderr == ""


def test_doctor_with_qemu_prog_missing() -> None:
    cp = run([str(BIN / "qiotests"), "doctor"], QEMU_PROG="/nonexistent")
    assert cp.returncode == 1
    assert cp.stdout == ""
    line = assert_one_line_error(cp, "QEMU_PROG")
    assert line == "qiotests doctor: QEMU_PROG=/nonexistent: no executable file there"


def test_doctor_with_a_build_dir() -> None:
    if not (QEMU_10 / "usr" / "bin" / "qemu-system-x86_64").exists():
        pytest.skip(f"no unpacked QEMU in {QEMU_10} (make qemu-versions)")
    cp = run([str(BIN / "qiotests"), "doctor", "--qemu-build", str(QEMU_10)])
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith(f"qemu: {QEMU_10.name} (")
    assert f"qemu-img: {QEMU_10}/usr/bin/qemu-img [build dir {QEMU_10}]" in cp.stdout


def test_doctor_with_a_program_that_is_not_qemu(tmp_path: Path) -> None:
    fake = fake_program(tmp_path / "not-qemu", "exit 0")
    cp = run([str(BIN / "qiotests"), "doctor"], QEMU_PROG=str(fake))
    assert cp.returncode == 1
    assert_one_line_error(cp, str(fake))
