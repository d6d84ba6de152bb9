"""A real Linux guest in a VM of the case, writing through its virtio-blk disk.

The guest is a distro kernel and a busybox initramfs (:mod:`harness.guest_image` builds
them). Its serial console is a unix socket the harness listens on; QEMU connects to it
(``-chardev socket,id=con,path=S -serial chardev:con``) while it starts, and the harness
drives the accepted connection with ``pexpect.fdpexpect``. Every console byte goes to
``<scratch>/<vm>.console.log`` (with the commands the harness sent marked ``[qiotests
sends]``); a failure's artifacts include it. The transcript gets only what a case
chooses to show: the guest's writes and reads, never boot messages or timings.

A :class:`Guest` is attached to a :class:`~harness.machine.Machine`: each launch boots the
kernel to the ready marker (a guest that never prints it fails with the console's tail);
a clean shutdown powers the guest off first (``poweroff -f``; QEMU runs with
``-no-shutdown``, so the oracle still checks the bitmaps over QMP afterwards). Commands
run in the guest's shell one at a time and their exit status is read back.

Writes (``dd oflag=direct``, so they go to the device, not the guest's page cache) are
told to the machine's observer, the oracle, which models them exactly as a qemu-io write
through the same device: they land in the device's active layer. A write can also be
started and awaited later (:meth:`Guest.start_write`), to race a job; the oracle then
decides where it can have landed from what happened meanwhile, or refuses to guess.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import pexpect
from pexpect import fdpexpect

from harness import tmpdirs
from harness.bitmaps import HashLabels
from harness.errors import GuestError, HarnessError, MachineStateError
from harness.guest_image import READY_MARKER, GuestFiles
from harness.machine import tail

if TYPE_CHECKING:
    from harness.machine import Machine

#: seconds a guest may take from QEMU's start to its ready marker (TCG on a loaded
#: 2-core machine boots in 3-10 s; the bound is for a guest that will never make it)
BOOT_TIMEOUT = 180.0
#: seconds one guest command may take
COMMAND_TIMEOUT = 120.0
#: O_DIRECT needs requests aligned to the logical block size
SECTOR = 512
#: ``quiet``: the console carries commands, not boot chatter; the rest saves about a fifth
#: of a TCG boot (no crypto self-tests, no speculation mitigations patched in, no TSC
#: recalibration): a throwaway test guest needs none of them
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests tsc=reliable"
PANIC = re.compile(rb"Kernel panic - not syncing[^\n]*\n")


def guest_args(files: GuestFiles, console: Path, memory: str = "256M") -> list[str]:
    """The QEMU options that boot the guest with its console on ``console`` (a socket the
    harness listens on). ``-no-shutdown``: a guest that powers off leaves QEMU (and QMP)
    up until the harness quits it."""
    return ["-m", memory, "-kernel", str(files.kernel), "-initrd", str(files.initrd),
            "-append", KERNEL_CMDLINE, "-no-shutdown",
            "-chardev", f"socket,id=con,path={console}", "-serial", "chardev:con"]


@dataclass
class PendingWrite:
    """A guest write that was started and is not yet known to have completed."""

    guest: Guest
    device: str
    offset: int
    length: int
    pattern: int
    token: object
    seq: int

    def wait(self) -> None:
        """Wait for the write to complete; the oracle learns where it landed."""
        self.guest._show(f"write {self.offset:#x}+{self.length:#x} to {self.device}: "
                         "completed")
        self._finish()

    def _finish(self) -> None:
        self.guest._finish_write(self)


class Guest:
    """The guest of one Machine: console, boot, commands, and the I/O words cases use."""

    def __init__(self, files: GuestFiles, log_prefix: str = "",
                 boot_timeout: float = BOOT_TIMEOUT,
                 labels: Callable[[str], str] | None = None) -> None:
        self.files = files
        self.labels = labels or HashLabels("D")
        self.boot_timeout = boot_timeout
        self.log_prefix = log_prefix
        self.vm: Machine | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._child: fdpexpect.fdspawn | None = None
        self._log: IO[bytes] | None = None
        self._seq = 0
        self._busy: str | None = None  # the command whose status has not been read yet
        self._disks: dict[str, str] = {}
        self.up = False
        self.boots = 0
        #: what to add to "did not reach its ready marker" (the probe asks QEMU's status)
        self.on_timeout: Callable[[Machine], str] | None = None

    # -- the Machine attachment -----------------------------------------------------------

    @property
    def console_path(self) -> Path:
        assert self.vm is not None
        return self.vm.socket_path.with_suffix(".con")

    @property
    def log_path(self) -> Path:
        assert self.vm is not None
        return self.vm.scratch / f"{self.vm.name}.console.log"

    def argv(self, vm: Machine) -> list[str]:
        self.vm = vm
        return guest_args(self.files, self.console_path)

    def before_spawn(self, vm: Machine) -> None:
        """Listen on the console socket: QEMU connects to it while it starts."""
        self.vm = vm
        with contextlib.suppress(FileNotFoundError):
            self.console_path.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.console_path))
        self._listener.listen(1)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in after_exit)
        self._note(f"launch of {vm.name}: {self.files.origin}")

    def after_launch(self, vm: Machine) -> None:
        """Take QEMU's console connection and boot to the ready marker."""
        assert self._listener is not None
        self._listener.settimeout(10.0)
        try:
            self._conn, _ = self._listener.accept()
        except TimeoutError as e:
            raise GuestError(vm.name, "QEMU did not connect to the guest console within "
                             "10 s", vm.argv, None, tail(vm.log_path)) from e
        finally:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.console_path.unlink()
        self._child = fdpexpect.fdspawn(self._conn.fileno(), timeout=COMMAND_TIMEOUT,
                                        maxread=65536)
        self._child.logfile_read = self._log
        self._disks = {}
        self._busy = None
        if "-incoming" in vm.argv:
            # the destination of a migration boots nothing: the source's guest arrives,
            # already running (continues_from() takes it over when the migration is done)
            self._note("waiting for an incoming migration: no boot")
            return
        self._wait_ready("boot")

    def continues_from(self, source: Guest) -> None:
        """After a migration to this guest's VM: the source's guest runs here now, its shell
        waiting for commands on this console (no pending command: wait for it first)."""
        if source._busy is not None:
            raise MachineStateError(source.vm.name if source.vm else "?", "guest command "
                                    f"{source._busy!r} still runs: wait for it before the "
                                    "guest moves on")
        self._seq = source._seq
        self._disks = dict(source._disks)
        source.up = False
        self.up = True
        self._note(f"the guest of {source.vm.name if source.vm else '?'} continues here")

    def before_quit(self, vm: Machine) -> None:
        """A clean end: the guest powers itself off (``poweroff -f``) before QEMU quits, if
        it runs (not on a migration's source once the guest has moved on, nor paused)."""
        if not (self.up and self._child is not None):
            return
        status = vm.execute("query-status").get("return", {}).get("status")
        if status == "running":
            self.poweroff()

    def after_exit(self, vm: Machine) -> None:
        """QEMU is gone: keep the console's last bytes, close everything."""
        self.up = False
        if self._child is not None:
            with contextlib.suppress(Exception):
                while self._child.read_nonblocking(65536, timeout=0.2):
                    pass
        for closing in (self._conn, self._listener):
            if closing is not None:
                with contextlib.suppress(OSError):
                    closing.close()
        self._child = None
        self._conn = None
        self._listener = None
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- console ------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        if self._log is not None:
            self._log.write(f"\n[qiotests {time.strftime('%H:%M:%S')}] {text}\n".encode())
            self._log.flush()

    def console_tail(self, lines: int = 15) -> str:
        """The console's last lines (what a failure shows)."""
        if self._log is not None:
            self._log.flush()
        return tail(self.log_path, lines) if self.vm is not None else ""

    def _fail(self, message: str) -> GuestError:
        vm = self.vm
        assert vm is not None
        return GuestError(vm.name, f"{message}\n  console ({self.log_path}), last lines:\n"
                          + "\n".join("    " + ln for ln in self.console_tail().splitlines()),
                          vm.argv, None, tail(vm.log_path))

    def _expect(self, pattern: bytes, timeout: float, what: str) -> re.Match[bytes]:
        """Wait for ``pattern`` on the console, watching QEMU: a death, a kernel panic or
        the end of ``timeout`` fails at once with the console's tail."""
        vm = self.vm
        assert vm is not None and self._child is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                extra = ""
                if self.on_timeout is not None:
                    with contextlib.suppress(HarnessError):
                        extra = f" ({self.on_timeout(vm)})"
                raise self._fail(f"the guest did not {what} within {timeout:g} s{extra}")
            try:
                self._child.expect([pattern, PANIC], timeout=min(left, 1.0))
            except pexpect.TIMEOUT:
                vm.check_alive()
                continue
            except pexpect.EOF:
                self.up = False
                vm.check_alive()
                raise self._fail(f"the guest console closed while waiting to {what}") from None
            match = self._child.match
            assert isinstance(match, re.Match)
            if match.re is PANIC:
                self.up = False
                said = match.group(0).decode(errors="replace").strip()
                with contextlib.suppress(pexpect.TIMEOUT, pexpect.EOF):
                    self._child.expect(pexpect.TIMEOUT, timeout=1.0)  # the rest, for the tail
                raise self._fail(f"the guest kernel panicked while waiting to {what}: {said}")
            return match

    def _wait_ready(self, what: str) -> None:
        self.up = False
        self._expect(re.escape(READY_MARKER.encode()) + rb"\r?\n", self.boot_timeout,
                     f"reach its ready marker {READY_MARKER!r} ({what})")
        self.up = True
        self.boots += 1

    def _send(self, command: str) -> int:
        if self.vm is None or self._child is None or not self.up:
            name = self.vm.name if self.vm is not None else "?"
            raise MachineStateError(name, f"has no running guest ({command.split()[0]})")
        if self._busy is not None:
            raise MachineStateError(self.vm.name, f"guest command {self._busy!r} is still "
                                    "running: wait for it first")
        self._seq += 1
        self._busy = command
        self._note(f"sends #{self._seq}: {command}")
        self._child.send(f"{command} ; echo \"@@QIO:{self._seq}:$?@@\"\n".encode())
        return self._seq

    def _status(self, seq: int, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
        assert self._child is not None
        command = self._busy or "?"
        m = self._expect(rb"@@QIO:" + str(seq).encode() + rb":(\d+)@@\r?\n", timeout,
                         f"finish #{seq} ({command})")
        self._busy = None
        before = self._child.before
        out = before.decode(errors="replace") if isinstance(before, bytes) else ""
        return int(m.group(1)), out

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> str:
        """Run a shell command in the guest; its output (stdout and stderr). A non-zero
        exit status raises GuestError unless ``check`` is False."""
        seq = self._send(f"set -o pipefail; {{ {command} ; }} 2>&1")
        status, out = self._status(seq, timeout)
        if check and status != 0:
            raise self._fail(f"guest command {command!r} exited with status {status}: "
                             f"{out.strip()[-300:]}")
        return out

    # -- disks ----------------------------------------------------------------------------

    def disk(self, device: str) -> str:
        """The guest's block device for the qdev id ``device``: the virtio disk whose
        serial is that id, else the only virtio disk there is."""
        if device not in self._disks:
            out = self.run("for d in /sys/block/vd*; do echo \"$d $(cat $d/serial)\"; done")
            found = [ln.split() for ln in out.splitlines() if ln.startswith("/sys/block/vd")]
            names = {f[1] if len(f) > 1 else "": "/dev/" + f[0].rsplit("/", 1)[1]
                     for f in found}
            if device in names:
                self._disks[device] = names[device]
            elif len(found) == 1:
                self._disks[device] = "/dev/" + found[0][0].rsplit("/", 1)[1]
            else:
                raise self._fail(f"the guest has no virtio disk for device {device!r} "
                                 f"(it has {sorted(names.values()) or 'none'}); give each "
                                 "disk serial=<its id>")
        return self._disks[device]

    @staticmethod
    def _aligned(offset: int, length: int) -> None:
        if offset % SECTOR or length % SECTOR or length <= 0:
            raise ValueError(f"guest I/O {offset:#x}+{length:#x}: O_DIRECT needs offsets and "
                             f"lengths that are positive multiples of {SECTOR}")

    def _show(self, text: str) -> None:
        transcript = getattr(self.vm, "transcript", None)
        if transcript is not None:
            transcript.log(f"{self.log_prefix}guest: {text}")

    # -- the words cases use ----------------------------------------------------------------

    def write(self, offset: int, length: int, pattern: int, device: str = "disk0") -> None:
        """Write ``length`` bytes of ``pattern`` at ``offset`` of the disk, O_DIRECT."""
        self._show(f"write {offset:#x}+{length:#x} pattern {pattern:#x} to {device}")
        self._start_write(offset, length, pattern, device)._finish()

    def start_write(self, offset: int, length: int, pattern: int,
                    device: str = "disk0") -> PendingWrite:
        """Start a write and return at once (it races what the case does next);
        :meth:`PendingWrite.wait` waits for it."""
        self._show(f"write {offset:#x}+{length:#x} pattern {pattern:#x} to {device}: started")
        return self._start_write(offset, length, pattern, device)

    def _start_write(self, offset: int, length: int, pattern: int,
                     device: str) -> PendingWrite:
        self._aligned(offset, length)
        if not 0 <= pattern <= 0xFF:
            raise ValueError(f"guest write pattern {pattern:#x} is not one byte")
        dev = self.disk(device)
        bs = math.gcd(length, 1 << 20)
        assert self.vm is not None
        token = None
        if self.vm.observer is not None:
            token = self.vm.observer.device_write_started(self.vm, device, offset, length)
        seq = self._send(
            f"set -o pipefail; {{ head -c {length} /dev/zero | tr '\\000' '\\{pattern:03o}' "
            f"> /tmp/pattern && dd if=/tmp/pattern of={dev} bs={bs} oflag=direct,seek_bytes "
            f"seek={offset} conv=notrunc ; }} 2>&1")
        return PendingWrite(self, device, offset, length, pattern, token, seq)

    def _finish_write(self, w: PendingWrite) -> None:
        assert self.vm is not None
        status, out = self._status(w.seq)
        ok = status == 0
        if self.vm.observer is not None:
            self.vm.observer.device_write_done(self.vm, w.token, ok)
        if not ok:
            raise self._fail(f"guest write {w.offset:#x}+{w.length:#x} to {w.device} failed "
                             f"(status {status}): {out.strip()[-300:]}")

    def checksum(self, offset: int, length: int, device: str = "disk0",
                 show: bool = True) -> str:
        """sha256 of the disk's bytes ``offset..offset+length``, read O_DIRECT. With
        ``show`` the transcript gets it as a label (``D1``: the same bytes get the same
        label anywhere in the case)."""
        self._aligned(offset, length)
        dev = self.disk(device)
        bs = math.gcd(length, math.gcd(offset, 1 << 20) or 1 << 20)
        out = self.run(f"dd if={dev} bs={bs} skip={offset // bs} count={length // bs} "
                       "iflag=direct 2>/dev/null | sha256sum")
        m = re.search(r"\b([0-9a-f]{64})\b", out)
        if m is None:
            raise self._fail(f"sha256sum printed no hash: {out.strip()[-200:]}")
        if show:
            self._show(f"sha256 of {device} {offset:#x}+{length:#x}: {self.labels(m.group(1))}")
        return m.group(1)

    def sync(self, device: str = "disk0") -> None:
        """Flush the disk: fsync on the block device sends the device a FLUSH."""
        self._show(f"sync {device}")
        self.run(f"sync {self.disk(device)}")

    def reboot(self) -> None:
        """``reboot -f`` and back to the ready marker (QEMU keeps running)."""
        self._show("reboot")
        self._send("reboot -f")
        self._busy = None
        self._wait_ready("reboot")

    def poweroff(self) -> None:
        """``poweroff -f``; QEMU stops (``-no-shutdown``) and says SHUTDOWN."""
        vm = self.vm
        assert vm is not None
        self._send("poweroff -f")
        self._busy = None
        self.up = False
        vm.event_wait("SHUTDOWN", timeout=COMMAND_TIMEOUT)



# -- which accelerator runs the guest ---------------------------------------------------------

#: seconds the KVM guest probe may take to reach the ready marker (a guest that works under
#: KVM is there in a second or two; TCG is what is left when it is not)
KVM_PROBE_TIMEOUT = 30.0


def probe_boot(qemu: str, accel: str, files: GuestFiles, workdir: Path,
               timeout: float) -> tuple[float | None, str]:
    """Boot the guest once under ``accel``: seconds to its ready marker, or None and why
    not (with the console's last line)."""
    from harness.machine import Machine

    guest = Guest(files, boot_timeout=timeout)
    guest.on_timeout = lambda vm: f"VM status {vm.qmp('query-status').get('status')!r}"
    vm = Machine(f"{accel}-guest-probe", qemu, accel=accel, scratch=workdir,
                 qmp_timeout=timeout, attachments=[guest])
    start = time.monotonic()
    try:
        vm.launch()
        took = time.monotonic() - start
        vm.shutdown()
        return took, ""
    except GuestError as e:
        last = [ln for ln in guest.console_tail(5).splitlines()
                if ln.strip() and not ln.startswith("[qiotests ")]
        said = (f"; the console's last line: {last[-1].strip()!r}" if last
                else "; the guest printed nothing")
        return None, f"{e.reason.splitlines()[0]}{said}"
    except HarnessError as e:
        lines = [ln for ln in str(getattr(e, "log_tail", "")).splitlines() if ln.strip()]
        why = f": {lines[-1].strip()}" if lines else ""
        return None, f"QEMU with -accel {accel} failed ({getattr(e, 'reason', e)}){why}"
    finally:
        vm.shutdown(check=False, timeout=3.0)


@dataclass(frozen=True)
class GuestAccel:
    accel: str
    note: str


def choose_accel(accel: str, requested: str, qemu: str, files: GuestFiles,
                 shared: Path | None, say: Callable[[str], None]) -> GuestAccel:
    """The accelerator guests run under. The session's (``accel``, from the cheap probe)
    unless it is KVM chosen by ``--accel auto``: then a bounded boot of the real guest under
    KVM decides, once per session (``shared``, a directory the xdist workers share, holds
    the result; the one process that probes says why it falls back)."""
    if accel != "kvm" or requested != "auto":
        return GuestAccel(accel, f"{accel} (the session's)")
    key = str(shared) if shared is not None else ""
    if key in _DECIDED:
        return _DECIDED[key]
    if shared is None:
        result = _probe_kvm_guest(qemu, files, say)
    else:
        shared.mkdir(parents=True, exist_ok=True)
        with open(shared / "guest-accel.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = shared / "guest-accel.json"
            if done.exists():
                d = json.loads(done.read_text())
                result = GuestAccel(d["accel"], d["note"])
            else:
                result = _probe_kvm_guest(qemu, files, say)
                done.write_text(json.dumps({"accel": result.accel, "note": result.note}))
    _DECIDED[key] = result
    return result


_DECIDED: dict[str, GuestAccel] = {}


def _probe_kvm_guest(qemu: str, files: GuestFiles, say: Callable[[str], None]) -> GuestAccel:
    with tmpdirs.temporary("guest-probe") as tmp:
        took, why = probe_boot(qemu, "kvm", files, Path(tmp), KVM_PROBE_TIMEOUT)
    if took is not None:
        return GuestAccel("kvm", f"kvm (the guest booted under KVM in {took:.1f} s)")
    note = f"tcg (auto: KVM passed the cheap probe but cannot run the guest: {why})"
    say(f"guest accel: {note}")
    return GuestAccel("tcg", note)
