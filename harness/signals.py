"""Signals that end a run or a test: SIGTERM from a CI runner, SIGALRM from ``--timeout``.

SIGTERM is what CI runners send on cancel. Python's default for it ends the process at
once, without ``finally`` blocks or fixture teardown: QEMU died (its death signal) but the
socket directories stayed in ``/tmp``. :func:`sigterm_as_ctrl_c` makes a SIGTERM do what
Ctrl-C does, a ``KeyboardInterrupt`` in this process and in each xdist worker, and makes
sure it is not lost where Python drops exceptions (:class:`Termination`).

pytest-timeout's signal method raises its timeout from a SIGALRM handler wherever the test
process happens to be. At a tiny ``--timeout`` that is often inside pytest itself, building
or sending a report, or setting up a fixture, and the run ends in INTERNALERROR or with
every later test failing. :class:`TimeoutClock` keeps the same timer but raises the timeout
only where that is safe: at once only inside the test function, elsewhere in setup and
call at the end of a harness wait (below) or of the phase; an alarm that comes between
phases is kept for the next. Teardown is never interrupted: the harness bounds it itself
(QEMU is asked to quit, then killed), as it bounds every wait of its own.

Even inside the test's code some places must not be broken by an exception out of nowhere.
Raised inside an asyncio loop, it lands in whichever task runs (QMP's reader or writer: the
connection was lost and the case reported a QEMU "killed by SIGKILL" instead of its
timeout) or between a cancelled call and its clean-up; raised in the middle of starting a
program, the program runs unregistered. Such code runs under :func:`timeout_deferred`: an
alarm there only asks it to stop (a QMP call is cancelled) and the timeout is raised when
it ends.

An interrupted test also leaves half-built objects whose finalizers fail later, in some
garbage collection. pytest reports such an "unraisable" exception by formatting its
traceback at once, and on CPython 3.11 formatting calls ``ast.parse``: inside a collection
that pytest's own ``ast.parse`` set off (building a report) the nested call breaks the
outer one ("SystemError: AST constructor recursion depth mismatch") and the xdist worker
ends in INTERNALERROR. :class:`UnraisableAfterGC` passes those reports on after the
collection instead.

And a frame the timeout interrupts can be at an instruction CPython 3.11 gives no line
number: its traceback entry has ``tb_lineno`` None, and pytest, building the report, fails
with "unsupported operand type(s) for -: 'NoneType' and 'int'" (INTERNALERROR again).
:func:`mend_tracebacks` gives such an entry the line of the statement it was in.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import CodeType, FrameType, TracebackType
from typing import Any


def child_pids() -> list[int]:
    """This process's children, from ``/proc`` (empty where it cannot be read)."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    return pids


class Termination:
    """SIGTERM as a Ctrl-C that cannot be lost: ``KeyboardInterrupt`` until the run acts on it.

    Python runs a signal handler between two bytecodes of the main thread, wherever that
    is, and an exception it raises propagates from there, except where nothing can: in a
    finalizer (``__del__``, a ``weakref.finalize`` or garbage-collector callback) the
    interpreter prints "Exception ignored in ..." and drops it. Raised once, as Ctrl-C is,
    a SIGTERM that came during a garbage collection was lost (about 1 run in 6 under
    load, where collections of the harness's asyncio and subprocess objects are many and
    slow): the run went on to its end, and every later SIGTERM was ignored. So:

    * each SIGTERM raises ``KeyboardInterrupt`` until the run has taken it
      (:meth:`acknowledge`: pytest caught it and starts its cleanup, which later ones
      must not break);
    * one that a finalizer dropped is seen (``sys.unraisablehook``) and delivered again
      from a watcher thread, until one lands where it propagates;
    * one that code catching everything dropped is raised again at the next safe point
      (:meth:`check`: pytest calls it before each test phase);
    * the first is passed on, as SIGTERM, to ``forward_to()``'s pids (the xdist workers,
      which handle it the same way; Ctrl-C in a terminal reaches every process of the
      foreground group, a SIGTERM only the one it was sent to).
    """

    def __init__(self, forward_to: Callable[[], list[int]] | None = None) -> None:
        self.forward_to = forward_to
        self.requested = False
        self.acknowledged = False
        self.redelivered = 0  # SIGTERMs sent again because a finalizer dropped one
        self._dropped = threading.Event()
        self._hook: Callable[[Any], object] | None = None
        self._main = threading.main_thread().ident

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.acknowledged:
            return
        if not self.requested:
            self.requested = True
            for pid in self.forward_to() if self.forward_to is not None else []:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
            self._hook = sys.unraisablehook
            sys.unraisablehook = self._unraisable
            threading.Thread(target=self._watch, name="qiotests-sigterm", daemon=True).start()
        raise KeyboardInterrupt("SIGTERM")

    def acknowledge(self) -> None:
        """The run has the interruption in hand: later SIGTERMs are ignored."""
        self.acknowledged = True
        self._dropped.set()  # let the watcher end

    def check(self) -> None:
        """At a safe point: raise the interruption again if a SIGTERM came and was lost."""
        if self.requested and not self.acknowledged:
            raise KeyboardInterrupt("SIGTERM")

    def _unraisable(self, unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and not self.acknowledged:
            self._dropped.set()  # dropped by a finalizer: no report, it comes again
            return
        if self._hook is not None:
            self._hook(unraisable)

    def _watch(self) -> None:
        while True:
            self._dropped.wait()
            if self.acknowledged:
                return
            self._dropped.clear()
            # pace: the finalizer that dropped it may still run (each drop sends it again)
            time.sleep(0.01)
            self.redelivered += 1
            with contextlib.suppress(ProcessLookupError, OSError):
                if self._main is not None:
                    signal.pthread_kill(self._main, signal.SIGTERM)


#: The Termination the SIGTERM handler of this process feeds (None: not installed).
termination: Termination | None = None


def sigterm_as_ctrl_c(forward_to: Callable[[], list[int]] | None = None) -> Callable[[], None]:
    """Handle SIGTERM as a Ctrl-C that cannot be lost (:class:`Termination`, kept in
    :data:`termination`). Returns the function that restores the old handler; does
    nothing outside the main thread."""
    global termination
    term = Termination(forward_to)
    try:
        previous = signal.signal(signal.SIGTERM, term.on_signal)
    except ValueError:  # not the main thread
        return lambda: None
    termination = term

    def restore() -> None:
        global termination
        signal.signal(signal.SIGTERM, previous)
        if termination is term:
            termination = None
    return restore


class TimeoutClock:
    """A per-test SIGALRM timer whose timeout is raised only where that is safe.

    ``fail`` raises the timeout (the plugin passes ``pytest.fail``). A test's phases (setup,
    call) run in :meth:`running` blocks; the test function itself in an
    :meth:`interruptible` block inside one. When the alarm comes, the timeout is raised

    * at once, inside :meth:`interruptible` (and no :func:`timeout_deferred` block);
    * inside a :func:`timeout_deferred` block of a phase (a QMP call of a fixture, of the
      test, of the harness's own end-of-test checks), at that block's end, after asking it
      to stop;
    * otherwise at the end of the phase, or at the start of the next one when it came in
      between.

    So pytest's own code in a phase (fixture bookkeeping, output capture) is never broken
    into: an exception there left a fixture half set up, and every later test using it
    failed with a bare AssertionError. A test that raised on its own keeps its error.
    """

    def __init__(self, fail: Callable[[str], Any]) -> None:
        self._fail = fail
        self._timeout = 0.0
        self._armed = False  # in a phase: the timeout may be raised at safe points
        self._interruptible = False  # in the test function: it may be raised anywhere
        self._state = "off"  # off, counting, expired (pending), fired
        self._previous: Any = None
        self.raised: BaseException | None = None  # the timeout, once raised

    @property
    def active(self) -> bool:
        return self._state != "off"

    def start(self, timeout: float) -> None:
        global _clock
        self._timeout = timeout
        self._state = "counting"
        self.raised = None
        self._previous = signal.signal(signal.SIGALRM, self._alarm)
        _clock = self
        signal.setitimer(signal.ITIMER_REAL, timeout)

    def stop(self) -> None:
        global _clock
        signal.setitimer(signal.ITIMER_REAL, 0)
        if self._previous is not None:
            signal.signal(signal.SIGALRM, self._previous)
        self._previous = None
        self._state = "off"
        self._armed = self._interruptible = False
        if _clock is self:
            _clock = None

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around a phase of the test (setup, call): the timeout is raised at its safe
        points, and at its end if it is still pending then (unless the phase raised).

        Once raised, the timeout is the phase's verdict: code that caught it (Hypothesis
        takes pytest's ``Failed`` for a failing example) and then passed, or failed in
        some other way because of it, ends with the timeout all the same."""
        __tracebackhide__ = True
        self._armed = True
        self._raise_expired()
        try:
            yield
        except BaseException as e:
            if self.raised is not None and e is not self.raised:
                raise self.raised from e
            raise
        else:
            if self.raised is not None:
                raise self.raised
            self._raise_expired()
        finally:
            self._armed = self._interruptible = False

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Around the test function, inside :meth:`running`: the timeout is raised at once
        (outside :func:`timeout_deferred` blocks)."""
        __tracebackhide__ = True
        outer = self._interruptible
        self._interruptible = self._armed
        try:
            self._raise_expired()
            yield
        finally:
            self._interruptible = outer

    def _raise_expired(self) -> None:
        """Raise a timeout whose alarm came when it could not be raised, if it may be now."""
        __tracebackhide__ = True
        if self._state == "expired" and self._armed and not _deferring:
            self._state = "fired"
            self._armed = self._interruptible = False
            try:
                self._fail(self._message())
            except BaseException as e:
                self.raised = e
                raise

    def _alarm(self, signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        if self._state != "counting":
            return
        self._state = "expired"  # raised now if it may be, else at the next safe point
        if self._armed and _deferring:
            with contextlib.suppress(Exception):
                _deferring[-1]()  # ask the code that must not be broken to stop
        elif self._interruptible:
            self._raise_expired()

    def _message(self) -> str:
        return f"Timeout (>{self._timeout:g}s): the test ran longer than --timeout"


#: The clock of the test running now (one test at a time per process).
_clock: TimeoutClock | None = None
#: The interrupt callbacks of the :func:`timeout_deferred` blocks running now, innermost last.
_deferring: list[Callable[[], object]] = []


def _nothing() -> None:
    pass


@contextlib.contextmanager
def timeout_deferred(interrupt: Callable[[], object] = _nothing) -> Iterator[None]:
    """A block no timeout exception may break (an asyncio loop at work, a program being
    started and registered): an alarm inside it calls ``interrupt`` (which should make the
    block end soon, e.g. cancel the QMP call it waits for) and the timeout is raised when
    the outermost such block ends, over whatever else it raised. ``interrupt`` runs in a
    signal handler: it must only set things in motion (``loop.call_soon_threadsafe``)."""
    __tracebackhide__ = True
    _deferring.append(interrupt)
    try:
        yield
    finally:
        _deferring.pop()
        if _clock is not None:
            _clock._raise_expired()


class UnraisableAfterGC:
    """Wraps ``sys.unraisablehook``: an exception raised in a finalizer during a garbage
    collection is passed on after it (at the next report outside one, or :meth:`flush`),
    so the hook's traceback formatting never runs inside an ``ast.parse`` that set off the
    collection (CPython 3.11 keeps one AST-building depth counter per interpreter)."""

    def __init__(self) -> None:
        self._collecting = False
        self._held: list[Any] = []
        self._hook: Callable[[Any], object] | None = None

    def install(self) -> None:
        """Wrap the hook installed now (pytest's, once its plugins are configured)."""
        if self._hook is not None:
            return
        self._hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        gc.callbacks.append(self._phase)

    def uninstall(self) -> None:
        """Pass on what is held and put the wrapped hook back (if nobody replaced ours)."""
        if self._hook is None:
            return
        self.flush()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._phase)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self._hook
        self._hook = None

    def flush(self) -> None:
        """Hand the held reports to the wrapped hook (outside any garbage collection)."""
        while self._held and not self._collecting and self._hook is not None:
            self._hook(self._held.pop(0))

    def _phase(self, phase: str, info: dict[str, int]) -> None:
        self._collecting = phase == "start"

    def _unraisable(self, unraisable: Any) -> None:
        if self._collecting:
            self._held.append(_Unraisable(unraisable))
            return
        self.flush()
        if self._hook is not None:
            self._hook(unraisable)


class _Unraisable:
    """A copy of ``sys.UnraisableHookArgs``: those are only valid during the hook call."""

    def __init__(self, args: Any) -> None:
        self.exc_type: type[BaseException] = args.exc_type
        self.exc_value: BaseException | None = args.exc_value
        self.exc_traceback: TracebackType | None = args.exc_traceback
        self.err_msg: str | None = args.err_msg
        self.object: object = args.object


def mend_tracebacks(exc: BaseException) -> int:
    """Give each traceback entry of ``exc`` and of the exceptions chained to it a line
    number; returns how many had none. An entry without one (``tb_lineno`` None: the frame
    was interrupted at an instruction that has no line) is replaced by a copy with the line
    of the last instruction before it that has one."""
    mended = 0
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        head, n = _mend(e.__traceback__)
        if n:
            e.__traceback__ = head
            mended += n
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return mended


def _mend(head: TracebackType | None) -> tuple[TracebackType | None, int]:
    mended = 0
    prev: TracebackType | None = None
    tb = head
    while tb is not None:
        if tb.tb_lineno is None:
            line = _line_before(tb.tb_frame.f_code, tb.tb_lasti)
            tb = TracebackType(tb.tb_next, tb.tb_frame, tb.tb_lasti, line)
            if prev is None:
                head = tb
            else:
                prev.tb_next = tb
            mended += 1
        prev, tb = tb, tb.tb_next
    return head, mended


def _line_before(code: CodeType, offset: int) -> int:
    """The line of the last instruction at or before ``offset`` that has one."""
    line = code.co_firstlineno
    for start, _end, lineno in code.co_lines():
        if start > offset:
            break
        if lineno is not None:
            line = lineno
    return line
