"""Shared helpers for the harness's own tests.

``pytester`` runs throwaway projects that copy the real wiring (``pyproject.toml``,
``conftest.py``, ``cases/conftest.py``) so the plugin is tested as users run it, in a
subprocess (the harness keeps process-wide state: the registry, atexit hooks).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from harness.processes import REGISTRY
from harness.session import Case, Environment

pytest_plugins = ["pytester"]

# A long random run of tests/test_qcow2_fuzz.py (registered here: the option is read
# before test modules are imported).
settings.register_profile("qiotests-fuzz-long", max_examples=20000, database=None,
                          deadline=None)

REPO = Path(__file__).resolve().parent.parent
PIDS_FILE = "pids.txt"


def unpacked_qemu() -> Path:
    """The tree ``make qemu-versions`` unpacked (QEMU_VERSIONS_DIR, default ../qemu-versions
    beside the repo, whose ``latest`` file names it); a path that does not exist if none."""
    root = Path(os.environ.get("QEMU_VERSIONS_DIR",
                               Path(__file__).resolve().parent.parent.parent / "qemu-versions"))
    try:
        return Path((root / "latest").read_text().strip())
    except OSError:
        return root / "none-unpacked"


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) QEMU-ish process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state != "Z" and b"qemu" in cmdline


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """True once ``pid`` is no live QEMU (it may take a moment to be reaped by init)."""
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def fake_program(path: Path, body: str = 'echo "$0 $*"') -> Path:
    """A tiny executable shell script standing in for a QEMU program."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class Project:
    """A throwaway qiotests checkout in pytester's directory: the real wiring, fake cases.

    The conftest files are copied (not linked): ``cases/conftest.py`` finds ``expected/``
    relative to its own resolved path.
    """

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester
        self.root = pytester.path
        shutil.copy(REPO / "pyproject.toml", self.root / "pyproject.toml")
        shutil.copy(REPO / "conftest.py", self.root / "conftest.py")
        (self.root / "cases").mkdir()
        (self.root / "cases" / "__init__.py").write_text("")
        shutil.copy(REPO / "cases" / "conftest.py", self.root / "cases" / "conftest.py")
        (self.root / "expected").mkdir()

    def case(self, name: str, source: str) -> Path:
        """Write ``cases/test_<name>.py``."""
        path = self.root / "cases" / f"test_{name}.py"
        path.write_text(textwrap.dedent(source).lstrip())
        return path

    def golden_path(self, name: str) -> Path:
        return self.root / "expected" / f"{name}.out"

    def golden(self, name: str, text: str) -> Path:
        """Write ``expected/<name>.out``."""
        path = self.golden_path(name)
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    def run(self, *args: str, timeout: float = 240) -> pytest.RunResult:
        """``pytest cases ARGS`` in a subprocess, in the project directory. ``timeout`` is
        a hang bound, not a speed requirement: a run that exceeds it is killed and the
        test fails saying it hung."""
        try:
            return self.pytester.runpytest_subprocess("cases", *args, timeout=timeout)
        except pytest.Pytester.TimeoutExpired:
            pytest.fail(f"hang: 'pytest cases {' '.join(args)}' did not end within "
                        f"{timeout:g} s (a bound for hangs, far above its usual time); "
                        "killed", pytrace=False)

    def _records(self) -> list[list[str]]:
        path = self.root / PIDS_FILE
        return [ln.split() for ln in path.read_text().splitlines()] if path.exists() else []

    def pids(self) -> dict[str, int]:
        """Test name -> QEMU pid, as the throwaway tests recorded them."""
        return {name: int(pid) for name, pid, _sockdir in self._records()}

    def sockdirs(self) -> dict[str, Path]:
        """Test name -> the socket directory its VM used."""
        return {name: Path(sockdir) for name, _pid, sockdir in self._records()}


#: Source the throwaway modules use to start a VM and record its pid for the outer test.
START_VM = f'''
import os
import signal
import time
from pathlib import Path

from harness.machine import Machine
from harness.session import Case

PIDS = Path(__file__).resolve().parent.parent / "{PIDS_FILE}"


def start(qio: Case, name: str) -> Machine:
    vm = qio.vm(machine_type="none")
    vm.launch()
    with PIDS.open("a") as f:
        f.write(f"{{name}} {{vm.pid}} {{vm.socket_path.parent}}\\n")
    return vm
'''


@pytest.fixture
def qemu_system() -> str:
    """The qemu-system-x86_64 on PATH (the harness's own tests drive the system QEMU)."""
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        pytest.skip("qemu-system-x86_64 is not on PATH (apt-get install qemu-system-x86)")
    return path


@pytest.fixture(scope="session")
def env(request: pytest.FixtureRequest) -> Environment:
    """The QEMU on PATH (or ``--qemu-build``'s when given: the option is the suite's) under
    TCG, probed once, for the self-tests that drive a real QEMU through a :class:`Case`."""
    return Environment.discover({}, request.config.getoption("qio_build"), "tcg", os.environ)


@pytest.fixture
def case(env: Environment, tmp_path: Path) -> Iterator[Case]:
    """A case context in ``tmp_path``; its teardown must find nothing wrong (a VM that died
    or failed a check, a process left running)."""
    c = Case(env, tmp_path)
    yield c
    assert c.close(failed=False) == []


@pytest.fixture
def lenient_case(env: Environment, tmp_path: Path) -> Iterator[Case]:
    """A case context for a test that breaks it on purpose (a failed check, a guest that
    never gets ready): teardown stops everything without checking, as after a failure."""
    c = Case(env, tmp_path)
    yield c
    c.close(failed=True)


@pytest.fixture(autouse=True)
def not_the_ci_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run inside a GitHub Actions job, the pytest runs the self-tests start (throwaway
    projects, bisect steps) must not annotate the real job or append their tables to its
    step summary: the variables are removed unless a test sets them itself."""
    for name in ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "GITHUB_WORKSPACE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def project(pytester: pytest.Pytester, qemu_system: str) -> Project:
    """A throwaway project; its runs discover the QEMU on PATH like a user's would."""
    return Project(pytester)


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """Fail a test that leaves a process of its own in the harness's registry."""
    before = {pid for pid, _ in REGISTRY.alive()}
    yield
    left = [(pid, label) for pid, label in REGISTRY.alive() if pid not in before]
    for pid, _label in left:
        os.kill(pid, signal.SIGKILL)
        REGISTRY.forget(pid)
    assert not left, f"processes left running: {left}"


@pytest.fixture
def short_tmpdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """TMPDIR for the runs a test starts, short enough that the harness puts its sockets
    there too (it uses TMPDIR up to 40 bytes): every ``qio-*`` directory those runs make
    lands in it, where :func:`qio_dirs` can see what was left."""
    path = Path(tempfile.mkdtemp(prefix="qt-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def qio_dirs(tmpdir: Path) -> list[str]:
    """The ``qio-*`` directories in ``tmpdir`` (left behind, when a run has ended)."""
    return sorted(p.name for p in tmpdir.glob("qio-*"))


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (gone, or a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] in "ZX"
    except (OSError, IndexError):
        return True


def wait_pid_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pid_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


#: A program that starts a child of its own (recording its pid in $CHILD_PID_FILE) and then
#: hangs on whatever it is asked, except --version (answered as the real program would).
HANGING_WITH_CHILD = '''
case "$*" in *--version*) exec {real} --version;; esac
sleep 600 &
echo $! > "{pidfile}"
exec sleep 600
'''


#: A child that says what it was started with: its RLIMIT_FSIZE and whether it leads its
#: own process group ("child: 4294967296 True").
CHILD_REPORT = [sys.executable, "-c", "import os, resource; print('child:', "
                "resource.getrlimit(resource.RLIMIT_FSIZE)[0], os.getpgid(0) == os.getpid())"]


def child_report(log: Path) -> tuple[int, bool]:
    """(file-size limit, own process group) from the CHILD_REPORT line in ``log``."""
    line = next(ln for ln in log.read_text().splitlines() if ln.startswith("child: "))
    limit, own = line.split()[1:]
    return int(limit), own == "True"


def leaves_a_grandchild(pidfile: Path, then: str = "sleep 5") -> list[str]:
    """A child that starts ``sleep 600`` (its pid in ``pidfile``), prints a line, then
    runs ``then``."""
    return ["sh", "-c", f"sleep 600 & echo $! > {pidfile}; echo started; {then}"]
