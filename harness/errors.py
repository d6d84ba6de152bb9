"""The harness's one exception tree.

Every error the harness raises on purpose derives from :class:`HarnessError`, so a case or
the pytest plugin can tell "the harness says something is wrong" from a Python bug::

    HarnessError
     +-- ConfigError            bad option, missing binary, unusable accelerator
     +-- Qcow2FormatError       an image file that is not the qcow2 it should be
     +-- GoldenError            golden file problems (missing section, bad header)
     +-- TranscriptError        a transcript line that would break its golden file
     +-- ModelError             the model was told something impossible (unknown node...)
     +-- UnmodelledCommand      a command that changes data or bitmaps the oracle cannot
     |                          follow (refused before it is sent)
     +-- OracleFailure          a bitmap misses writes the model says it saw
     +-- RestoreMismatch        a restored backup chain differs from its reference
     +-- ToolError              qemu-img / qemu-io / qemu-nbd exited non-zero
     +-- MachineError           anything about one QEMU process (carries its log tail)
          +-- LaunchError       QEMU exited or never connected while starting
          +-- MachineExitError  QEMU died (signal, non-zero status) when nobody asked
          +-- CommandError      a QMP command QEMU answered with an error
          |                     (not qemu.qmp's QMPError, the library's own root)
          +-- MachineTimeout    an event, a job or a shutdown did not come in time
          +-- MachineStateError a call that needs a running VM on a stopped one
          +-- GuestError        the Linux guest in it did not boot, or a command in it
                                failed (carries the console's tail)

Subclasses keep the context a bug report needs (argv, exit status, what was sent and
received), so the message alone explains the failure.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.model import Verdict


class HarnessError(Exception):
    """Root of every error raised by the harness on purpose."""


class ConfigError(HarnessError):
    """The environment or the options cannot work: say what and where in one sentence."""


class Qcow2FormatError(HarnessError, ValueError):
    """An image file is not a well-formed qcow2 file (or not qcow2 at all)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class OracleFailure(HarnessError, AssertionError):
    """A bitmap QEMU calls consistent misses writes the model recorded (the reference bug).

    ``verdicts`` are the comparisons of the check that failed (good ones included, for
    context), kept as data so a report can draw them (``harness.svg``); empty when the
    failure is not about ranges (a bitmap gone, QEMU's views disagreeing).
    """

    def __init__(self, message: str, verdicts: Sequence[Verdict] = ()) -> None:
        super().__init__(message)
        self.verdicts = list(verdicts)


class GoldenError(HarnessError):
    """A golden file cannot be used as it is (missing section, duplicate header...)."""


class TranscriptError(HarnessError, ValueError):
    """A line given to a transcript would read as a golden section header."""


class ModelError(HarnessError):
    """The model was told something impossible (an unknown node or bitmap, a write
    outside the disk): a harness or case bug, not a QEMU one."""


class UnmodelledCommand(HarnessError):
    """A command that moves data or changes bitmaps, which the oracle cannot follow.

    Raised before the command is sent, so QEMU and the model stay in step; the message
    names the command and says how to proceed (model it, or tell the oracle by hand)."""


class RestoreMismatch(HarnessError, AssertionError):
    """A restored backup chain differs from the source at the time of the backup."""


def describe_status(status: int | None, running: bool = False) -> str:
    """Say how a process ended, the way a person would ("killed by SIGKILL")."""
    if status is None:
        return "still running" if running else "did not finish"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        if -status == signal.SIGXFSZ:
            from harness.processes import limit_note

            return f"killed by SIGXFSZ: it wrote past {limit_note()}"
        return f"killed by {name}"
    return f"exit status {status}"


def format_argv(argv: Sequence[str]) -> str:
    """A command line that can be pasted into a shell."""
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


class ToolError(HarnessError):
    """A qemu-img / qemu-io / qemu-nbd run failed."""

    def __init__(self, argv: Sequence[str], status: int | None, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        detail = (stderr.strip() or stdout.strip() or "(no output)").splitlines()[-10:]
        super().__init__(
            f"{self.argv[0].rsplit('/', 1)[-1]} failed ({describe_status(status)}): "
            + "\n  ".join(detail)
            + f"\n  command: {format_argv(self.argv)}"
        )


class MachineError(HarnessError):
    """Something about one QEMU process; the message ends with its command line and log."""

    def __init__(
        self,
        vm: str,
        message: str,
        argv: Sequence[str] = (),
        status: int | None = None,
        log_tail: str = "",
    ) -> None:
        self.vm = vm
        self.argv = list(argv)
        self.status = status
        self.log_tail = log_tail
        self.reason = message
        first = f"vm {vm!r}: {message}"
        if status == -signal.SIGXFSZ:
            first += f" ({describe_status(status)})"
        parts = [first]
        if self.argv:
            parts.append(f"  command: {format_argv(self.argv)}")
        if status is not None:
            parts.append(f"  status: {describe_status(status)}")
        if log_tail.strip():
            parts.append("  log tail:\n" + "\n".join("    " + ln for ln in log_tail.splitlines()))
        super().__init__("\n".join(parts))


class LaunchError(MachineError):
    """QEMU exited, or never connected to the QMP socket, while starting."""


class MachineExitError(MachineError):
    """QEMU ended when the case did not ask it to (signal, non-zero status, lost QMP)."""


class MachineTimeout(MachineError):
    """An event, a job or a shutdown did not happen within its timeout."""


class MachineStateError(MachineError):
    """A call that needs a running VM was made on one that is not running."""


class GuestError(MachineError):
    """The guest never reached its ready marker, panicked, or a command in it failed;
    the message ends with the console's last lines."""


class CommandError(MachineError):
    """QEMU answered a QMP command with an error; keeps what was sent and received."""

    def __init__(self, vm: str, sent: dict[str, Any], received: dict[str, Any],
                 argv: Sequence[str] = (), log_tail: str = "",
                 expected: str | None = None) -> None:
        self.sent = sent
        self.received = received
        self.expected = expected
        err = received.get("error", {})
        self.error_class: str = str(err.get("class", "?"))
        self.desc: str = str(err.get("desc", "?"))
        if expected is None:
            what = f"{sent.get('execute')} failed: {self.error_class}: {self.desc}"
        elif "error" not in received:
            what = f"{sent.get('execute')} succeeded, but the case expected an error ({expected})"
        else:
            what = (f"{sent.get('execute')} failed with {self.error_class}: {self.desc}, "
                    f"but the case expected {expected!r}")
        super().__init__(vm, f"{what}\n  sent: {sent}\n  received: {received}", argv, None,
                         log_tail)
