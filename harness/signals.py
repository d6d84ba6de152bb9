"""Signals that end a run or a test: SIGTERM from a CI runner, SIGALRM from ``--timeout``.

SIGTERM is what CI runners send on cancel. Python's default for it ends the process at
once, without ``finally`` blocks or fixture teardown: QEMU died (its death signal) but the
socket directories stayed in ``/tmp``. :func:`sigterm_as_ctrl_c` makes a SIGTERM do what
Ctrl-C does: a ``KeyboardInterrupt`` in this process and, in the xdist controller, a SIGINT
to each worker (Ctrl-C in a terminal reaches every process of the foreground group; a
SIGTERM reaches only the one it was sent to).

pytest-timeout's signal method raises its timeout from a SIGALRM handler wherever the test
process happens to be. At a tiny ``--timeout`` that is often inside pytest itself, building
or sending a report (an exception in the middle of ``ast.parse`` even leaves CPython's
parser state broken), and the run ends in INTERNALERROR. :class:`TimeoutClock` keeps the same
timer but raises only while the test's own code runs (setup and call); an alarm that comes
in between is kept and raised when the test's code runs next. Teardown is never
interrupted: the harness bounds it itself (QEMU is asked to quit, then killed).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any


def child_pids() -> list[int]:
    """This process's children, from ``/proc`` (empty where it cannot be read)."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    return pids


def sigterm_as_ctrl_c(forward_to: Callable[[], list[int]] | None = None) -> Callable[[], None]:
    """Handle SIGTERM as a Ctrl-C: SIGINT to ``forward_to()``'s pids, then
    ``KeyboardInterrupt`` here. Later SIGTERMs are ignored, so that cleanup can finish (as
    the runner's SIGKILL would end it anyway). Returns the function that restores the old
    handler; does nothing outside the main thread."""
    fired = False

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        for pid in forward_to() if forward_to is not None else []:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGINT)
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        return lambda: None

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)
    return restore


class TimeoutClock:
    """A per-test SIGALRM timer whose timeout is raised only while the test's code runs.

    ``fail`` raises the timeout (the plugin passes ``pytest.fail``); it is called from the
    signal handler while :meth:`running` is active, or at the start of the next
    :meth:`running` block when the alarm came in between.
    """

    def __init__(self, fail: Callable[[str], Any]) -> None:
        self._fail = fail
        self._timeout = 0.0
        self._armed = False
        self._state = "off"  # off, counting, expired (pending), fired
        self._previous: Any = None

    @property
    def active(self) -> bool:
        return self._state != "off"

    def start(self, timeout: float) -> None:
        self._timeout = timeout
        self._state = "counting"
        self._previous = signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if self._previous is not None:
            signal.signal(signal.SIGALRM, self._previous)
        self._previous = None
        self._state = "off"
        self._armed = False

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around the test's own code (setup, call): the timeout may be raised here."""
        if self._state == "expired":
            self._state = "fired"
            self._fail(self._message())
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _alarm(self, signum: int, frame: FrameType | None) -> None:
        if self._state != "counting":
            return
        if self._armed:
            self._state = "fired"
            self._armed = False
            self._fail(self._message())
        self._state = "expired"  # raised when the test's code runs next

    def _message(self) -> str:
        return f"Timeout (>{self._timeout:g}s): the test ran longer than --timeout"
