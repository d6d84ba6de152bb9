"""Every long-lived QEMU process the harness starts, so that none outlives its test.

Three layers make sure of it:
  * each child gets ``PR_SET_PDEATHSIG = SIGKILL``: if the pytest (or xdist worker) process
    dies for any reason, the kernel kills its QEMU children;
  * each owner (a Machine, a qemu-nbd run) stops its process in ``finally``;
  * this registry lets the session end check that nothing is still alive, and an ``atexit``
    hook kills whatever is left if Python exits with children still registered.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
SETPRIV = shutil.which("setpriv")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


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
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` tied to this process's lifetime and remember it."""
        # setpriv sets the death signal and execs the program (same pid); without it a
        # Python preexec_fn does, which forces a slow fork of the whole interpreter
        wrapper = [SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV else []
        proc = subprocess.Popen(
            [*wrapper, *argv],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            pass_fds=tuple(pass_fds),
            preexec_fn=None if SETPRIV else _die_with_parent,
            start_new_session=True,  # Ctrl-C in the terminal goes to pytest, not to QEMU
        )
        with self._lock:
            self._procs[proc.pid] = (proc, label)
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
                if proc.poll() is None:
                    out.append((pid, label))
                else:
                    self.forget(pid)
            elif _pid_alive(pid):
                out.append((pid, label))
            else:
                self.forget(pid)
        return out

    def kill_all(self) -> list[tuple[int, str]]:
        """SIGKILL everything still registered; returns what had to be killed."""
        left = self.alive()
        for pid, _label in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with self._lock:
            items = list(self._procs.values())
        for proc, _label in items:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        for pid, _label in left:
            self.forget(pid)
        return left


def wait_exit(proc: subprocess.Popen[Any], timeout: float) -> int | None:
    """Wait for ``proc`` to exit; its status, or None after ``timeout``.

    ``Popen.wait(timeout)`` polls with growing sleeps and notices an exit milliseconds
    late; a pidfd wakes up the moment the process ends.
    """
    if proc.poll() is not None:
        return proc.returncode
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    return proc.wait() if ready else None


def _pid_alive(pid: int) -> bool:
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
