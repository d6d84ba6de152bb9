"""Every program the harness starts, so that none outlives its test or fills the disk.

Each program runs in its own process group (a new session), and the group is what gets
killed: a QEMU that starts helpers of its own takes them with it. Three layers make sure
nothing is left:
  * each child gets ``PR_SET_PDEATHSIG = SIGKILL``: if the pytest (or xdist worker) process
    dies for any reason, the kernel kills its QEMU children;
  * each owner (a Machine, a qemu-nbd run, :func:`run`, :func:`run_logged`) stops its
    group in ``finally``;
  * this registry lets the session end check that nothing is still alive, and an ``atexit``
    hook kills whatever is left if Python exits with children still registered.

Each child also gets a file-size limit (``RLIMIT_FSIZE``, :data:`DEFAULT_MAX_FILE_SIZE`
unless ``--max-file-size`` says otherwise): a QEMU with a bug that writes without end is
stopped by ``SIGXFSZ`` at the limit instead of filling the machine's disk.

Both are set by small programs from util-linux that exec the real one (same pid), because a
Python ``preexec_fn`` forces a slow fork of the whole interpreter: ``setpriv --pdeathsig``
and ``prlimit --fsize``. Without them a ``preexec_fn`` does the same, slower.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import os
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from harness.signals import timeout_deferred

_PR_SET_PDEATHSIG = 1
SETPRIV = shutil.which("setpriv")
PRLIMIT = shutil.which("prlimit")

GiB = 1 << 30
#: Largest file a program the harness starts may write (RLIMIT_FSIZE): far above what any
#: case needs (images are sparse and small), far below a full disk.
DEFAULT_MAX_FILE_SIZE = 4 * GiB
_max_file_size: int | None = DEFAULT_MAX_FILE_SIZE

#: Output of a :func:`run` kept in memory at most; the rest is cut (the file-size limit
#: bounds what a program can write, not what we should read back).
RUN_OUTPUT_MAX = 64 << 20


def set_max_file_size(size: int | None) -> None:
    """The RLIMIT_FSIZE for programs started from now on; None means no limit."""
    global _max_file_size
    if size is not None and size <= 0:
        raise ValueError(f"a file-size limit must be positive, not {size}")
    _max_file_size = size


def max_file_size() -> int | None:
    return _max_file_size


def format_size(size: int) -> str:
    """``4 GiB``, ``1.5 MiB``, ``512 bytes``: sizes as people write them."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            value = size / (1 << shift)
            return f"{value:g} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} bytes"


def parse_size(text: str) -> int | None:
    """``4G``, ``512M``, ``100k``, ``1048576``, ``unlimited``: bytes (None: no limit).

    Raises ValueError with a sentence naming the value."""
    t = text.strip().lower()
    if t in ("unlimited", "none"):
        return None
    units = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40}
    number = t.rstrip("kmgtib")
    suffix = t[len(number):].removesuffix("ib").removesuffix("b") or ""
    if suffix not in units or not number:
        raise ValueError(f"{text!r} is not a size (say 4G, 512M, 100k, a number of bytes "
                         "or unlimited)")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (say 4G, 512M, 100k, a number of bytes "
                         "or unlimited)") from None
    size = int(value * (1 << units[suffix]))
    if size <= 0:
        raise ValueError(f"{text!r}: a file-size limit must be more than 0 bytes")
    return size


def limit_note(limit: int | None = -1) -> str:
    """A file-size limit (by default the current one) as a user can act on it:
    ``the file-size limit of 4 GiB (--max-file-size)``."""
    limit = _max_file_size if limit == -1 else limit
    size = "no" if limit is None else format_size(limit)
    return f"the file-size limit of {size} (--max-file-size)"


def file_size_problem(pid: int | None, limit: int | None) -> str | None:
    """Why the writes of process ``pid`` (started under ``limit``) failed, if it hit the
    file-size limit: one sentence for an error message; ``None`` when it did not."""
    if pid is None or not file_size_limit_hit(pid):
        return None
    return f"a write reached {limit_note(limit)}, so QEMU got EFBIG (SIGXFSZ)"


def file_size_limit_hit(pid: int) -> bool:
    """Whether a thread of ``pid`` has SIGXFSZ pending.

    The kernel sends SIGXFSZ on every write past RLIMIT_FSIZE and fails the write with
    EFBIG. QEMU blocks signals in its I/O threads, so QEMU does not die: the write fails and
    the signal stays pending on that thread. Each thread's ``stat`` shows its pending
    signals (field 31); ``status`` would too, but reading it waits for the memory map lock,
    which a QEMU that is still starting holds for milliseconds.
    """
    bit = 1 << (signal.SIGXFSZ - 1)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields[0] is field 3 (state), so field 31 (pending signals) is fields[28]
        if len(fields) > 28 and int(fields[28]) & bit:
            return True
    return False


def _fsize_limit() -> int | None:
    """The limit to give a child: ours, but never above the hard limit we have."""
    if _max_file_size is None:
        return None
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    return _max_file_size if hard == resource.RLIM_INFINITY else min(_max_file_size, hard)


def _child_setup(fsize: int | None) -> Any:
    def setup() -> None:  # runs in the child between fork and exec
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except OSError:
            pass
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return setup


def _check_executable(program: str, env: dict[str, str] | None) -> None:
    """Raise the OSError exec would, here: behind setpriv and prlimit a missing program
    would only show as their exit status 127."""
    path = program if "/" in program else shutil.which(
        program, path=(env if env is not None else os.environ).get("PATH"))
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group ``pid`` leads (every child the harness starts leads one)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class ProcessRegistry:
    """The processes started and not yet reaped, keyed by pid, with a label each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[int, tuple[subprocess.Popen[Any], str]] = {}

    def spawn(
        self,
        argv: Sequence[str],
        label: str,
        stdout: IO[Any] | int | None = None,
        stderr: IO[Any] | int | None = None,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in a new process group, tied to this process's lifetime, with the
        file-size limit, and remember it."""
        _check_executable(argv[0], env)
        fsize = _fsize_limit()
        if SETPRIV and (PRLIMIT or fsize is None):
            # each execs the next (same pid); no preexec_fn, so no slow fork
            wrapper = [SETPRIV, "--pdeathsig", "KILL", "--"]
            if fsize is not None:
                wrapper += [str(PRLIMIT), f"--fsize={fsize}:{fsize}", "--"]
            preexec = None
        else:
            wrapper, preexec = [], _child_setup(fsize)
        # a --timeout while the program starts is raised once it is registered; then nobody
        # owns it (the caller never got it), so it is stopped here
        proc: subprocess.Popen[Any] | None = None
        try:
            with timeout_deferred():
                proc = subprocess.Popen(
                    [*wrapper, *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    env=env,
                    cwd=cwd,
                    pass_fds=tuple(pass_fds),
                    preexec_fn=preexec,
                    # its own session and group: Ctrl-C in the terminal goes to pytest, not
                    # to QEMU, and killing the group kills whatever QEMU started
                    start_new_session=True,
                )
                with self._lock:
                    self._procs[proc.pid] = (proc, label)
        except BaseException:
            if proc is not None:
                kill_group(proc.pid)
                if wait_exit(proc, 5.0) is not None:
                    self.forget(proc.pid)
            raise
        return proc

    def adopt(self, pid: int, label: str) -> None:
        """Track a process started some other way (a daemon that forked, by pid)."""
        with self._lock:
            self._procs[pid] = (None, label)  # type: ignore[assignment]

    def forget(self, pid: int) -> None:
        with self._lock:
            self._procs.pop(pid, None)

    def alive(self) -> list[tuple[int, str]]:
        """(pid, label) of registered processes still running; reaps the ones that ended."""
        out = []
        with self._lock:
            items = list(self._procs.items())
        for pid, (proc, label) in items:
            if proc is not None:
                if not exited(proc):
                    out.append((pid, label))
                else:
                    wait_exit(proc, 0.0)  # kills what is left of its group, then reaps
                    self.forget(pid)
            elif pid_alive(pid):
                out.append((pid, label))
            else:
                self.forget(pid)
        return out

    def kill(self, pid: int) -> None:
        """SIGKILL a registered process: its whole group when the harness started it."""
        with self._lock:
            proc = self._procs.get(pid, (None, ""))[0]
        if proc is not None:
            kill_group(pid)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def kill_all(self) -> list[tuple[int, str]]:
        """SIGKILL everything still registered; returns what had to be killed."""
        left = self.alive()
        for pid, _label in left:
            self.kill(pid)
        with self._lock:
            items = list(self._procs.values())
        for proc, _label in items:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        for pid, _label in left:
            self.forget(pid)
        return left


def exited(proc: subprocess.Popen[Any]) -> bool:
    """Whether ``proc`` has ended, without reaping it (``Popen.poll`` would), so that its
    group can still be killed without any risk of hitting a reused id."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped by someone else
        return proc.poll() is not None
    return info is not None


def wait_exit(proc: subprocess.Popen[Any], timeout: float | None) -> int | None:
    """Wait for ``proc`` to exit; its status, or None after ``timeout`` (None: no bound).

    When it has exited, what is left of its process group (children it started) is
    killed before it is reaped: until then its pid, and so the group id, cannot be reused.
    ``Popen.wait(timeout)`` polls with growing sleeps and notices an exit milliseconds
    late; a pidfd wakes up the moment the process ends.
    """
    if proc.returncode is not None:
        return proc.returncode
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        kill_group(proc.pid)  # no pidfd: reaped already, the group id is still ours
        return status
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        return None
    kill_group(proc.pid)  # a zombie leader keeps the group id ours
    return proc.wait()


@dataclass(frozen=True)
class Finished:
    """How a :func:`run` ended: status (None after a timeout), output, whether it hung."""

    argv: list[str]
    status: int | None
    stdout: str
    stderr: str
    timed_out: bool


def run(argv: Sequence[str], timeout: float, *, label: str = "", cwd: str | Path | None = None,
        env: dict[str, str] | None = None) -> Finished:
    """Run a short program to its end, in its own group, never for longer than ``timeout``.

    Output goes to anonymous temporary files rather than pipes: a child the program left
    behind holding a pipe open cannot make this wait, and nothing is left on disk. After a
    timeout, or anything else that interrupts the wait (Ctrl-C), the whole group is killed.
    """
    argv = list(argv)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        status: int | None = None
        proc = REGISTRY.spawn(argv, label or argv[0], stdout=out, stderr=err, env=env, cwd=cwd)
        try:
            status = wait_exit(proc, timeout)
        finally:
            if status is None:
                kill_group(proc.pid)
                wait_exit(proc, 5.0)
            REGISTRY.forget(proc.pid)
        return Finished(argv, status, _read(out), _read(err), status is None)


def run_logged(argv: Sequence[str], log: IO[bytes], *, label: str = "",
               cwd: str | Path | None = None, env: dict[str, str] | None = None,
               on_line: Callable[[str], None] | None = None, grace: float = 0.0) -> int | None:
    """Run a long program (a build step, apt-get, a pytest run) to its end, its output
    appended to ``log`` (and each line, when ``on_line`` is given, passed to it); its exit
    status (-N: signal N).

    Like every child, it runs in its own process group with the file-size limit and dies
    with us. If we are interrupted meanwhile (Ctrl-C, a SIGTERM turned into one), its
    group is stopped (:func:`stop_group`: SIGINT, ``grace`` seconds, SIGKILL) before the
    interruption goes on.
    """
    log.flush()
    proc = REGISTRY.spawn(argv, label or str(argv[0]),
                          stdout=subprocess.PIPE if on_line is not None else log,
                          stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        if on_line is not None and proc.stdout is not None:
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                on_line(raw.decode(errors="replace").rstrip("\n"))
        status = wait_exit(proc, None)
    except BaseException:
        stop_group(proc, grace)
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    REGISTRY.forget(proc.pid)
    return status


def stop_group(proc: subprocess.Popen[Any], grace: float = 0.0) -> int | None:
    """Stop ``proc``'s process group: SIGINT first (a pytest run then stops its VMs), up to
    ``grace`` seconds for the whole group to end, then SIGKILL for what is left; reaps
    ``proc`` and returns its status."""
    if grace > 0:
        kill_group(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (not exited(proc) or group_members(proc.pid)):
            time.sleep(0.05)
    kill_group(proc.pid)
    status = wait_exit(proc, 10.0)
    if status is not None:
        REGISTRY.forget(proc.pid)
    return status


def group_members(pgid: int) -> list[int]:
    """The live processes of group ``pgid`` other than its leader (from ``/proc``)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pgid:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields[0] is field 3 (state); field 5 (pgrp) is fields[2]
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in "ZX":
            members.append(int(entry))
    return members


def _read(f: IO[bytes]) -> str:
    f.seek(0)
    data = f.read(RUN_OUTPUT_MAX + 1)
    text = data[:RUN_OUTPUT_MAX].decode(errors="replace")
    return text + ("\n[output cut at 64 MiB]\n" if len(data) > RUN_OUTPUT_MAX else "")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not: it only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of someone else still answers kill(0); look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


REGISTRY = ProcessRegistry()
atexit.register(REGISTRY.kill_all)
