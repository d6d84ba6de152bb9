"""Harness overhead: one QEMU start/stop through ``harness.machine.Machine`` vs a bare one.

What is measured
    The wall time (``time.perf_counter``) of one whole QEMU life cycle, done two ways:

    * **bare**: bind+listen on a unix socket with the ``socket`` module, spawn QEMU with
      ``subprocess.Popen``, ``accept()``, read the greeting, send ``qmp_capabilities`` and
      read its reply, send ``quit``, read until the reply and EOF, ``wait()`` for the exit;
    * **harness**: construct a ``Machine`` and use it as a context manager with an empty
      body: ``launch()`` (asyncio loop, ``QMPClient.start_server``, spawn through
      ``harness.processes.REGISTRY``, accept + capabilities negotiation, racing QEMU's exit)
      then ``shutdown()`` (``quit``, wait for the exit, disconnect, close logs and loop).

    Each side is also split at the point where QMP is ready (after the capabilities
    reply; the start of the ``with`` body for the harness) into "up" and "down" times.

Why the comparison is fair
    * Both run the identical QEMU command line: the bare side takes it from a ``Machine``'s
      ``argv`` property, and both sides use the same socket path (a shared short socket
      directory, as ``harness.session.Case`` passes one), which is checked byte for byte.
    * Same binary (found by ``harness.binaries.find_binaries``, so ``--qemu``,
      ``--qemu-build``, ``QEMU_PROG`` and ``PATH`` work as in the suite), same accelerator
      (``--accel``, default tcg: this benchmark does not probe KVM, and TCG is what CI
      without nested virtualisation uses), same machine type (``--machine``, default
      ``pc`` as the harness; ``none`` measures the fixed cost without a board), same
      environment (LANG/LC_ALL/TZ as the harness sets them) and stdout/stderr going to a log
      file in both cases.
    * Same QMP conversation: QEMU connects to a socket we listen on, capabilities are
      negotiated, ``quit`` is sent and its reply read before waiting for the exit. (The
      only protocol difference: qemu.qmp asks for the ``oob`` capability when the greeting
      offers it; that is the harness's choice and counts as harness cost.) The bare side
      waits for the exit with a blocking ``waitpid`` (a watchdog timer kills a hung QEMU).
    * The sides alternate within each pair (bare first on even pairs, harness first on odd),
      so drift in machine load, page cache or CPU frequency hits both equally, and the
      first ``--warmup`` pairs are discarded. The headline is the median of the per-pair
      ratios (each pair saw the same load), so a stray slow run does not decide it.

    What the harness does on top (event loop, QMP log file, PR_SET_PDEATHSIG via
    ``preexec_fn``, new session, process registry, the way it waits for the exit) is exactly
    the overhead this benchmark is meant to expose.

Exit status: 0 when harness/bare (the median of the per-pair ratios) is at most ``--target``
(1.10),
1 when it is above, 2 when the benchmark could not run (no QEMU, QEMU failed to start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from harness import tmpdirs
from harness.binaries import find_binaries, list_accelerators
from harness.errors import HarnessError
from harness.machine import Machine, tail
from harness.processes import REGISTRY

DEFAULT_PAIRS = 30
MIN_PAIRS = 20
DEFAULT_WARMUP = 2
DEFAULT_TARGET = 1.10
BARE_TIMEOUT = 30.0
VM_NAME = "bench"


class BenchError(Exception):
    """The benchmark could not measure (QEMU did not start, protocol error, ...)."""


@dataclass
class Timing:
    """One life cycle: total wall time and the part until QMP was ready."""

    total: float
    up: float

    @property
    def down(self) -> float:
        return self.total - self.up


@dataclass
class Series:
    name: str
    runs: list[Timing] = field(default_factory=list)

    def totals(self) -> list[float]:
        return [t.total for t in self.runs]


def qemu_env() -> dict[str, str]:
    """The environment the harness gives QEMU (Machine.launch with env=None)."""
    env = dict(os.environ)
    env.update(LANG="C", LC_ALL="C", TZ="UTC")
    return env


# -- bare side ----------------------------------------------------------------------------


class BareQemu:
    """The minimum any driver must do: listen, spawn, accept, negotiate, quit, wait."""

    def __init__(self, argv: Sequence[str], sock_path: Path, log_path: Path) -> None:
        self.argv = list(argv)
        self.sock_path = sock_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self) -> Timing:
        start = time.perf_counter()
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn: socket.socket | None = None
        try:
            srv.bind(str(self.sock_path))
            srv.listen(1)
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=logf,
                    stderr=subprocess.STDOUT, env=qemu_env(),
                )
            conn = self._accept(srv)
            reader = conn.makefile("rb")
            self._expect(reader, "QMP", "greeting")
            conn.sendall(b'{"execute": "qmp_capabilities"}\n')
            self._expect(reader, "return", "qmp_capabilities reply")
            up = time.perf_counter() - start
            conn.sendall(b'{"execute": "quit"}\n')
            self._expect(reader, "return", "quit reply")
            with contextlib.suppress(ConnectionResetError):
                while reader.readline():  # the SHUTDOWN event, then EOF (or a reset)
                    pass
            reader.close()
            status = self._wait()
            if status != 0:
                raise BenchError(f"bare QEMU exited with status {status} after quit")
            self.proc = None
            total = time.perf_counter() - start
        finally:
            if conn is not None:
                conn.close()
            srv.close()
            with contextlib.suppress(FileNotFoundError):
                self.sock_path.unlink()
            self.kill()
        return Timing(total, up)

    def _accept(self, srv: socket.socket) -> socket.socket:
        # a short accept timeout only matters when QEMU has not connected yet: it lets a
        # QEMU that died on a bad option fail at once instead of after BARE_TIMEOUT
        assert self.proc is not None
        srv.settimeout(0.05)
        deadline = time.monotonic() + BARE_TIMEOUT
        while True:
            try:
                conn, _ = srv.accept()
                conn.settimeout(BARE_TIMEOUT)
                return conn
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise BenchError(f"bare QEMU exited with status {self.proc.returncode} "
                                     f"before connecting:\n{tail(self.log_path)}") from None
                if time.monotonic() > deadline:
                    raise BenchError("bare QEMU did not connect to QMP within "
                                     f"{BARE_TIMEOUT:.0f} s") from None

    def _wait(self) -> int:
        # a blocking waitpid() returns the moment QEMU exits (Popen.wait with a timeout
        # polls with growing sleeps); a watchdog timer kills a QEMU that hangs
        assert self.proc is not None
        watchdog = threading.Timer(BARE_TIMEOUT, self.proc.kill)
        watchdog.start()
        try:
            return self.proc.wait()
        finally:
            watchdog.cancel()

    @staticmethod
    def _expect(reader: Any, key: str, what: str) -> None:
        """Read messages up to the one with ``key``; events (``quit``'s SHUTDOWN can come
        before its reply) are skipped."""
        while True:
            msg = json.loads(reader.readline() or b"{}")
            if key in msg:
                return
            if "event" not in msg:
                raise BenchError(f"bare QMP: expected the {what}, got {msg!r:.200}")

    def kill(self) -> None:
        """Leave no bare QEMU behind (called in finally)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self.proc = None


# -- harness side -------------------------------------------------------------------------


def harness_run(make_machine: Callable[[], Machine]) -> Timing:
    start = time.perf_counter()
    vm = make_machine()
    try:
        with vm:
            up = time.perf_counter() - start
        total = time.perf_counter() - start
        if vm.exit_status != 0:
            raise BenchError(f"harness QEMU exited with status {vm.exit_status}")
    finally:
        if vm.state == "running":
            vm.shutdown(check=False, timeout=3.0)
    return Timing(total, up)


# -- statistics and report ------------------------------------------------------------------


def p90(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


def report(bare: Series, harness: Series, target: float) -> bool:
    """Print the table; True when the median of the per-pair ratios is within the target.

    The pairs are the design (each pair ran back to back, so both sides saw the same
    load): the headline is the median of harness/bare within each pair. The ratio of the
    two medians mixes runs from different moments; on a busy machine it once showed the
    harness faster than a bare QEMU (0.957 while the pairs said 1.064), which it cannot
    be, so it is shown only for reference."""
    print(f"\n{'':9}{'median':>9}{'min':>9}{'p90':>9}{'up':>9}{'down':>9}   (ms; up/down = median"
          " until QMP ready / from quit to exit)")
    for s in (bare, harness):
        t = s.totals()
        print(f"{s.name:9}{ms(statistics.median(t))}{ms(min(t))}{ms(p90(t))}"
              f"{ms(statistics.median(r.up for r in s.runs))}"
              f"{ms(statistics.median(r.down for r in s.runs))}")
    ratio = statistics.median(harness.totals()) / statistics.median(bare.totals())
    pair_ratio = statistics.median(h.total / b.total for h, b in zip(harness.runs, bare.runs,
                                                                      strict=True))
    ok = pair_ratio <= target
    print(f"\nratio harness/bare (median of per-pair ratios): {pair_ratio:.3f}   "
          f"(ratio of the medians: {ratio:.3f})")
    print(f"{'PASS' if ok else 'FAIL'}: ratio {pair_ratio:.3f} {'<=' if ok else '>'} target "
          f"{target:.2f}")
    return ok


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--qemu", metavar="PATH", help="qemu-system-x86_64 to use (else QEMU_PROG, "
                   "--qemu-build, PATH, as in the suite)")
    p.add_argument("--qemu-build", metavar="DIR", help="a QEMU build tree or unpacked .deb")
    p.add_argument("--machine", default="pc", help="machine type (default pc, as the harness; "
                   "'none' for no board)")
    p.add_argument("--accel", default="tcg", help="accelerator for both sides (default tcg)")
    p.add_argument("--pairs", type=int, default=DEFAULT_PAIRS,
                   help=f"measured pairs, at least {MIN_PAIRS} (default {DEFAULT_PAIRS})")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"pairs run first and discarded (default {DEFAULT_WARMUP})")
    p.add_argument("--target", type=float, default=DEFAULT_TARGET,
                   help=f"highest acceptable ratio harness/bare (default {DEFAULT_TARGET})")
    args = p.parse_args(argv)
    if args.pairs < MIN_PAIRS:
        p.error(f"--pairs must be at least {MIN_PAIRS}")
    if args.warmup < 0:
        p.error("--warmup must not be negative")
    return args


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks below


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        binaries = find_binaries({"system": args.qemu}, args.qemu_build, os.environ)
        qemu = binaries.path("system")
        accels = list_accelerators(qemu)
    except HarnessError as e:
        print(f"overhead: {e}", file=sys.stderr)
        return 2
    if args.accel not in accels:
        print(f"overhead: --accel {args.accel}: {qemu} has only {', '.join(accels)}",
              file=sys.stderr)
        return 2
    version = subprocess.run([qemu, "-version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[:1]
    prog = binaries.programs["system"]
    print(f"qemu:    {qemu} [{prog.source}]")
    print(f"         {version[0] if version else '(no -version output)'}")
    print(f"machine: {args.machine}   accel: {args.accel} (same for both sides)   "
          f"pairs: {args.pairs} (+{args.warmup} warm-up, discarded)")
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    print(f"load:    {load:.2f} on {cpus} CPUs"
          + ("  (busy machine: expect noisy figures)" if load > cpus / 2 else ""), flush=True)

    old_term = signal.signal(signal.SIGTERM, _sigterm)
    scratch = tmpdirs.make("bench", "/tmp")
    sockdir = scratch / "s"
    sockdir.mkdir()
    bare: BareQemu | None = None
    machines: list[Machine] = []

    def make_machine() -> Machine:
        m = Machine(VM_NAME, qemu, scratch=scratch / "harness", accel=args.accel,
                    machine_type=args.machine, sockdir=sockdir)
        machines[:] = [m]
        return m

    try:
        argv_q = make_machine().argv
        print(f"command: {' '.join(argv_q)}")
        bare = BareQemu(argv_q, sockdir / f"{VM_NAME}.qmp", scratch / "bare.log")
        bare_s, harness_s = Series("bare"), Series("harness")
        for i in range(args.warmup + args.pairs):
            measured = i >= args.warmup
            pair = i - args.warmup
            order = ("bare", "harness") if pair % 2 == 0 else ("harness", "bare")
            for side in order:
                if side == "bare":
                    t = bare.run()
                    if measured:
                        bare_s.runs.append(t)
                else:
                    t = harness_run(make_machine)
                    assert machines[0].argv == argv_q, "the harness ran another command"
                    if measured:
                        harness_s.runs.append(t)
            if measured and (pair + 1) % 10 == 0:
                print(f"  {pair + 1}/{args.pairs} pairs", flush=True)
        ok = report(bare_s, harness_s, args.target)
    except (BenchError, HarnessError, OSError, ValueError) as e:
        print(f"overhead: could not measure: {e}", file=sys.stderr)
        return 2
    finally:
        if bare is not None:
            bare.kill()
        for m in machines:
            with contextlib.suppress(Exception):
                m.shutdown(check=False, timeout=3.0)
        REGISTRY.kill_all()
        shutil.rmtree(scratch, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_term)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("overhead: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(2)  # a crash is "could not measure", never "over target" (1)
