"""One ``qemu-system-x86_64`` process, driven over QMP.

The harness listens on a short unix socket and QEMU connects to it
(``-chardev socket,...  -mon mode=control``), so there is no polling for a socket file.
While waiting for that connection the harness also watches the process: a bad option fails
in milliseconds with QEMU's own message instead of after an accept timeout.

States: ``new`` -> ``running`` -> ``stopped`` (``restart()`` goes round again). ``shutdown()``
asks with ``quit``, kills after a timeout, is safe to call twice, and always releases the
socket directory and the event loop. Exits the case did not ask for (a signal, a non-zero
status, a lost QMP connection) raise :class:`MachineExitError` with the command line,
status and log tail.

A QMP call cut short (a ``--timeout``, Ctrl-C, no reply in time) leaves QEMU in a state
nobody knows: the VM's channel is marked unusable, later calls say so, and ``shutdown()``
kills at once instead of asking with ``quit``. The asyncio loop itself is never broken
into: a ``--timeout`` there only cancels the call, and is raised once the loop has
stopped (``harness.signals.timeout_deferred``).

All QMP traffic goes to ``<scratch>/<name>.qmp.log``; QEMU's stdout/stderr to
``<scratch>/<name>.log``. Nothing here writes to the test's transcript: this is the
process layer (QEMU's ``QEMUMachine``). The case-facing conveniences (``qmp_log``,
``run_job``, ``qemu_io``, the transcript) are :class:`harness.vm.VM`, a subclass the case
context creates; the harness's own reads (the oracle, the probe) need only this channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self

from qemu.qmp import ExecuteError, QMPClient, Runstate
from qemu.qmp.error import QMPError as LibQMPError

from harness import signals, tmpdirs
from harness.errors import (
    CommandError,
    ConfigError,
    LaunchError,
    MachineExitError,
    MachineStateError,
    MachineTimeout,
)
from harness.processes import REGISTRY, exited, kill_group, max_file_size, wait_exit

SOCKET_PATH_MAX = 107
LAUNCH_TIMEOUT = 30.0
#: How long a cancelled QMP call may take to unwind before its channel is given up.
CANCEL_TIMEOUT = 5.0

EventMatch = Callable[[dict[str, Any]], bool]


def qmp_names(kw: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keyword names as QMP spells them: ``_`` becomes ``-``."""
    return {k.replace("_", "-"): v for k, v in kw.items()}


class Observer(Protocol):
    """Who sees every command, event and life-cycle step of a Machine (the oracle)."""

    def launched(self, vm: Machine) -> None: ...
    def before_command(self, vm: Machine, cmd: str, args: dict[str, Any]) -> None: ...
    def after_command(self, vm: Machine, cmd: str, args: dict[str, Any],
                      reply: dict[str, Any]) -> None: ...
    def event(self, vm: Machine, event: dict[str, Any]) -> None: ...
    def before_shutdown(self, vm: Machine) -> None: ...
    def exited(self, vm: Machine, clean: bool) -> None: ...
    def device_write_started(self, vm: Machine, device: str, offset: int,
                             length: int) -> object: ...
    def device_write_done(self, vm: Machine, token: object, ok: bool) -> None: ...


class Attachment(Protocol):
    """Something that lives with the QEMU process: adds options, is set up before QEMU
    starts and after it is up, and ends with it (a guest and its console,
    :class:`harness.guest.Guest`)."""

    def argv(self, vm: Machine) -> list[str]: ...
    def before_spawn(self, vm: Machine) -> None: ...
    def after_launch(self, vm: Machine) -> None: ...
    def before_quit(self, vm: Machine) -> None: ...
    def after_exit(self, vm: Machine) -> None: ...


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file ('' if it does not exist)."""
    try:
        data = path.read_bytes()[-16384:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def short_socket_dir() -> Path:
    """A fresh directory whose socket paths stay far below the AF_UNIX limit."""
    # TMPDIR when it is short (a CI runner's, a test's own); macOS's long one is not
    tmp = tempfile.gettempdir()
    base = tmp if len(tmp) <= 40 or not os.path.isdir("/tmp") else "/tmp"
    with signals.timeout_deferred():  # made and handed over as one step
        # named after this process: whatever its owner never removes goes at the exit
        # (or in the next sweep, if this process is killed): harness.tmpdirs
        return tmpdirs.make(base=base)


class Machine:
    """A QEMU system emulator process with a QMP connection; a context manager."""

    def __init__(
        self,
        name: str,
        qemu: str,
        *,
        scratch: Path,
        accel: str = "tcg",
        args: Sequence[str] = (),
        machine_type: str = "pc",
        sockdir: Path | None = None,
        qmp_timeout: float = 60.0,
        env: dict[str, str] | None = None,
        observer: Observer | None = None,
        attachments: Sequence[Attachment] = (),
    ) -> None:
        self.name = name
        self.qemu = qemu
        self.scratch = Path(scratch)
        self.accel = accel
        self.args = list(args)
        self.machine_type = machine_type
        self.qmp_timeout = qmp_timeout
        self.env = env
        self.observer = observer
        self.attachments = list(attachments)
        self._own_sockdir = sockdir is None
        self._sockdir = sockdir
        self.state = "new"
        self.exit_status: int | None = None
        self._proc: subprocess.Popen[Any] | None = None
        self._client: QMPClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: list[dict[str, Any]] = []
        self._unobserved: list[dict[str, Any]] = []
        self._commands: frozenset[str] | None = None
        self._qmp_log: IO[str] | None = None
        self._expect_exit = False
        self._unusable: str | None = None  # why the QMP channel cannot be trusted
        self.fsize_limit: int | None = None  # RLIMIT_FSIZE the process was started under
        self.log_path = self.scratch / f"{name}.log"
        self.qmp_log_path = self.scratch / f"{name}.qmp.log"
        self.launches = 0

    # -- life cycle -----------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        if self._sockdir is None:
            raise MachineStateError(self.name, "has no socket directory before launch()")
        return self._sockdir / f"{self.name}.qmp"

    @property
    def argv(self) -> list[str]:
        machine = "none" if self.machine_type == "none" else self.machine_type
        return [
            self.qemu, "-nodefaults", "-display", "none", "-no-user-config",
            "-machine", machine, "-accel", self.accel,
            "-chardev", f"socket,id=qmp,path={self.socket_path}",
            "-mon", "chardev=qmp,mode=control",
            *self.args,
            *(arg for a in self.attachments for arg in a.argv(self)),
        ]

    @property
    def channel_usable(self) -> bool:
        """Whether QMP calls can be made: QEMU runs and no call to it was cut short."""
        return self.state == "running" and self._unusable is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> Self:
        if self.state != "running":
            self.launch()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.shutdown()
        else:
            # the body failed: stop QEMU without hiding the real error behind a second one
            self.shutdown(check=False, timeout=3.0)

    def launch(self) -> None:
        """Start QEMU and wait until it has connected to QMP (or died trying)."""
        if self.state == "running":
            raise MachineStateError(self.name, "launch() on a VM that is already running")
        self.scratch.mkdir(parents=True, exist_ok=True)
        if self._sockdir is None or (self._own_sockdir and not self._sockdir.is_dir()):
            self._sockdir = short_socket_dir()
        if len(str(self.socket_path).encode()) > SOCKET_PATH_MAX:
            if self._own_sockdir:
                shutil.rmtree(self._sockdir, ignore_errors=True)
            raise ConfigError(
                f"vm {self.name!r}: QMP socket path {self.socket_path} is longer than "
                f"{SOCKET_PATH_MAX} bytes; use a shorter socket directory"
            )
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._events = []
        self._unobserved = []
        self._commands = None
        self.exit_status = None
        self._expect_exit = False
        self._unusable = None
        with signals.timeout_deferred():  # half-built, they would fail at their finalizers
            self._loop = asyncio.new_event_loop()
            self._client = QMPClient(self.name)
            self._qmp_log = open(self.qmp_log_path, "a", encoding="utf-8")  # noqa: SIM115
        self._debug(f"launch #{self.launches + 1}: {' '.join(self.argv)}")
        try:
            self._run(self._client.start_server(str(self.socket_path)), LAUNCH_TIMEOUT)
            for a in self.attachments:
                a.before_spawn(self)
            env = dict(os.environ if self.env is None else self.env)
            env.update(LANG="C", LC_ALL="C", TZ="UTC")
            with open(self.log_path, "ab") as logf:
                self.fsize_limit = max_file_size()
                self._proc = REGISTRY.spawn(
                    self.argv, f"{self.name} ({self.qemu})", stdout=logf,
                    stderr=subprocess.STDOUT, env=env,
                )
            self._run(self._accept_or_exit(), LAUNCH_TIMEOUT + 5)
        except BaseException as e:
            status = self._reap(kill=True)
            self._close_channels()
            self.state = "stopped"
            for a in self.attachments:
                a.after_exit(self)
            if isinstance(e, LaunchError):
                raise
            if isinstance(e, asyncio.TimeoutError | TimeoutError):
                raise LaunchError(
                    self.name, f"did not connect to QMP within {LAUNCH_TIMEOUT:g} s",
                    self.argv, status, tail(self.log_path),
                ) from None
            if isinstance(e, Exception):
                raise LaunchError(self.name, f"failed to start: {e}", self.argv, status,
                                  tail(self.log_path)) from e
            raise
        self.launches += 1
        self.state = "running"
        if self.observer is not None:
            self.observer.launched(self)
        for a in self.attachments:
            try:
                a.after_launch(self)  # (a guest boots to its ready marker)
            except BaseException:
                self.shutdown(check=False, timeout=3.0)  # the error says why, not this
                raise

    async def _accept_or_exit(self) -> None:
        assert self._client is not None and self._proc is not None
        accept = asyncio.ensure_future(self._client.accept())
        try:
            while not accept.done():
                if exited(self._proc):
                    accept.cancel()
                    raise LaunchError(
                        self.name, "exited while starting", self.argv,
                        self._reap(kill=False), tail(self.log_path),
                    )
                await asyncio.wait({accept}, timeout=0.01)
            accept.result()
        finally:
            if not accept.done():
                accept.cancel()

    def shutdown(self, timeout: float = 10.0, check: bool = True) -> int | None:
        """``quit``, wait, kill after ``timeout``; safe on a stopped VM. Returns the status.

        With ``check`` an exit the case did not ask for raises MachineExitError.
        """
        if self.state != "running":
            return self.exit_status
        unexpected = self._proc is not None and exited(self._proc)
        if not unexpected and self._unusable is not None:
            # nobody knows what QEMU is doing: asking it to quit would only wait
            self._debug(f"killed without quit: {self._unusable}")
            status = self._reap(kill=True)
            self._finish(status)
            if check and not self._expect_exit:
                raise MachineTimeout(self.name, "was killed at shutdown without 'quit': "
                                     f"{self._unusable}", self.argv, status,
                                     tail(self.log_path))
            return status
        if not unexpected:
            # the observer sees what QEMU said before it was asked to quit (a migration
            # that completed while the case was busy with the other VM)
            with contextlib.suppress(Exception):
                self._drain_events()
                self._notify()
        if not unexpected and check:
            for a in self.attachments:
                a.before_quit(self)  # a guest powers off cleanly
            if self.observer is not None:
                self.observer.before_shutdown(self)
        deadline = time.monotonic() + timeout
        if not unexpected:
            with contextlib.suppress(Exception):
                self._run(self._client_execute("quit", {}), timeout)
            # close our end while QEMU exits instead of after: it saves a round of the loop
            with contextlib.suppress(Exception):
                self._run(self._client_disconnect(), max(deadline - time.monotonic(), 0.01))
        status = self._reap(kill=False, timeout=max(deadline - time.monotonic(), 0.0))
        killed = False
        if status is None:
            status = self._reap(kill=True)
            killed = True
        self._finish(status, clean=status == 0 and not unexpected)
        if check and not self._expect_exit:
            if killed:
                raise MachineTimeout(self.name, f"did not exit within {timeout:g} s of "
                                     "'quit' and was killed", self.argv, status,
                                     tail(self.log_path))
            if unexpected or status != 0:
                raise MachineExitError(self.name, "exited when the case did not ask it to"
                                       if unexpected else "quit with a failure status",
                                       self.argv, status, tail(self.log_path))
        return status

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        """Kill QEMU on purpose (a crash scenario); the exit is expected, not a failure."""
        self._require_running("kill")
        assert self._proc is not None
        self._debug(f"killing with {signal.Signals(sig).name}")
        self._expect_exit = True
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(sig)
        status = self._reap(kill=False, timeout=10.0)
        if status is None:
            status = self._reap(kill=True)
        self._finish(status)
        return status

    def wait_exit(self, timeout: float = 10.0) -> int | None:
        """Wait for QEMU to end by itself, as the case expects (the destination of a
        migration that failed or was cancelled exits with status 1); killed if it does
        not within ``timeout``, which raises MachineTimeout. Returns the status."""
        self._require_running("wait_exit")
        assert self._proc is not None
        self._debug("waiting for it to exit by itself")
        self._expect_exit = True
        status = self._reap(kill=False, timeout=timeout)
        if status is None:
            status = self._reap(kill=True)
            self._finish(status)
            raise MachineTimeout(self.name, f"did not exit within {timeout:g} s and was "
                                 "killed", self.argv, status, tail(self.log_path))
        self._finish(status)
        return status

    def restart(self) -> None:
        """Shut down cleanly and start again with the same command line."""
        self.shutdown()
        self.launch()

    def check_alive(self) -> None:
        """Raise MachineExitError if QEMU has ended without being asked to."""
        if self.state == "running" and self._proc is not None and exited(self._proc):
            status = self._reap(kill=False)
            self._finish(status)
            if self._expect_exit:
                return  # the case sent quit itself
            raise MachineExitError(self.name, "died when the case did not ask it to",
                                   self.argv, status, tail(self.log_path))

    def _reap(self, kill: bool, timeout: float = 5.0) -> int | None:
        if self._proc is None:
            return None
        if kill and not exited(self._proc):
            kill_group(self._proc.pid)  # QEMU and whatever it started
        status = wait_exit(self._proc, timeout)
        if status is not None:
            REGISTRY.forget(self._proc.pid)
        return status

    def _finish(self, status: int | None, clean: bool = False) -> None:
        """The process is gone: close the channels, then tell the observer (a clean
        exit stored the persistent bitmaps; any other one left them as they were)."""
        with signals.timeout_deferred():  # half done, the VM would be neither state
            self.exit_status = status
            self._debug(f"exited: status {status}")
            self._close_channels()
            self.state = "stopped"
            for a in self.attachments:
                a.after_exit(self)
        if self.observer is not None:
            self.observer.exited(self, clean)

    def _close_channels(self) -> None:
        with signals.timeout_deferred():  # every step, or a socket dir is left behind
            if (self._client is not None and self._loop is not None
                    and self._client.runstate != Runstate.IDLE):
                with contextlib.suppress(Exception):
                    self._loop.run_until_complete(
                        asyncio.wait_for(self._client.disconnect(), 5))
            if self._loop is not None:
                # no async generators run on this loop: closing it needs no extra round
                self._loop.close()
            self._client = None
            self._loop = None
            if self._qmp_log is not None:
                self._qmp_log.close()
                self._qmp_log = None
            if self._sockdir is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.socket_path.unlink()
                if self._own_sockdir:
                    # the path stays known so error messages can still show the command line
                    shutil.rmtree(self._sockdir, ignore_errors=True)

    # -- QMP ------------------------------------------------------------------------------

    def _run(self, coro: Any, timeout: float, command: str | None = None) -> Any:
        """Run one coroutine on this VM's loop.

        A ``--timeout`` never breaks into the loop: it cancels the task, and is raised
        when the loop has stopped. On any other interruption (Ctrl-C) the task is
        cancelled and given :data:`CANCEL_TIMEOUT` to unwind, so nothing is left pending
        to fail later with an error nobody collects. When ``command`` (a QMP call) is cut
        short, the channel is marked unusable."""
        loop = self._loop
        assert loop is not None
        task = loop.create_task(asyncio.wait_for(coro, timeout))
        try:
            with signals.timeout_deferred(lambda: loop.call_soon_threadsafe(task.cancel)):
                return loop.run_until_complete(task)
        except BaseException:
            with signals.timeout_deferred():
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        loop.run_until_complete(asyncio.wait({task}, timeout=CANCEL_TIMEOUT))
                if not task.done():
                    self._unusable = "a QMP exchange did not end when it was cancelled"
                elif command is not None and task.cancelled():
                    self._unusable = f"{command} was interrupted before its reply"
            raise

    async def _client_disconnect(self) -> None:
        assert self._client is not None
        await self._client.disconnect()

    async def _client_execute(self, cmd: str, args: dict[str, Any]) -> Any:
        assert self._client is not None
        return await self._client.execute(cmd, args or None)

    def _require_running(self, what: str) -> None:
        if self.state != "running":
            raise MachineStateError(self.name, f"is not running ({what})")

    def _debug(self, text: str) -> None:
        if self._qmp_log is not None:
            self._qmp_log.write(f"{time.monotonic():.6f} # {text}\n")
            self._qmp_log.flush()

    def _drain_events(self) -> None:
        assert self._client is not None
        for ev in self._client.events.clear():
            self._record_event(dict(ev))

    def _record_event(self, ev: dict[str, Any]) -> None:
        self._events.append(ev)
        if self._qmp_log is not None:
            self._qmp_log.write(f"{time.monotonic():.6f} <- {json.dumps(ev)}\n")
        self._unobserved.append(ev)

    def _notify(self) -> None:
        """Hand the observer the events received so far, in order. Called between
        commands, never inside one: an event that arrives with a reply (a job that fails
        at once) must reach the observer after the command that started the job."""
        while self._unobserved:
            ev = self._unobserved.pop(0)
            if self.observer is not None:
                self.observer.event(self, ev)

    def execute(self, cmd: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The QMP channel itself: send one command, return QEMU's reply message
        (``return`` or ``error``). Nobody else sees it: no observer, no transcript. For
        the harness's own reads (the oracle's NBD view); cases use :meth:`qmp`."""
        self._require_running(cmd)
        self.check_alive()
        if self._unusable is not None:
            raise MachineStateError(self.name, f"has no usable QMP channel: {self._unusable} "
                                    f"({cmd})")
        args = dict(args or {})
        if cmd == "quit":
            self._expect_exit = True  # the case asked for it: an exit is not a death
        sent: dict[str, Any] = {"execute": cmd, **({"arguments": args} if args else {})}
        assert self._qmp_log is not None
        self._drain_events()
        self._qmp_log.write(f"{time.monotonic():.6f} -> {json.dumps(sent)}\n")
        try:
            result = self._run(self._client_execute(cmd, args), self.qmp_timeout, cmd)
            reply: dict[str, Any] = {"return": result}
        except ExecuteError as e:
            received = dict(e.received)
            reply = {"error": received.get("error", {"class": e.error_class, "desc": str(e)})}
        except TimeoutError:
            self._drain_events_safely()
            self._unusable = f"no reply to {cmd} within {self.qmp_timeout:g} s"
            raise MachineTimeout(self.name, f"no reply to {cmd} within {self.qmp_timeout:g} s",
                                 self.argv, None, tail(self.log_path)) from None
        except (LibQMPError, OSError, EOFError) as e:
            self._lost_connection(cmd, e)
            raise  # unreachable: _lost_connection raises
        self._qmp_log.write(f"{time.monotonic():.6f} <- {json.dumps(reply)}\n")
        self._drain_events()
        return reply

    def qmp_raw(self, cmd: str, arguments: Mapping[str, Any] | None = None, /,
                **kw: Any) -> dict[str, Any]:
        """Run a command the observer sees; return the reply message, errors included.

        Keyword names are QMP names with ``-`` written ``_`` (``job_id=`` is
        ``"job-id"``), as in QEMU's own Python; for a name that really has an ``_``,
        pass the arguments as a dict (sent as they are), alone or with keywords."""
        args = {**dict(arguments or {}), **qmp_names(kw)}
        self._require_running(cmd)
        self._drain_events()
        self._notify()
        if self.observer is not None:
            self.observer.before_command(self, cmd, args)
        reply = self.execute(cmd, args)
        if self.observer is not None:
            self.observer.after_command(self, cmd, args, reply)
        self._notify()
        return reply

    def _drain_events_safely(self) -> None:
        with contextlib.suppress(Exception):
            self._drain_events()

    def _lost_connection(self, cmd: str, err: BaseException) -> None:
        status = self._reap(kill=False, timeout=3.0)
        if status is None:
            status = self._reap(kill=True)
        self._finish(status)
        raise MachineExitError(self.name, f"QMP connection lost during {cmd} ({err!r})",
                               self.argv, status, tail(self.log_path)) from err

    def qmp(self, cmd: str, arguments: Mapping[str, Any] | None = None, /,
            **kw: Any) -> Any:
        """Run a command and return its result; an error reply raises CommandError."""
        args = {**dict(arguments or {}), **qmp_names(kw)}
        reply = self.qmp_raw(cmd, args)
        if "error" in reply:
            raise CommandError(self.name, {"execute": cmd, "arguments": args}, reply,
                               self.argv, tail(self.log_path))
        return reply["return"]

    def undo(self, cmd: str, **args: Any) -> None:
        """A QMP command that undoes a step, for a ``finally``: it never hides the real cause.

        On a VM that is no longer running, or whose QMP channel is unusable (a call was cut
        short), it does nothing: what stopped it (a death with its signal and log tail, a
        timeout) has been raised already and is the error to report.
        A VM that died since raises that death (MachineExitError), not "is not running".
        While another exception is on its way out, an error reply to the undo is only
        logged, so that exception stays the one reported. It goes on the raw channel
        (:meth:`execute`): undoing the harness's own steps is nothing the oracle follows.
        """
        if self.state != "running" or self._unusable is not None:
            self._debug(f"{cmd} skipped: the VM is {self.state}"
                        + (f", {self._unusable}" if self._unusable else ""))
            return
        sent = qmp_names(args)
        reply = self.execute(cmd, sent)
        if "error" in reply:
            e = CommandError(self.name, {"execute": cmd, "arguments": sent}, reply, self.argv)
            if sys.exc_info()[1] is None:  # nothing else on its way out: this is the error
                raise e
            self._debug(f"{cmd} failed while another error was raised: {e.desc}")

    def has_command(self, name: str) -> bool:
        """Whether this QEMU knows QMP command ``name`` (asked once per launch)."""
        if self._commands is None:
            reply = self.execute("query-commands")
            self._commands = frozenset(c["name"] for c in reply.get("return", []))
        return name in self._commands

    # -- events ---------------------------------------------------------------------------

    def events(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Take (and forget) the events received so far, optionally only some names."""
        self._require_running("events")
        self._drain_events()
        self._notify()
        wanted = None if names is None else set(names)
        taken = [e for e in self._events if wanted is None or e["event"] in wanted]
        self._events = [e for e in self._events if e not in taken]
        return taken

    def event_wait(
        self,
        names: str | Iterable[str],
        timeout: float = 60.0,
        match: EventMatch | None = None,
    ) -> dict[str, Any]:
        """Wait for the first event with one of ``names`` (and ``match``), and take it."""
        self._require_running("event_wait")
        wanted = {names} if isinstance(names, str) else set(names)
        deadline = time.monotonic() + timeout
        self._drain_events()
        while True:
            for i, ev in enumerate(self._events):
                if ev["event"] in wanted and (match is None or match(ev)):
                    self._notify()
                    return self._events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise MachineTimeout(self.name, f"no {'/'.join(sorted(wanted))} event within "
                                     f"{timeout:g} s", self.argv, None, tail(self.log_path))
            self.check_alive()
            try:
                ev = self._run(self._next_event(), min(left, 0.5))
            except TimeoutError:
                continue
            except (LibQMPError, OSError, EOFError) as e:
                self._lost_connection("event_wait", e)
            self._record_event(dict(ev))

    async def _next_event(self) -> Any:
        assert self._client is not None
        return await self._client.events.get()
