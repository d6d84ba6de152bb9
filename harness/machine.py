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

All QMP traffic goes to ``<scratch>/<name>.qmp.log``; QEMU's stdout/stderr to
``<scratch>/<name>.log``. Only ``qmp_log``, ``run_job`` and ``qemu_io(log=True)`` write to
the test's transcript.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from qemu.qmp import ExecuteError, QMPClient, Runstate
from qemu.qmp.error import QMPError as LibQMPError

from harness.errors import (
    ConfigError,
    LaunchError,
    MachineError,
    MachineExitError,
    MachineStateError,
    MachineTimeout,
    QMPError,
)
from harness.processes import (
    REGISTRY,
    exited,
    file_size_limit_hit,
    kill_group,
    limit_note,
    max_file_size,
    wait_exit,
)
from harness.transcript import Transcript

SOCKET_PATH_MAX = 107
LAUNCH_TIMEOUT = 30.0
JOB_EVENTS = (
    "JOB_STATUS_CHANGE", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR", "BLOCK_JOB_PENDING",
)

EventMatch = Callable[[dict[str, Any]], bool]


def blockdev(options: dict[str, Any]) -> list[str]:
    """``-blockdev`` arguments in JSON form, so any option tree can be given as a dict."""
    return ["-blockdev", json.dumps(options)]


def qcow2_node(path: str | Path, node: str, read_only: bool = False,
               **extra: Any) -> dict[str, Any]:
    """Options for a qcow2 node over a file node, as ``-blockdev`` or ``blockdev-add`` take."""
    opts: dict[str, Any] = {
        "driver": "qcow2", "node-name": node,
        "file": {"driver": "file", "filename": str(path)},
    }
    if read_only:
        opts["read-only"] = True
    opts.update(extra)
    return opts


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file ('' if it does not exist)."""
    try:
        data = path.read_bytes()[-16384:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def short_socket_dir() -> Path:
    """A fresh directory whose socket paths stay far below the AF_UNIX limit."""
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    return Path(tempfile.mkdtemp(prefix="qio-", dir=base))


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
        transcript: Transcript | None = None,
        log_prefix: str = "",
        qmp_timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.qemu = qemu
        self.scratch = Path(scratch)
        self.accel = accel
        self.args = list(args)
        self.machine_type = machine_type
        self.transcript = transcript
        self.log_prefix = log_prefix
        self.qmp_timeout = qmp_timeout
        self.env = env
        self._own_sockdir = sockdir is None
        self._sockdir = sockdir
        self.state = "new"
        self.exit_status: int | None = None
        self._proc: subprocess.Popen[Any] | None = None
        self._client: QMPClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: list[dict[str, Any]] = []
        self._commands: frozenset[str] | None = None
        self._qmp_log: IO[str] | None = None
        self._expect_exit = False
        self._fsize: int | None = None
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
        ]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> Machine:
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
        self._commands = None
        self.exit_status = None
        self._expect_exit = False
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(self.name)
        self._qmp_log = open(self.qmp_log_path, "a", encoding="utf-8")  # noqa: SIM115
        self._debug(f"launch #{self.launches + 1}: {' '.join(self.argv)}")
        try:
            self._run(self._client.start_server(str(self.socket_path)), LAUNCH_TIMEOUT)
            env = dict(os.environ if self.env is None else self.env)
            env.update(LANG="C", LC_ALL="C", TZ="UTC")
            with open(self.log_path, "ab") as logf:
                self._fsize = max_file_size()
                self._proc = REGISTRY.spawn(
                    self.argv, f"{self.name} ({self.qemu})", stdout=logf,
                    stderr=subprocess.STDOUT, env=env,
                )
            self._run(self._accept_or_exit(), LAUNCH_TIMEOUT + 5)
        except BaseException as e:
            status = self._reap(kill=True)
            self._close_channels()
            self.state = "stopped"
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
        limit_hit = not unexpected and self._limit_hit()
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
        self._finish(status)
        if check and limit_hit:
            raise MachineError(self.name, self._limit_sentence(), self.argv, status,
                               tail(self.log_path))
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

    def check_file_size(self) -> None:
        """Raise if QEMU hit the file-size limit: it lives on, but its writes past the limit
        failed with EFBIG (SIGXFSZ is blocked in its I/O threads), so the case is void."""
        if self.state == "running" and self._limit_hit():
            raise MachineError(self.name, self._limit_sentence(), self.argv, None,
                               tail(self.log_path))

    def _limit_hit(self) -> bool:
        return self._proc is not None and file_size_limit_hit(self._proc.pid)

    def _limit_sentence(self) -> str:
        return f"a write reached {limit_note(self._fsize)}, so QEMU got EFBIG (SIGXFSZ)"

    def _reap(self, kill: bool, timeout: float = 5.0) -> int | None:
        if self._proc is None:
            return None
        if kill and not exited(self._proc):
            kill_group(self._proc.pid)  # QEMU and whatever it started
        status = wait_exit(self._proc, timeout)
        if status is not None:
            REGISTRY.forget(self._proc.pid)
        return status

    def _finish(self, status: int | None) -> None:
        self.exit_status = status
        self._debug(f"exited: status {status}")
        self._close_channels()
        self.state = "stopped"

    def _close_channels(self) -> None:
        if (self._client is not None and self._loop is not None
                and self._client.runstate != Runstate.IDLE):
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 5))
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

    def _run(self, coro: Any, timeout: float) -> Any:
        """Run one coroutine on this VM's loop; on any interruption (timeout, Ctrl-C, a
        pytest-timeout signal) the task is cancelled and awaited, so nothing is left
        pending to fail later with an error nobody collects."""
        assert self._loop is not None
        task = self._loop.create_task(asyncio.wait_for(coro, timeout))
        try:
            return self._loop.run_until_complete(task)
        except BaseException:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    self._loop.run_until_complete(task)
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

    def qmp_raw(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Run a command and return QEMU's reply message (``return`` or ``error``)."""
        self._require_running(cmd)
        self.check_alive()
        if cmd == "quit":
            self._expect_exit = True  # the case asked for it: an exit is not a death
        sent: dict[str, Any] = {"execute": cmd, **({"arguments": args} if args else {})}
        assert self._qmp_log is not None
        self._qmp_log.write(f"{time.monotonic():.6f} -> {json.dumps(sent)}\n")
        try:
            result = self._run(self._client_execute(cmd, args), self.qmp_timeout)
            reply: dict[str, Any] = {"return": result}
        except ExecuteError as e:
            received = dict(e.received)
            reply = {"error": received.get("error", {"class": e.error_class, "desc": str(e)})}
        except TimeoutError:
            self._drain_events_safely()
            raise MachineTimeout(self.name, f"no reply to {cmd} within {self.qmp_timeout:g} s",
                                 self.argv, None, tail(self.log_path)) from None
        except (LibQMPError, OSError, EOFError) as e:
            self._lost_connection(cmd, e)
            raise  # unreachable: _lost_connection raises
        self._qmp_log.write(f"{time.monotonic():.6f} <- {json.dumps(reply)}\n")
        self._drain_events()
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

    def qmp(self, cmd: str, **args: Any) -> Any:
        """Run a command and return its result; an error reply raises QMPError."""
        reply = self.qmp_raw(cmd, **args)
        if "error" in reply:
            sent = {"execute": cmd, "arguments": args}
            raise QMPError(self.name, sent, reply, self.argv, tail(self.log_path))
        return reply["return"]

    def qmp_log(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Run a command, write it and QEMU's reply to the transcript, return the reply."""
        if self.transcript is not None:
            self.transcript.qmp_command(cmd, args, self.log_prefix)
        reply = self.qmp_raw(cmd, **args)
        if self.transcript is not None:
            self.transcript.qmp_reply(reply, self.log_prefix)
        return reply

    def undo(self, cmd: str, **args: Any) -> None:
        """A QMP command that undoes a step, for a ``finally``: it never hides the real cause.

        On a VM that is no longer running it does nothing: what stopped it (a death with its
        signal and log tail, a timeout) has been raised already and is the error to report.
        A VM that died since raises that death (MachineExitError), not "is not running".
        While another exception is on its way out, an error reply to the undo is only
        logged, so that exception stays the one reported.
        """
        if self.state != "running":
            self._debug(f"{cmd} skipped: the VM is {self.state}")
            return
        try:
            self.qmp(cmd, **args)
        except QMPError as e:
            if e.__context__ is None:  # nothing else on its way out: this is the error
                raise
            self._debug(f"{cmd} failed while another error was raised: {e.desc}")

    def has_command(self, name: str) -> bool:
        """Whether this QEMU knows QMP command ``name`` (asked once per launch)."""
        if self._commands is None:
            self._commands = frozenset(c["name"] for c in self.qmp("query-commands"))
        return name in self._commands

    def blockdev_reopen(self, options: dict[str, Any], log: bool = True) -> dict[str, Any]:
        """Reopen one node with new options: ``blockdev-reopen`` (6.1+, takes a list) or
        ``x-blockdev-reopen`` (older, takes the options directly). Returns the reply."""
        if self.has_command("blockdev-reopen"):
            cmd, args = "blockdev-reopen", {"options": [options]}
        elif self.has_command("x-blockdev-reopen"):
            cmd, args = "x-blockdev-reopen", dict(options)
        else:
            raise MachineStateError(self.name, "this QEMU has neither blockdev-reopen nor "
                                    "x-blockdev-reopen")
        return self.qmp_log(cmd, **args) if log else self.qmp_raw(cmd, **args)

    def hmp(self, command_line: str) -> str:
        """A human monitor command through QMP; returns its text output."""
        return str(self.qmp("human-monitor-command", **{"command-line": command_line}))

    def qemu_io(self, node: str, command: str, log: bool = False, device: bool = False,
                check: bool = True) -> str:
        """Run one qemu-io command on a node (or a device with ``device=True``) via HMP.

        QEMU prints qemu-io's output on its stdout, not in the HMP reply, so the output is
        what the VM log gained during the call. ``check`` raises when qemu-io reports a
        failed request (QEMU itself exits 0 either way).
        """
        target = f"-d {node}" if device else node
        quoted = command.replace("\\", "\\\\").replace('"', '\\"')
        before = self.log_path.stat().st_size if self.log_path.exists() else 0
        reply = self.hmp(f'qemu-io {target} "{quoted}"')
        with open(self.log_path, "rb") as f:
            f.seek(before)
            out = reply + f.read().decode(errors="replace")
        if log and self.transcript is not None:
            self.transcript.log(f"{self.log_prefix}qemu-io {node}: {command}")
            if out.strip():
                self.transcript.log(out)
        if check:
            # the HMP reply is empty on success: anything there is an error of the
            # monitor command itself (unknown node, permission conflict)
            failed = [ln for ln in reply.splitlines() if ln.strip()]
            failed += [ln for ln in out.splitlines() if "failed" in ln]
            if failed:
                why = f"; {self._limit_sentence()}" if self._limit_hit() else ""
                raise MachineError(self.name, f"qemu-io {node} {command!r}: {failed[0]}{why}",
                                   self.argv, None, tail(self.log_path))
        return out

    # -- events ---------------------------------------------------------------------------

    def events(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Take (and forget) the events received so far, optionally only some names."""
        self._require_running("events")
        self._drain_events()
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

    # -- block jobs -----------------------------------------------------------------------

    def run_job(
        self,
        job_id: str,
        *,
        complete: bool = False,
        cancel: bool = False,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        timeout: float = 120.0,
        log: bool = True,
        on_ready: Callable[[], None] | None = None,
    ) -> str | None:
        """Drive a started job to its end; return its error message or None.

        ``complete`` sends ``job-complete`` when the job is ready (mirror, active commit),
        after ``on_ready`` has run (e.g. guest writes while the job mirrors them);
        ``cancel`` sends ``job-cancel`` instead. Pass the job's own ``auto-finalize`` and
        ``auto-dismiss`` settings (QEMU's defaults are true): a job that waits for them is
        finalized or dismissed here. With ``log`` the
        BLOCK_JOB_* events and a summary of the status changes go to the transcript.
        """
        def ours(ev: dict[str, Any]) -> bool:
            data = ev.get("data", {})
            return bool(data.get("id", data.get("device")) == job_id)

        statuses: list[str] = []
        error: str | None = None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                ev = self.event_wait(JOB_EVENTS, timeout=max(left, 0.0), match=ours)
            except MachineTimeout as e:
                last = statuses[-1] if statuses else "no status change seen"
                hint = (" (a ready job waits for job-complete: pass complete=True)"
                        if last == "ready" else "")
                raise MachineTimeout(self.name, f"job {job_id} did not finish within "
                                     f"{timeout:g} s; last status: {last}{hint}",
                                     self.argv, None, e.log_tail) from None
            if ev["event"] != "JOB_STATUS_CHANGE":
                # BLOCK_JOB_* events come right after their status change: log, then act,
                # so the transcript shows READY before the job-complete it triggers
                if log and self.transcript is not None:
                    self.transcript.event(ev, self.log_prefix)
                # an auto-dismissed job is gone from query-jobs by the time it concludes
                if (ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                        and "error" in ev.get("data", {})):
                    error = str(ev["data"]["error"])
                if ev["event"] == "BLOCK_JOB_READY":
                    if on_ready is not None:
                        on_ready()
                    if cancel:
                        self._job_cmd("job-cancel", job_id, log)
                    elif complete:
                        self._job_cmd("job-complete", job_id, log)
                elif ev["event"] == "BLOCK_JOB_PENDING" and not auto_finalize:
                    self._job_cmd("job-finalize", job_id, log)
                continue
            status = ev["data"]["status"]
            statuses.append(status)
            if status == "concluded":
                for job in self.qmp("query-jobs"):
                    if job["id"] == job_id and "error" in job and error is None:
                        error = str(job["error"])
                if not auto_dismiss:
                    self._job_cmd("job-dismiss", job_id, log)
            elif status == "null":
                break
        if log and self.transcript is not None:
            summary = " -> ".join(_summarise(statuses))
            self.transcript.log(f"{self.log_prefix}job {job_id}: {summary}")
        return error

    def _job_cmd(self, cmd: str, job_id: str, log: bool) -> None:
        if log and self.transcript is not None:
            self.transcript.qmp_command(cmd, {"id": job_id}, self.log_prefix)
        self.qmp(cmd, id=job_id)


def _summarise(statuses: list[str]) -> list[str]:
    """Status changes without the pauses that drains cause at random.

    A drain moves a running job to ``paused`` and a ready one to ``standby`` and back; how
    many times depends on timing (it differs between QEMU 7.2 and 10.0), so those states
    are dropped and the repeats they leave are folded.
    """
    out: list[str] = []
    for s in statuses:
        if s in ("paused", "standby"):
            continue
        if out and out[-1] == s:
            continue
        out.append(s)
    return out
