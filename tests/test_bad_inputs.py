"""Bad inputs and faults against the entry points, end to end, as a user meets them.

Each input runs ``pytest cases`` (what ``make check`` runs), ``pytest cases --regen`` or
``qiotests doctor`` in a subprocess, in the real checkout, with the QEMU_* variables cleared
and ``TMPDIR`` pointing at a fresh short directory of the test's own (socket and probe
directories follow it), and checks what a user would: a non-zero exit status, no Python
traceback, one line that names what is wrong, and afterwards no process of the run and no
``qio-*`` directory left. The inputs that already ended well are here too, so they stay so.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.binaries import ROLES
from tests.conftest import HANGING_WITH_CHILD, REPO, fake_program, wait_pid_gone

BIN = Path(sys.executable).parent
USAGE = pytest.ExitCode.USAGE_ERROR
REAL = {name: shutil.which(name) for name in (
    "qemu-system-x86_64", "qemu-system-i386", "qemu-img", "qemu-io", "qemu-nbd")}


@dataclass(frozen=True)
class BadInput:
    """One bad input: the command, what it must print (one line), its exit status."""

    argv: tuple[str, ...]
    says: str
    status: int
    env: tuple[tuple[str, str], ...] = ()
    needs: tuple[str, ...] = ()
    lines: int = 1  # pytest's own usage errors come with the usage line and the rootdir


def pytest_cmd(*args: str) -> tuple[str, ...]:
    return (str(BIN / "pytest"), "cases", "-p", "no:cacheprovider", "-n", "2", *args)


def doctor(*args: str) -> tuple[str, ...]:
    return (str(BIN / "qiotests"), "doctor", *args)


# "{tmp}" is the test's own directory, "{real:NAME}" the QEMU program on PATH.
INPUTS = {
    # ended well before issue 9: they must stay so
    "QEMU_PROG missing": BadInput(pytest_cmd(), "QEMU_PROG=/nonexistent: no executable file "
                                  "there", USAGE, (("QEMU_PROG", "/nonexistent"),)),
    "--qemu-img missing": BadInput(pytest_cmd("--qemu-img", "/nonexistent/qemu-img"),
                                   "--qemu-img /nonexistent/qemu-img: no executable file there",
                                   USAGE),
    "--qemu-build missing": BadInput(pytest_cmd("--qemu-build", "/nonexistent"),
                                     "--qemu-build /nonexistent: no such directory", USAGE),
    "--accel unknown": BadInput(pytest_cmd("--accel", "hax"), "--accel: invalid choice: 'hax'",
                                USAGE, lines=4),
    "--qemu not QEMU": BadInput(pytest_cmd("--qemu", "{tmp}/true"), "{tmp}/true", USAGE),
    "doctor QEMU_PROG missing": BadInput(doctor(), "qiotests doctor: QEMU_PROG=/nonexistent: "
                                         "no executable file there", 1,
                                         (("QEMU_PROG", "/nonexistent"),)),
    "doctor --qemu not QEMU": BadInput(doctor("--qemu", "{tmp}/true"), "{tmp}/true", 1),
    # issue 9, item 3: wrong roles and empty values
    "--qemu= empty": BadInput(pytest_cmd("--qemu="), "--qemu is empty: give the path of "
                              "qemu-system-x86_64, or leave the option out", USAGE),
    "--qemu-build= empty": BadInput(pytest_cmd("--qemu-build="), "--qemu-build is empty",
                                    USAGE),
    "--qemu-img is qemu-io": BadInput(
        pytest_cmd("--qemu-img", "{real:qemu-io}"),
        "--qemu-img {real:qemu-io} is not qemu-img: it says 'qemu-io version", USAGE,
        needs=("qemu-io",)),
    "--qemu-nbd is qemu-img": BadInput(
        pytest_cmd("--qemu-nbd", "{real:qemu-img}"),
        "--qemu-nbd {real:qemu-img} is not qemu-nbd: it says 'qemu-img version", USAGE,
        needs=("qemu-img",)),
    "--qemu is qemu-img": BadInput(
        pytest_cmd("--qemu", "{real:qemu-img}"),
        "--qemu {real:qemu-img} is not qemu-system-x86_64", USAGE, needs=("qemu-img",)),
    "--qemu is i386": BadInput(
        pytest_cmd("--qemu", "{real:qemu-system-i386}"),
        "--qemu {real:qemu-system-i386} emulates i386, not x86_64", USAGE,
        needs=("qemu-system-i386",)),
    "doctor --qemu-img is qemu-io": BadInput(
        doctor("--qemu-img", "{real:qemu-io}"),
        "qiotests doctor: --qemu-img {real:qemu-io} is not qemu-img", 1, needs=("qemu-io",)),
    # issue 9, item 9: the file-size limit's option
    "--max-file-size bogus": BadInput(pytest_cmd("--max-file-size", "lots"),
                                      "--max-file-size: 'lots' is not a size", USAGE),
    "--max-file-size 0": BadInput(pytest_cmd("--max-file-size", "0"),
                                  "--max-file-size: '0': a file-size limit must be more than "
                                  "0 bytes", USAGE),
    # issue 9, item 1: a probe that hangs, with a child of its own
    "--qemu hangs": BadInput(pytest_cmd("--qemu", "{tmp}/hang/qemu-system-x86_64"),
                             "{tmp}/hang/qemu-system-x86_64 -accel help did not finish within "
                             "10 s; killed it and its process group", USAGE,
                             needs=("qemu-system-x86_64",)),
    "doctor --qemu hangs": BadInput(doctor("--qemu", "{tmp}/hang/qemu-system-x86_64"),
                                    "qiotests doctor: {tmp}/hang/qemu-system-x86_64 -accel help "
                                    "did not finish within 10 s", 1,
                                    needs=("qemu-system-x86_64",)),
}


@pytest.fixture
def sandbox() -> Iterator[Path]:
    """A short TMPDIR of the test's own; nothing of the run may be left in it."""
    d = Path(tempfile.mkdtemp(prefix="qio-e2e-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def clean_env(tmp: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {r.env for r in ROLES} | {"QEMU_BUILD_DIR", "PYTEST_ADDOPTS"}
           and not k.startswith(("PYTEST_XDIST", "GITHUB_"))}
    env.update(extra, TMPDIR=str(tmp))
    return env


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line mentions ``text`` (our sandbox's paths)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(f"{entry.name} {cmdline[:120]}")
    return found


def assert_nothing_left(sandbox: Path) -> None:
    deadline = time.monotonic() + 5
    while processes_mentioning(str(sandbox)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(str(sandbox)) == []
    assert sorted(p.name for p in sandbox.glob("qio-*")) == []


def expand(text: str, tmp: Path) -> str:
    text = text.replace("{tmp}", str(tmp))
    for name, path in REAL.items():
        text = text.replace(f"{{real:{name}}}", str(Path(path).resolve()) if path else "")
    return text


@pytest.mark.parametrize("name", list(INPUTS))
def test_bad_input_ends_in_one_sentence(name: str, sandbox: Path) -> None:
    bad = INPUTS[name]
    missing = [n for n in bad.needs if REAL[n] is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not on PATH")
    fake_program(sandbox / "true", "exit 0")
    pidfile = sandbox / "child.pid"
    if REAL["qemu-system-x86_64"]:
        fake_program(sandbox / "hang" / "qemu-system-x86_64", HANGING_WITH_CHILD.format(
            real=REAL["qemu-system-x86_64"], pidfile=pidfile))
    argv = [expand(a, sandbox) for a in bad.argv]
    cp = subprocess.run(argv, cwd=REPO, env=clean_env(sandbox, dict(bad.env)),
                        capture_output=True, text=True, timeout=120, check=False)
    out = cp.stdout + cp.stderr
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert cp.returncode == bad.status, out
    assert "Traceback" not in out and "INTERNALERROR" not in out, out
    assert len(lines) == bad.lines, lines
    assert any(expand(bad.says, sandbox) in ln for ln in lines), lines
    if pidfile.exists():
        assert wait_pid_gone(int(pidfile.read_text())), "the hung probe's child still runs"
    assert_nothing_left(sandbox)


def test_sigterm_during_make_check_cleans_up(sandbox: Path) -> None:
    """Item 7 on the real cases with -n 2: SIGTERM to pytest, as a CI runner cancels."""
    proc = subprocess.Popen(pytest_cmd("-q"), cwd=REPO, env=clean_env(sandbox, {}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not processes_mentioning(f"{sandbox}/qio-"):
            assert proc.poll() is None and time.monotonic() < deadline, "no QEMU started"
            time.sleep(0.05)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "INTERNALERROR" not in out and "left running" not in out, out
    assert_nothing_left(sandbox)


def test_tiny_timeout_on_make_check(sandbox: Path) -> None:
    """Item 8 on the real cases with -n 2: --timeout 0.3 ended in INTERNALERROR (a
    finalizer's error formatted inside pytest's own ast.parse), and timeouts that broke
    into asyncio were reported as QEMU deaths. Every failure must be the timeout."""
    cp = subprocess.run(pytest_cmd("-q", "--timeout", "0.3", "-p", "no:warnings"), cwd=REPO,
                        env=clean_env(sandbox, {"COLUMNS": "400"}), capture_output=True,
                        text=True, timeout=600, check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode == pytest.ExitCode.TESTS_FAILED, out[-3000:]
    assert "INTERNALERROR" not in out, out[-3000:]
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+) - (.*)$", out, re.MULTILINE)
    assert failures, out[-3000:]
    assert [f for f in failures
            if not f[1].startswith("Failed: Timeout (>0.3s): the test ran longer")] == []
    assert re.search(r"^\d+ failed[^\n]* in [\d.]+s", out, re.MULTILINE), out[-3000:]
    assert "left running" not in out
    assert_nothing_left(sandbox)
