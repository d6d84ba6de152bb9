"""A :class:`~harness.machine.Machine` with the conveniences a case uses.

QEMU's own Python has three layers: the protocol (``qemu.qmp``), the process
(``QEMUMachine``) and the test conveniences (``iotests.VM``). Here the first is qemu.qmp,
the second :class:`~harness.machine.Machine`, and this module the third: commands shown
in the test's transcript (:meth:`VM.qmp_log`), HMP, jobs, qemu-io, reopen, and the
file-size-limit checks that tell a void case from a failing one.

The transcript belongs to the case context (:meth:`harness.session.Case.vm` hands it
over); a VM only writes to it, with its ``log_prefix`` when a case runs several VMs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness import block, jobs
from harness.errors import CommandError, MachineError
from harness.guest import Guest
from harness.machine import Machine, qmp_names, tail
from harness.processes import file_size_problem
from harness.transcript import Transcript


class VM(Machine):
    """A Machine that writes its story to a transcript and knows the case helpers."""

    def __init__(self, name: str, qemu: str, *, transcript: Transcript | None = None,
                 log_prefix: str = "", **kw: Any) -> None:
        super().__init__(name, qemu, **kw)
        self.transcript = transcript
        self.log_prefix = log_prefix
        found = [a for a in self.attachments if isinstance(a, Guest)]
        self._guest = found[0] if found else None

    @property
    def has_guest(self) -> bool:
        return self._guest is not None

    @property
    def guest(self) -> Guest:
        """The Linux guest this VM boots (``qio.vm(..., guest=True)``)."""
        if self._guest is None:
            raise MachineError(self.name, "has no guest: create it with qio.vm(..., "
                               "guest=True)")
        return self._guest

    def qmp_log(self, cmd: str, arguments: Mapping[str, Any] | None = None, /, *,
                expect_error: str | bool = False, check: bool = True,
                **kw: Any) -> dict[str, Any]:
        """Run a command, show it and QEMU's reply in the transcript, return the reply.

        An error reply raises CommandError (after it is in the transcript), unless the
        case expects one: ``expect_error=True``, or the error class or a piece of its
        message (``expect_error="read-only"``); then a success raises instead. With
        ``check=False`` either reply is returned (QEMU's answer is what is recorded)."""
        args = {**dict(arguments or {}), **qmp_names(kw)}
        if self.transcript is not None:
            self.transcript.qmp_command(cmd, args, self.log_prefix)
        reply = self.qmp_raw(cmd, args)
        if self.transcript is not None:
            self.transcript.qmp_reply(reply, self.log_prefix)
        sent = {"execute": cmd, "arguments": args}
        if not check:
            return reply
        if "error" in reply and not expect_error:
            raise CommandError(self.name, sent, reply, self.argv, tail(self.log_path))
        if expect_error:
            err = reply.get("error")
            if err is None:
                raise CommandError(self.name, sent, reply, self.argv, tail(self.log_path),
                                   expected=str(expect_error))
            if isinstance(expect_error, str) and expect_error not in (
                    str(err.get("class")), str(err.get("desc"))) and \
                    expect_error not in str(err.get("desc")):
                raise CommandError(self.name, sent, reply, self.argv, tail(self.log_path),
                                   expected=expect_error)
        return reply

    def hmp(self, command_line: str) -> str:
        """A human monitor command through QMP; returns its text output."""
        return str(self.qmp("human-monitor-command", command_line=command_line))

    # -- file-size limit (processes.py owns RLIMIT_FSIZE) ---------------------------------

    def check_file_size(self) -> None:
        """Raise if QEMU hit the file-size limit: it lives on, but its writes past the limit
        failed with EFBIG (SIGXFSZ is blocked in its I/O threads), so the case is void."""
        if self.state != "running":
            return
        problem = file_size_problem(self.pid, self.fsize_limit)
        if problem is not None:
            raise MachineError(self.name, problem, self.argv, None, tail(self.log_path))

    def limit_note(self) -> str:
        """``"; <why>"`` when QEMU hit the file-size limit (a failed write's likely
        cause), else ``""``."""
        problem = file_size_problem(self.pid, self.fsize_limit)
        return "" if problem is None else f"; {problem}"

    # -- conveniences that live in their own modules (they take a VM) ---------------------

    def run_job(self, job_id: str, **kw: Any) -> str | None:
        """:func:`harness.jobs.run_job` on this VM."""
        return jobs.run_job(self, job_id, **kw)

    def qemu_io(self, target: str, command: str, **kw: Any) -> str:
        """:func:`harness.block.qemu_io` on this VM."""
        return block.qemu_io(self, target, command, **kw)

    def blockdev_reopen(self, options: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """:func:`harness.block.blockdev_reopen` on this VM."""
        return block.blockdev_reopen(self, options, **kw)
