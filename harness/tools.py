"""Runs of qemu-img and qemu-io, and qemu-nbd as a managed process.

Every run is appended to ``<scratch>/tools.log`` (argv, status, stdout, stderr) whether or
not it succeeds; a failing run raises :class:`ToolError` with argv, status and stderr.
``log=True`` also writes the (filtered) command and its output to the test's transcript,
with paths shown relative to the scratch directory so golden files stay readable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from harness import processes
from harness.errors import ToolError, format_argv
from harness.processes import REGISTRY
from harness.transcript import Transcript

TOOL_TIMEOUT = 120.0


@dataclass(frozen=True)
class Result:
    argv: list[str]
    status: int
    stdout: str
    stderr: str


def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(LANG="C", LC_ALL="C", TZ="UTC")
    return env


class ToolObserver(Protocol):
    """Who sees every tool run (the oracle follows qemu-img bitmap, qemu-io writes)."""

    def before_tool(self, tool: str, args: Sequence[str]) -> None: ...
    def tool_ran(self, tool: str, args: Sequence[str], result: Result) -> None: ...


class Tool:
    """One QEMU command-line program run in a scratch directory."""

    role = "tool"

    def __init__(self, path: str, scratch: Path, transcript: Transcript | None = None) -> None:
        self.path = path
        self.scratch = Path(scratch)
        self.transcript = transcript
        self.name = Path(path).name
        #: who sees every run (the oracle): ``before_tool`` may refuse one
        self.observer: ToolObserver | None = None

    def _debug(self, text: str) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        with open(self.scratch / "tools.log", "a", encoding="utf-8") as f:
            f.write(text.rstrip("\n") + "\n")

    def run(self, *args: str, check: bool = True, log: bool = False,
            timeout: float = TOOL_TIMEOUT) -> Result:
        """Run the program with ``args`` (cwd = scratch); raise ToolError on failure."""
        argv = [self.path, *args]
        if self.observer is not None:
            self.observer.before_tool(self.role, args)
        try:
            cp = processes.run(argv, timeout, label=self.name, cwd=self.scratch, env=tool_env())
        except OSError as e:
            raise ToolError(argv, None, "", f"cannot run it: {e.strerror}") from e
        if cp.timed_out:
            self._debug(f"$ {format_argv(argv)}\n  timed out after {timeout:g} s")
            raise ToolError(argv, None, cp.stdout, f"timed out after {timeout:g} s and was "
                            "killed (with its process group)")
        if "File too large" in cp.stderr + cp.stdout:  # EFBIG: a write past RLIMIT_FSIZE
            cp = dataclasses.replace(cp, stderr=f"{cp.stderr.rstrip()}\n(a write reached "
                                     f"{processes.limit_note()})\n")
        self._debug(f"$ {format_argv(argv)}\n  status {cp.status}\n"
                    f"  stdout:\n{cp.stdout}  stderr:\n{cp.stderr}")
        assert cp.status is not None
        res = Result(argv, cp.status, cp.stdout, cp.stderr)
        if self.observer is not None:
            self.observer.tool_ran(self.role, args, res)
        if log and self.transcript is not None:
            self.transcript.log(f"$ {self.name} {' '.join(args)}")
            out = (cp.stdout + cp.stderr).rstrip("\n")
            if out:
                self.transcript.log(out)
            if cp.status != 0:
                self.transcript.log(f"(exit status {cp.status})")
        if check and cp.status != 0:
            raise ToolError(argv, cp.status, cp.stdout, cp.stderr)
        return res


class QemuImg(Tool):
    """qemu-img with JSON helpers."""

    role = "qemu-img"

    def json(self, *args: str, check: bool = True) -> Any:
        res = self.run(*args, "--output=json", check=check)
        try:
            return json.loads(res.stdout)
        except json.JSONDecodeError as e:
            raise ToolError(res.argv, res.status, res.stdout,
                            f"output is not JSON: {e}\n{res.stderr}") from e

    def create(self, path: str | Path, size: str | int, fmt: str = "qcow2", *opts: str,
               backing: str | Path | None = None, backing_fmt: str = "qcow2") -> Path:
        args = ["create", "-q", "-f", fmt]
        if backing is not None:
            args += ["-b", str(backing), "-F", backing_fmt]
        for o in opts:
            args += ["-o", o]
        args += [str(path)]
        if size != "":
            args.append(str(size))
        self.run(*args)
        return self.scratch / path

    def info(self, path: str | Path, force_share: bool = False,
             backing_chain: bool = False) -> Any:
        args = ["info"]
        if force_share:
            args.append("-U")
        if backing_chain:
            args.append("--backing-chain")
        return self.json(*args, str(path))

    def bitmaps(self, path: str | Path, force_share: bool = False) -> list[dict[str, Any]]:
        """The qcow2 bitmaps as qemu-img info reports them (name, granularity, flags)."""
        info = self.info(path, force_share=force_share)
        data = info.get("format-specific", {}).get("data", {})
        return list(data.get("bitmaps", []))

    def check(self, path: str | Path, *opts: str) -> tuple[int, Any]:
        """(exit status, JSON report) of ``qemu-img check``; a non-zero status is data here."""
        res = self.run("check", *opts, "--output=json", str(path), check=False)
        if res.status not in (0, 1, 2, 3):
            raise ToolError(res.argv, res.status, res.stdout, res.stderr)
        try:
            report = json.loads(res.stdout) if res.stdout.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolError(res.argv, res.status, res.stdout, res.stderr) from e
        return res.status, report


class QemuIO(Tool):
    """qemu-io, one process per call, commands given with -c."""

    role = "qemu-io"

    def io(self, image: str | Path, *commands: str, fmt: str | None = "qcow2",
           image_opts: bool = False, force_share: bool = False, check: bool = True,
           log: bool = False) -> str:
        args: list[str] = []
        if image_opts:
            args.append("--image-opts")
        elif fmt:
            args += ["-f", fmt]
        if force_share:
            args.append("-U")
        for c in commands:
            args += ["-c", c]
        args.append(str(image))
        res = self.run(*args, check=check, log=log)
        if check and _io_failed(res.stdout + res.stderr):
            raise ToolError(res.argv, res.status, res.stdout, res.stderr)
        return res.stdout


def _io_failed(output: str) -> bool:
    """qemu-io exits 0 even when a command fails; its message says so."""
    return any(
        "failed:" in ln or ln.startswith("Pattern verification failed")
        for ln in output.splitlines()
    )


class QemuNBD:
    """A qemu-nbd server on a unix socket, as a context manager.

    Runs in the foreground as the harness's child (so it dies with the harness) and is
    ready when its pid file appears, which qemu-nbd writes after it listens.
    """

    def __init__(self, path: str, scratch: Path, socket: Path, image: str | Path,
                 args: tuple[str, ...] = ()) -> None:
        self.path = path
        self.scratch = Path(scratch)
        self.socket = socket
        self.image = str(image)
        self.pid_file = self.scratch / f"nbd-{socket.name}.pid"
        self.log_path = self.scratch / f"nbd-{socket.name}.log"
        self.argv = [path, "-k", str(socket), "--pid-file", str(self.pid_file), *args,
                     self.image]
        self._proc: subprocess.Popen[Any] | None = None

    def __enter__(self) -> QemuNBD:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        with open(self.log_path, "ab") as logf:
            self._proc = REGISTRY.spawn(self.argv, f"qemu-nbd {self.image}", stdout=logf,
                                        stderr=subprocess.STDOUT, env=tool_env())
        deadline = time.monotonic() + timeout
        while not self.pid_file.exists():
            if processes.exited(self._proc) or time.monotonic() > deadline:
                status = processes.wait_exit(self._proc, 0.0)
                self.stop()
                raise ToolError(self.argv, status, "", self.log_path.read_text(errors="replace")
                                or "qemu-nbd did not get ready")
            time.sleep(0.005)

    def stop(self) -> None:
        if self._proc is None:
            return
        if not processes.exited(self._proc):
            self._proc.send_signal(signal.SIGTERM)
        if processes.wait_exit(self._proc, 10.0) is None:
            processes.kill_group(self._proc.pid)
            processes.wait_exit(self._proc, 10.0)
        REGISTRY.forget(self._proc.pid)
        self._proc = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"
