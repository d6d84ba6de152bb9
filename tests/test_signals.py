"""harness.signals: the ``--timeout`` clock, the blocks it may not break, and the finalizer
errors an interrupted test leaves behind (issue 9, item 8).

The clock runs on the real SIGALRM here; ``TimedOut`` stands in for pytest's ``Failed``.
No test asserts on time: the waits are bounds, what is checked is where the timeout came.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any, NoReturn

import pytest

from harness import signals
from harness.signals import TimeoutClock, UnraisableAfterGC, timeout_deferred


class TimedOut(BaseException):
    """What the clock raises in these tests (pytest's Failed is a BaseException too)."""


def fail(message: str) -> NoReturn:
    raise TimedOut(message)


@pytest.fixture
def clock() -> Iterator[TimeoutClock]:
    c = TimeoutClock(fail)
    yield c
    c.stop()


def wait_for(flag: list[Any], bound: float = 30.0) -> None:
    """Sleep in small steps until ``flag`` is not empty (or ``bound`` has passed)."""
    deadline = time.monotonic() + bound
    while not flag and time.monotonic() < deadline:
        time.sleep(0.005)


def test_an_alarm_in_the_test_function_raises_there(clock: TimeoutClock) -> None:
    clock.start(0.05)
    with (pytest.raises(TimedOut, match=r"Timeout \(>0.05s\)"), clock.running(),
          clock.interruptible()):
        wait_for([])


def test_an_alarm_elsewhere_in_a_phase_is_raised_at_its_end(clock: TimeoutClock) -> None:
    """pytest's own code in a phase (fixture bookkeeping, capture) is never broken into:
    an exception there left a fixture half set up and every later test failed."""
    done: list[bool] = []
    clock.start(0.05)
    with pytest.raises(TimedOut), clock.running():
        time.sleep(0.2)  # pytest setting up fixtures
        done.append(True)
    assert done == [True]


def test_a_phase_that_failed_on_its_own_keeps_its_error(clock: TimeoutClock) -> None:
    clock.start(0.05)
    with pytest.raises(ValueError), clock.running():
        time.sleep(0.2)
        raise ValueError("the test's own failure")


def test_an_alarm_in_a_deferred_block_interrupts_it_and_is_raised_at_its_end(
        clock: TimeoutClock) -> None:
    interrupted: list[bool] = []
    ended: list[bool] = []
    clock.start(0.05)
    with (pytest.raises(TimedOut), clock.running(),
          timeout_deferred(lambda: interrupted.append(True))):
        wait_for(interrupted)
        ended.append(True)  # the block went on after the alarm
    assert interrupted == [True] and ended == [True]


def test_nested_deferred_blocks_raise_only_at_the_outermost_end(clock: TimeoutClock) -> None:
    steps: list[str] = []
    clock.start(0.05)
    with pytest.raises(TimedOut), clock.running():
        with timeout_deferred(lambda: steps.append("outer interrupted")):
            with timeout_deferred(lambda: steps.append("inner interrupted")):
                wait_for(steps)
            steps.append("inner ended")
        steps.append("never reached")
    assert steps == ["inner interrupted", "inner ended"]


def test_an_alarm_between_setup_and_call_is_raised_when_the_call_starts(
        clock: TimeoutClock) -> None:
    """pytest builds and sends the setup report between the two: the alarm waits."""
    clock.start(0.05)
    with clock.running():
        pass  # setup
    time.sleep(0.2)  # pytest's reporting: never interrupted
    body: list[bool] = []
    with pytest.raises(TimedOut), clock.running():
        body.append(True)
    assert body == []


def test_an_alarm_in_teardown_is_never_raised(clock: TimeoutClock) -> None:
    clock.start(0.05)
    with timeout_deferred():  # the harness's own clean-up, outside any running() block
        time.sleep(0.2)
    clock.stop()
    assert not clock.active


def test_a_failing_interrupt_does_not_break_the_handler(clock: TimeoutClock) -> None:
    def interrupt() -> None:
        raise RuntimeError("the loop is closed")
    clock.start(0.05)
    with pytest.raises(TimedOut), clock.running(), timeout_deferred(interrupt):
        time.sleep(0.2)


class HalfBuilt:
    """What an interrupted ``__init__`` leaves: a cycle whose finalizer fails."""

    def __init__(self) -> None:
        self.cycle = self

    def __del__(self) -> None:
        raise AttributeError("'HalfBuilt' object has no attribute '_closed'")


#: Enough statements that building their AST allocates far past a low gc threshold.
BIG_SOURCE = "\n".join(f"def f{i}(a, b):\n    return [x + {i} for x in (a, b) if x]"
                       for i in range(500))


def formatting_hook(seen: list[str]) -> Any:
    """An unraisable hook that formats the traceback at once, as pytest's does."""
    import traceback

    def hook(args: Any) -> None:
        seen.append("".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                       args.exc_traceback)))
    return hook


def test_finalizer_errors_are_reported_after_the_collection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the wrapper, CPython 3.11 raises SystemError: AST constructor recursion
    depth mismatch from this ast.parse (pytest's, building a report: INTERNALERROR)."""
    seen: list[str] = []
    monkeypatch.setattr("sys.unraisablehook", formatting_hook(seen))
    guard = UnraisableAfterGC()
    guard.install()
    threshold = gc.get_threshold()
    gc.collect()
    try:
        gc.set_threshold(50)
        for _ in range(500):
            HalfBuilt()
        ast.parse(BIG_SOURCE)
    finally:
        gc.set_threshold(*threshold)
        gc.collect()
        guard.uninstall()
    assert seen and all("AttributeError: 'HalfBuilt'" in s for s in seen)
    assert not signals._deferring


def test_the_wrapped_hook_is_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    seen: list[str] = []
    hook = formatting_hook(seen)
    monkeypatch.setattr("sys.unraisablehook", hook)
    guard = UnraisableAfterGC()
    guard.install()
    assert sys.unraisablehook != hook
    guard.uninstall()
    assert sys.unraisablehook is hook


def frame_with_a_lineless_instruction() -> tuple[FrameType, int]:
    """A real frame, and the offset of one of its instructions that has no line number
    (the clean-up of a ``with`` whose ``__exit__`` raised: where a signal can land)."""
    with open(os.devnull) as f:
        f.read(0)
    frame = sys._getframe()
    offset = next(start for start, _end, line in frame.f_code.co_lines() if line is None)
    return frame, offset


def interrupted_there(exc: BaseException) -> BaseException:
    """``exc`` as if raised in a frame interrupted at that instruction."""
    frame, offset = frame_with_a_lineless_instruction()
    lineless = TracebackType(None, frame, offset, -1)
    assert lineless.tb_lineno is None  # what CPython 3.11 gives such an entry
    tb = exc.__traceback__
    assert tb is not None
    while tb.tb_next is not None:
        tb = tb.tb_next
    tb.tb_next = lineless
    return exc


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:
        return e


def test_an_entry_without_a_line_gets_the_line_of_its_statement() -> None:
    exc = interrupted_there(raised(TimedOut("Timeout (>0.1s)")))
    with pytest.raises(TypeError, match="NoneType"):  # pytest's report, unmended
        pytest.ExceptionInfo.from_exception(exc).getrepr()
    assert signals.mend_tracebacks(exc) == 1
    tb = exc.__traceback__
    lines = []
    while tb is not None:
        lines.append(tb.tb_lineno)
        tb = tb.tb_next
    code = frame_with_a_lineless_instruction.__code__
    assert None not in lines
    assert code.co_firstlineno < lines[-1] <= code.co_firstlineno + 6
    assert "Timeout (>0.1s)" in str(pytest.ExceptionInfo.from_exception(exc).getrepr())


def test_chained_exceptions_are_mended_too() -> None:
    cause = interrupted_there(raised(RuntimeError("the loop stopped")))
    exc = raised(TimedOut("Timeout (>0.1s)"))
    exc.__context__ = cause
    assert signals.mend_tracebacks(exc) == 1
    assert "the loop stopped" in str(pytest.ExceptionInfo.from_exception(exc).getrepr())


def test_a_timeout_the_test_swallowed_is_its_verdict_all_the_same(clock: TimeoutClock) -> None:
    """Hypothesis takes pytest's Failed for a failing example: the timeout was caught, and
    the test passed or failed with an error of its own."""
    clock.start(0.05)
    with (pytest.raises(TimedOut), clock.running(), clock.interruptible(),
          contextlib.suppress(TimedOut)):
        wait_for([])


def test_an_error_after_the_timeout_does_not_hide_it(clock: TimeoutClock) -> None:
    clock.start(0.05)
    with pytest.raises(TimedOut) as info, clock.running(), clock.interruptible():
        try:
            wait_for([])
        except TimedOut:
            raise AssertionError("explore: 0 examples: FAILED (Failed)") from None
    assert isinstance(info.value.__cause__, AssertionError)


# -- SIGTERM (issue 9, item 7) ------------------------------------------------------------


@pytest.fixture
def termination(monkeypatch: pytest.MonkeyPatch) -> Iterator[signals.Termination]:
    """A Termination on the real SIGTERM of this process (restored after the test)."""
    monkeypatch.setattr("sys.unraisablehook", sys.unraisablehook)  # it wraps the hook
    term = signals.Termination()
    previous = signal.signal(signal.SIGTERM, term.on_signal)
    try:
        yield term
    finally:
        term.acknowledge()  # ends its watcher thread
        signal.signal(signal.SIGTERM, previous)


class SigtermInFinalizer:
    """A finalizer that is running when the SIGTERM comes (as a garbage collection of the
    harness's asyncio and subprocess objects often is, under load)."""

    def __init__(self, cut: list[bool]) -> None:
        self.cut = cut

    def __del__(self) -> None:
        self.cut.append(True)
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, in the finalizer
        self.cut.clear()  # never reached: the KeyboardInterrupt cut the finalizer short


def test_a_sigterm_a_finalizer_dropped_is_raised_again_after_it(
        termination: signals.Termination) -> None:
    """Python drops an exception raised in a finalizer ("Exception ignored in"): the
    SIGTERM's KeyboardInterrupt was lost and the run went on to its end."""
    cut: list[bool] = []
    went_on: list[bool] = []
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        SigtermInFinalizer(cut)  # no reference: finalized at once
        assert cut == [True], "the SIGTERM did not land in the finalizer"
        wait_for(went_on)  # interrupted here, where it propagates (else: DID NOT RAISE)
    assert termination.redelivered >= 1


def test_every_sigterm_raises_until_the_run_takes_it(termination: signals.Termination) -> None:
    """One caught by code that catches everything is not the last word; after
    acknowledge() (pytest has it in hand, cleanup runs) they are ignored."""
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for([])
    with pytest.raises(KeyboardInterrupt):
        termination.check()  # a safe point raises it again too
    termination.acknowledge()
    os.kill(os.getpid(), signal.SIGTERM)
    termination.check()


def test_the_first_sigterm_is_passed_on_to_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """As SIGTERM, once, so that each xdist worker's own Termination handles it."""
    monkeypatch.setattr("sys.unraisablehook", sys.unraisablehook)
    child = subprocess.Popen([sys.executable, "-c",
                              "import signal, sys\n"
                              "got = []\n"
                              "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
                              "print('ready', flush=True)\n"
                              "sys.stdin.readline()\n"
                              "print(len(got), flush=True)\n"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        term = signals.Termination(lambda: [child.pid])
        for _ in range(2):
            with pytest.raises(KeyboardInterrupt):
                term.on_signal(signal.SIGTERM, None)
        term.acknowledge()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "1\n"
    finally:
        child.kill()
        child.wait()
