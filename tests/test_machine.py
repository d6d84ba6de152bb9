"""harness.machine error paths against the real qemu-system-x86_64 (TCG, ``-machine none``).

Each failure a case can meet must come out as the right HarnessError, quickly, with the
command line and QEMU's own words, and must leave no process and no socket dir behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from harness import machine as machine_mod
from harness.errors import (
    CommandError,
    ConfigError,
    LaunchError,
    MachineError,
    MachineExitError,
    MachineStateError,
    MachineTimeout,
)
from harness.machine import Machine, short_socket_dir
from harness.processes import REGISTRY
from harness.signals import TimeoutClock
from harness.transcript import Transcript
from harness.vm import VM
from tests.conftest import fake_program, pid_gone, process_alive, wait_pid_gone

pytestmark = pytest.mark.usefixtures("no_leftovers")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short socket dir owned by the test, as Case hands one to its VMs."""
    d = short_socket_dir()
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@pytest.fixture
def vm(qemu_system: str, tmp_path: Path, sockdir: Path) -> Iterator[VM]:
    """A running VM without a machine (nothing to emulate), shut down after the test."""
    m = VM("vm0", qemu_system, scratch=tmp_path, machine_type="none", sockdir=sockdir,
           transcript=Transcript([]))
    m.launch()
    yield m
    m.shutdown(check=False, timeout=3)


def dead(pid: int) -> None:
    """Block until ``pid`` (our child) has exited, without reaping it."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def put_something_in_the_log(vm: VM) -> None:
    vm.qmp("blockdev-add", driver="null-co", **{"node-name": "null0"})
    vm.qemu_io("null0", "write 0 4k")


def test_bad_option_fails_fast_with_qemus_message(qemu_system: str, tmp_path: Path) -> None:
    m = Machine("bad", qemu_system, scratch=tmp_path, machine_type="none",
                args=["-bogus-option"])
    start = time.monotonic()
    with pytest.raises(LaunchError) as ei:
        m.launch()
    assert time.monotonic() - start < 1.0
    e = ei.value
    assert "-bogus-option: invalid option" in e.log_tail
    assert e.status == 1
    msg = str(e)
    assert msg.startswith("vm 'bad': exited while starting")
    assert f"command: {qemu_system} -nodefaults" in msg and "-bogus-option" in msg
    assert "status: exit status 1" in msg
    assert "-bogus-option: invalid option" in msg
    assert m.state == "stopped"
    # the socket dir it made for itself is gone with it
    assert not m.socket_path.parent.exists()


@pytest.mark.parametrize("own_sockdir", [False, True], ids=["case-sockdir", "own-sockdir"])
def test_sigkill_from_outside_then_qmp(qemu_system: str, tmp_path: Path, sockdir: Path,
                                       own_sockdir: bool) -> None:
    m = VM("vm0", qemu_system, scratch=tmp_path, machine_type="none",
           sockdir=None if own_sockdir else sockdir)
    m.launch()
    put_something_in_the_log(m)
    assert m.pid is not None
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    dead(pid)
    with pytest.raises(MachineExitError) as ei:
        m.qmp("query-status")
    msg = str(ei.value)
    assert "killed by SIGKILL" in msg
    assert ei.value.status == -signal.SIGKILL
    assert "wrote 4096/4096 bytes at offset 0" in msg  # the log tail
    assert f"command: {qemu_system}" in msg
    assert m.state == "stopped"
    assert m.shutdown() == -signal.SIGKILL  # safe, and no second error
    assert m.shutdown() == -signal.SIGKILL
    assert not process_alive(pid)


def test_sigkill_from_outside_then_check_alive(vm: VM) -> None:
    put_something_in_the_log(vm)
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGKILL)
    dead(vm.pid)
    with pytest.raises(MachineExitError, match="killed by SIGKILL") as ei:
        vm.check_alive()
    assert "wrote 4096/4096 bytes at offset 0" in ei.value.log_tail
    vm.check_alive()  # reported once; the VM is stopped now
    assert vm.shutdown() == -signal.SIGKILL


def test_sigkill_noticed_by_shutdown(vm: VM) -> None:
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGKILL)
    dead(vm.pid)
    with pytest.raises(MachineExitError, match="killed by SIGKILL"):
        vm.shutdown()
    assert vm.shutdown() == -signal.SIGKILL


def test_kill_on_purpose_is_not_an_error(vm: VM) -> None:
    pid = vm.pid
    assert pid is not None
    assert vm.kill() == -signal.SIGKILL
    assert vm.state == "stopped"
    vm.check_alive()
    assert vm.shutdown() == -signal.SIGKILL
    assert not process_alive(pid)
    # and it can start again (a crash-and-restart scenario)
    vm.launch()
    assert vm.qmp("query-status")["status"] == "running"
    assert vm.launches == 2


def test_hung_qemu_times_out_and_is_killed(qemu_system: str, tmp_path: Path,
                                           sockdir: Path) -> None:
    m = Machine("vm0", qemu_system, scratch=tmp_path, machine_type="none", sockdir=sockdir,
                qmp_timeout=0.5)
    m.launch()
    pid = m.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(MachineTimeout, match="no reply to query-status"):
        m.qmp("query-status")
    assert 0.4 < time.monotonic() - start < 3
    # no SIGCONT: shutdown must get rid of a stopped process on its own
    with pytest.raises(MachineTimeout, match="was killed") as ei:
        m.shutdown(timeout=1)
    assert ei.value.status == -signal.SIGKILL
    assert m.state == "stopped"
    assert pid not in {p for p, _ in REGISTRY.alive()}
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped


def test_shutdown_of_a_hung_qemu_keeps_to_its_timeout(qemu_system: str, tmp_path: Path,
                                                      sockdir: Path) -> None:
    m = Machine("vm0", qemu_system, scratch=tmp_path, machine_type="none", sockdir=sockdir)
    m.launch()
    assert m.pid is not None
    os.kill(m.pid, signal.SIGSTOP)
    start = time.monotonic()
    m.shutdown(timeout=1, check=False)
    assert time.monotonic() - start < 1.5


def test_shutdown_twice_and_qmp_when_stopped(vm: VM) -> None:
    assert vm.shutdown() == 0
    assert vm.shutdown() == 0
    assert vm.state == "stopped"
    with pytest.raises(MachineStateError, match=r"^vm 'vm0': is not running"):
        vm.qmp("query-status")
    with pytest.raises(MachineStateError, match="is not running"):
        vm.event_wait("STOP", timeout=1)


def test_quit_sent_by_the_case_is_not_an_unexpected_exit(vm: VM) -> None:
    assert vm.qmp("quit") == {}
    assert vm.pid is not None
    dead(vm.pid)
    vm.check_alive()
    assert vm.shutdown() == 0


def test_qmp_on_a_vm_never_launched(qemu_system: str, tmp_path: Path) -> None:
    m = Machine("fresh", qemu_system, scratch=tmp_path, machine_type="none")
    with pytest.raises(MachineStateError, match="vm 'fresh': is not running"):
        m.qmp("query-status")
    assert m.shutdown() is None  # nothing to stop


def test_context_manager_stops_qemu_when_the_body_fails(qemu_system: str,
                                                         tmp_path: Path) -> None:
    m = Machine("vm0", qemu_system, scratch=tmp_path, machine_type="none")
    with pytest.raises(RuntimeError, match="the body"), m:
        pid = m.pid
        raise RuntimeError("the body")
    assert m.state == "stopped"
    assert pid is not None and not process_alive(pid)


def test_qmp_error_keeps_what_was_sent_and_received(vm: VM) -> None:
    with pytest.raises(CommandError) as ei:
        vm.qmp("block-dirty-bitmap-add", node="nosuch", name="b0")
    e = ei.value
    assert e.error_class == "GenericError"
    assert e.sent == {"execute": "block-dirty-bitmap-add",
                      "arguments": {"node": "nosuch", "name": "b0"}}
    assert e.received["error"]["class"] == "GenericError"
    assert "nosuch" in e.received["error"]["desc"] and "nosuch" in e.desc
    assert "block-dirty-bitmap-add failed: GenericError" in str(e)
    # an error reply is an answer, not a broken VM
    assert vm.qmp("query-status")["status"] == "running"
    reply = vm.qmp_raw("block-dirty-bitmap-add", node="nosuch", name="b0")
    assert reply["error"]["class"] == "GenericError"


def test_qmp_error_message_ends_with_the_command_line(vm: VM) -> None:
    with pytest.raises(CommandError) as ei:
        vm.qmp("block-dirty-bitmap-add", node="nosuch", name="b0")
    assert ei.value.argv == vm.argv
    assert f"command: {vm.qemu}" in str(ei.value)


def test_event_wait_timeout_names_the_event(vm: VM) -> None:
    start = time.monotonic()
    with pytest.raises(MachineTimeout, match=r"no BLOCK_JOB_COMPLETED event within 1 s"):
        vm.event_wait("BLOCK_JOB_COMPLETED", timeout=1.0)
    assert 1.0 <= time.monotonic() - start < 3


def test_a_short_timeout_is_printed_as_given(vm: VM) -> None:
    with pytest.raises(MachineTimeout) as ei:
        vm.event_wait("BLOCK_JOB_COMPLETED", timeout=0.3)
    assert "within 0 s" not in str(ei.value)


def test_event_wait_gets_an_event_that_came_during_a_command(vm: VM) -> None:
    vm.qmp("stop")
    ev = vm.event_wait("STOP", timeout=5)
    assert ev["event"] == "STOP" and "timestamp" in ev
    assert vm.events(["STOP"]) == []  # taken once


def backup(vm: VM, job: str, target: str, **extra: object) -> None:
    vm.qmp_log("blockdev-backup", {"job-id": job, "device": "src", "target": target,
                                   "sync": "full", **extra})


@pytest.fixture
def backup_vm(vm: VM) -> VM:
    vm.qmp("blockdev-add", driver="null-co", node_name="src", size=1 << 20)
    vm.qmp("blockdev-add", driver="null-co", node_name="tgt", size=1 << 20)
    vm.qmp("blockdev-add", driver="blkdebug", node_name="eio",
           image={"driver": "null-co", "size": 1 << 20},
           inject_error=[{"event": "pwritev", "errno": 5}])
    return vm


def test_run_job_backup_logs_events_and_returns_none(backup_vm: VM) -> None:
    vm = backup_vm
    assert vm.transcript is not None
    backup(vm, "j0", "tgt", **{"auto-dismiss": False})
    assert vm.run_job("j0") is None
    backup(vm, "j1", "tgt")
    assert vm.run_job("j1") is None
    assert vm.qmp("query-jobs") == []
    lines = vm.transcript.text().splitlines()
    assert [ln for ln in lines if ln.startswith("job ")] == [
        "job j0: created -> running -> waiting -> pending -> concluded -> null",
        "job j1: created -> running -> waiting -> pending -> concluded -> null",
    ]
    completed = [ln for ln in lines if "BLOCK_JOB_COMPLETED" in ln]
    assert len(completed) == 2 and '"device": "j0"' in completed[0]
    assert all("timestamp" not in ln for ln in lines)
    assert '{"execute": "job-dismiss", "arguments": {"id": "j0"}}' in lines


def test_run_job_returns_the_error_of_a_failed_job(backup_vm: VM) -> None:
    backup(backup_vm, "j0", "eio", **{"auto-dismiss": False})
    assert backup_vm.run_job("j0") == "Input/output error"


def test_run_job_returns_the_error_of_an_auto_dismissed_job(backup_vm: VM) -> None:
    backup(backup_vm, "j0", "eio")
    assert backup_vm.run_job("j0") == "Input/output error"


def test_qemu_io_check(vm: VM, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    vm.qmp("blockdev-add", driver="raw", **{"node-name": "d0"},
           file={"driver": "file", "filename": str(image)})
    out = vm.qemu_io("d0", "write -P 0x5a 0 4k")
    assert out.startswith("wrote 4096/4096 bytes at offset 0\n")
    with pytest.raises(MachineError, match="write failed: Input/output error") as ei:
        vm.qemu_io("d0", "write 1M 4k")  # beyond the end of a 1 MiB image
    assert "qemu-io d0 'write 1M 4k'" in str(ei.value)
    out = vm.qemu_io("d0", "write 1M 4k", check=False)
    assert "write failed: Input/output error" in out
    with pytest.raises(MachineError, match="Pattern verification failed"):
        vm.qemu_io("d0", "read -P 0x11 0 4k")
    assert "read 4096/4096" in vm.qemu_io("d0", "read -P 0x5a 0 4k")
    assert image.read_bytes()[:4096] == b"\x5a" * 4096


def test_qemu_io_log_goes_to_the_transcript_filtered(vm: VM) -> None:
    vm.qmp("blockdev-add", driver="null-co", **{"node-name": "null0"})
    vm.qemu_io("null0", "write 0 64k", log=True)
    vm.qemu_io("null0", "write 0 4k")  # log=False: not in the story
    assert vm.transcript is not None
    assert vm.transcript.text() == (
        "qemu-io null0: write 0 64k\n"
        "wrote 65536/65536 bytes at offset 0\n"
        "64 KiB, 1 ops; XX.XX sec (XXX/sec and XXX ops/sec)\n"
    )


def test_blkdebug_error_through_qemu_io(vm: VM) -> None:
    vm.qmp("blockdev-add", **{"driver": "blkdebug", "node-name": "eio",
                              "image": {"driver": "null-co", "size": 1 << 20},
                              "inject-error": [{"event": "pwritev", "errno": 28,
                                                "once": True}]})
    with pytest.raises(MachineError, match="write failed: No space left on device"):
        vm.qemu_io("eio", "write 0 4k")
    assert "wrote 4096/4096" in vm.qemu_io("eio", "write 0 4k")  # the rule fired once


def test_socket_path_too_long(qemu_system: str, tmp_path: Path) -> None:
    deep = tmp_path / ("s" * 110)
    m = Machine("vm0", qemu_system, scratch=tmp_path, machine_type="none", sockdir=deep)
    with pytest.raises(ConfigError, match=r"vm 'vm0': QMP socket path .* is longer than 107 "
                       r"bytes; use a shorter socket directory"):
        m.launch()
    assert m.pid is None  # nothing was started


def test_socket_path_too_long_leaves_no_socket_dir(qemu_system: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Path] = []

    def recording_socket_dir() -> Path:
        made.append(short_socket_dir())
        return made[-1]

    monkeypatch.setattr(machine_mod, "short_socket_dir", recording_socket_dir)
    m = Machine("v" * 110, qemu_system, scratch=tmp_path, machine_type="none")
    try:
        with pytest.raises(ConfigError, match="longer than 107 bytes"):
            m.launch()
        assert made and not made[0].exists()
    finally:
        for d in made:
            if d.exists():
                d.rmdir()


def test_socket_dir_removed_after_shutdown(qemu_system: str, tmp_path: Path) -> None:
    m = Machine("vm0", qemu_system, scratch=tmp_path, machine_type="none")
    m.launch()
    sock = m.socket_path
    assert sock.exists() and len(str(sock)) < 60
    assert str(sock) in " ".join(m.argv)
    m.shutdown()
    assert not sock.parent.exists()
    # a relaunch gets a fresh one, removed again after
    m.launch()
    assert m.socket_path.exists()
    m.shutdown()
    assert not m.socket_path.parent.exists()


def test_a_case_socket_dir_is_left_to_its_owner(vm: VM, sockdir: Path) -> None:
    assert vm.socket_path.parent == sockdir
    vm.shutdown()
    assert sockdir.is_dir() and list(sockdir.iterdir()) == []


def test_missing_qemu_binary_is_a_launch_error(tmp_path: Path) -> None:
    m = Machine("vm0", str(tmp_path / "no-such-qemu"), scratch=tmp_path, machine_type="none")
    start = time.monotonic()
    with pytest.raises(LaunchError) as ei:
        m.launch()
    assert time.monotonic() - start < 1.0
    # the path is named, and why it did not run
    assert str(tmp_path / "no-such-qemu") in str(ei.value)
    assert "No such file or directory" in str(ei.value)
    assert m.state == "stopped"
    assert not m.socket_path.parent.exists()


def test_qemu_that_never_connects_is_a_launch_error(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_program(tmp_path / "bin" / "qemu-system-x86_64",
                        'echo "fake qemu is thinking"; exec sleep 60')
    monkeypatch.setattr(machine_mod, "LAUNCH_TIMEOUT", 0.5)
    m = Machine("vm0", str(fake), scratch=tmp_path, machine_type="none")
    start = time.monotonic()
    with pytest.raises(LaunchError, match="did not connect to QMP") as ei:
        m.launch()
    assert time.monotonic() - start < 8
    assert "fake qemu is thinking" in ei.value.log_tail
    assert m.state == "stopped"
    assert not m.socket_path.parent.exists()


def test_a_qemu_that_starts_a_child_takes_it_along(tmp_path: Path, sockdir: Path,
                                                  qemu_system: str) -> None:
    """Issue 9 item 2: a child QEMU started outlived the run; its process group is killed,
    whether QEMU quits, is killed on purpose or has to be killed at shutdown."""
    for how in ("quit", "kill", "registry"):
        pidfile = tmp_path / f"{how}.pid"
        fake = fake_program(tmp_path / how / "qemu-system-x86_64",
                            f'sleep 600 & echo $! > "{pidfile}"; exec {qemu_system} "$@"')
        m = Machine("vm0", str(fake), scratch=tmp_path, machine_type="none", sockdir=sockdir)
        m.launch()
        child = int(pidfile.read_text())
        assert not pid_gone(child)
        if how == "quit":
            assert m.shutdown() == 0
        elif how == "kill":
            m.kill()
        else:
            assert (m.pid, "vm0 (" + str(fake) + ")") in REGISTRY.kill_all()
            m.shutdown(check=False)
        assert wait_pid_gone(child), f"{how}: the child QEMU started is still running"


def test_a_qemu_that_writes_past_the_file_size_limit_fails_saying_so(
        tmp_path: Path, sockdir: Path, qemu_system: str) -> None:
    """Issue 9 item 9: the harness gives every program RLIMIT_FSIZE. QEMU blocks SIGXFSZ in
    its I/O threads, so a write past the limit fails with EFBIG and QEMU lives on: the
    pending SIGXFSZ is what tells, and the error must say so."""
    from harness import processes

    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"")
    os.truncate(disk, 8 << 20)
    processes.set_max_file_size(1 << 20)
    try:
        m = VM("vm0", qemu_system, scratch=tmp_path, machine_type="none",
               sockdir=sockdir, args=["-blockdev", json.dumps(
                   {"driver": "raw", "node-name": "d",
                    "file": {"driver": "file", "filename": str(disk)}})])
        m.launch()
    finally:
        processes.set_max_file_size(processes.DEFAULT_MAX_FILE_SIZE)
    m.qemu_io("d", "write -P 0x11 0 0x10000")  # below the limit: fine
    with pytest.raises(MachineError) as ei:
        m.qemu_io("d", "write -P 0x11 0x200000 0x10000")
    first = str(ei.value).splitlines()[0]
    assert first == ("vm 'vm0': qemu-io d 'write -P 0x11 0x200000 0x10000': write failed: "
                     "File too large; a write reached the file-size limit of 1 MiB "
                     "(--max-file-size), so QEMU got EFBIG (SIGXFSZ)")
    with pytest.raises(MachineError, match="reached the file-size limit of 1 MiB"):
        m.check_file_size()
    m.shutdown(check=False)  # (not checked there: reading /proc slows every shutdown)
    assert m.state == "stopped"


def test_a_program_killed_by_sigxfsz_says_why(tmp_path: Path) -> None:
    """A program writing from its main thread is killed by SIGXFSZ; qemu-io gets EFBIG
    (its I/O threads block the signal) and exits 0: both fail saying why."""
    from harness import processes
    from harness.errors import ToolError
    from harness.tools import QemuIO, Tool

    io = shutil.which("qemu-io")
    if io is None:
        pytest.skip("qemu-io is not on PATH")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"")
    os.truncate(disk, 8 << 20)
    processes.set_max_file_size(1 << 20)
    try:
        with pytest.raises(ToolError) as ei:
            Tool("/bin/dd", tmp_path).run("if=/dev/zero", "of=big", "bs=64k", "count=32")
        with pytest.raises(ToolError) as io_ei:
            QemuIO(io, tmp_path).io(disk, "write 0x200000 0x10000", fmt="raw")
    finally:
        processes.set_max_file_size(processes.DEFAULT_MAX_FILE_SIZE)
    assert str(ei.value).splitlines()[0] == (
        "dd failed (killed by SIGXFSZ: it wrote past the file-size limit of 1 MiB "
        "(--max-file-size)): (no output)")
    assert "(a write reached the file-size limit of 1 MiB (--max-file-size))" in str(io_ei.value)
    assert (tmp_path / "big").stat().st_size == 1 << 20


class TimedOut(BaseException):
    """What the --timeout clock raises here (pytest's Failed is a BaseException too)."""


def timed_out(message: str) -> NoReturn:
    raise TimedOut(message)


@pytest.fixture
def clock() -> Iterator[TimeoutClock]:
    """The plugin's --timeout clock, on the real SIGALRM."""
    c = TimeoutClock(timed_out)
    yield c
    c.stop()


def test_a_timeout_inside_a_qmp_call_leaves_the_channel_unusable(
        qemu_system: str, tmp_path: Path, sockdir: Path, clock: TimeoutClock) -> None:
    """Issue 9 item 8: a --timeout inside a QMP call (QEMU stopped: no reply ever comes)
    is the error reported; later calls say the channel is unusable and why; shutdown kills
    at once (no 'quit' that would wait out its timeout). It broke into the asyncio loop
    before: a task or a clean-up hit, the channel left in use."""
    m = Machine("vm0", qemu_system, scratch=tmp_path, machine_type="none", sockdir=sockdir,
                qmp_timeout=600)
    m.launch()
    assert m.pid is not None
    os.kill(m.pid, signal.SIGSTOP)
    clock.start(0.2)
    with pytest.raises(TimedOut, match=r"Timeout \(>0.2s\)"), clock.running():
        m.qmp("query-status")
    assert not m.channel_usable
    with pytest.raises(MachineStateError, match=r"^vm 'vm0': has no usable QMP channel: "
                       r"query-status was interrupted before its reply \(query-version\)"):
        m.qmp("query-version")
    m.undo("block-dirty-bitmap-remove", node="n", name="b")  # a finally's undo: skipped
    with pytest.raises(MachineTimeout, match="was killed at shutdown without 'quit': "
                       "query-status was interrupted") as ei:
        m.shutdown(timeout=600)
    assert ei.value.status == -signal.SIGKILL
    sent = [ln for ln in m.qmp_log_path.read_text().splitlines() if " -> " in ln]
    assert not any('"quit"' in ln or "block-dirty-bitmap-remove" in ln for ln in sent), sent
    assert m.state == "stopped" and not sockdir.joinpath("vm0.qmp").exists()


def test_a_timeout_while_waiting_for_an_event_keeps_the_channel(
        vm: VM, clock: TimeoutClock) -> None:
    """Waiting for an event sends nothing: cut short, the channel is still good."""
    clock.start(0.2)
    with pytest.raises(TimedOut), clock.running():
        vm.event_wait("NEVER_HAPPENS", timeout=600)
    assert vm.channel_usable
    assert vm.qmp("query-status")["status"] == "running"
    assert vm.shutdown() == 0


def test_a_timeout_while_qemu_starts_leaves_no_process(
        tmp_path: Path, clock: TimeoutClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The alarm lands just after the fork, before the registry knows the program: it is
    raised once the program is registered, and the program is stopped (it ran on,
    unregistered and unowned, before). The program is one that would never end alone."""
    qemu = fake_program(tmp_path / "bin" / "qemu-system-x86_64", "exec sleep 600")
    started: list[int] = []
    real_popen = subprocess.Popen

    def popen_then_alarm(*args: Any, **kw: Any) -> subprocess.Popen[Any]:
        proc = real_popen(*args, **kw)
        started.append(proc.pid)
        os.kill(os.getpid(), signal.SIGALRM)  # the --timeout, right now
        time.sleep(0.05)  # Python runs the handler at its next check
        return proc

    m = Machine("vm0", str(qemu), scratch=tmp_path, machine_type="none")
    clock.start(600)
    monkeypatch.setattr(subprocess, "Popen", popen_then_alarm)
    with pytest.raises(TimedOut), clock.running():
        m.launch()
    monkeypatch.undo()
    assert len(started) == 1
    assert wait_pid_gone(started[0])
    assert started[0] not in {pid for pid, _ in REGISTRY.alive()}
    assert m.state == "stopped"
