"""Guest boot to ready: through the harness vs a bare ``qemu-system-x86_64 -kernel``.

What is measured
    The wall time (``time.perf_counter``) from "start QEMU" to the guest's ready marker
    (``QIO-GUEST-READY`` on its serial console), two ways, under each accelerator that
    works here:

    * **bare**: ``subprocess.Popen`` of ``qemu-system-x86_64 -nodefaults -display none
      -machine pc -accel A -m 256M -kernel K -initrd I -append "console=ttyS0 ..."
      -serial stdio``, reading its stdout until the marker; then it is killed;
    * **harness**: a ``harness.machine.Machine`` with a ``harness.guest.Guest`` attached,
      ``launch()``: QMP server socket, spawn through the process registry, QMP accept and
      negotiation, the console socket accepted and driven with pexpect to the marker.
      Its shutdown (``poweroff -f`` in the guest, ``quit``) is not timed.

    Same kernel, initrd, kernel command line, memory, machine type and accelerator on both
    sides; the harness adds QMP, ``-no-shutdown`` and a socket console instead of stdio.
    The sides alternate (bare first in even rounds); each round is a pair that ran back to
    back under the same load, and the headline per accelerator is the median of the
    per-pair ratios harness/bare over ``--runs`` rounds (default 5), as in
    ``bench/overhead.py``. The ratio of the two medians, which mixes boots from different
    moments of a busy machine, is printed beside it.

Which accelerators: TCG always (when QEMU has it), KVM when ``/dev/kvm`` opens and the
harness's probe (``harness.binaries.probe_kvm``) and a bounded guest boot under KVM both
succeed; otherwise the report says why KVM is left out.

Exit status: 0 when every headline ratio is at most ``--target`` (1.10), 1 when one is
above, 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import tmpdirs
from harness.binaries import find_binaries, list_accelerators, probe_kvm
from harness.errors import HarnessError
from harness.guest import KERNEL_CMDLINE, KVM_PROBE_TIMEOUT, Guest, probe_boot
from harness.guest_image import READY_MARKER, GuestFiles, ensure
from harness.machine import Machine

BOOT_TIMEOUT = 300.0
MEMORY = "256M"


def bare_boot(qemu: str, accel: str, files: GuestFiles, log: Path) -> float:
    """Seconds from Popen to the marker on stdout, for a plain QEMU command line."""
    argv = [qemu, "-nodefaults", "-display", "none", "-machine", "pc", "-accel", accel,
            "-m", MEMORY, "-kernel", str(files.kernel), "-initrd", str(files.initrd),
            "-append", KERNEL_CMDLINE, "-serial", "stdio"]
    marker = READY_MARKER.encode()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    seen = b""
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while marker not in seen:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise HarnessError(f"bare QEMU ended before the marker: {seen[-300:]!r}")
            seen += chunk
            if time.perf_counter() - start > BOOT_TIMEOUT:
                raise HarnessError("bare QEMU: no marker within the timeout")
        took = time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()
        log.write_bytes(seen)
    return took


def harness_boot(qemu: str, accel: str, files: GuestFiles, scratch: Path) -> float:
    """Seconds from Machine.launch() to its return (the guest at its marker)."""
    guest = Guest(files, boot_timeout=BOOT_TIMEOUT)
    vm = Machine("bench-guest", qemu, accel=accel, scratch=scratch, attachments=[guest])
    start = time.perf_counter()
    vm.launch()
    took = time.perf_counter() - start
    vm.shutdown()
    return took


def usable_accels(qemu: str, files: GuestFiles, tmp: Path) -> tuple[list[str], list[str]]:
    """The accelerators to measure, and a sentence for each left out."""
    accels = list_accelerators(qemu)
    use = [a for a in ("tcg",) if a in accels]
    notes = []
    kvm = probe_kvm(qemu, tuple(accels), tmp)
    if not kvm.usable:
        notes.append(f"kvm left out: {kvm.reason}")
    else:
        took, why = probe_boot(qemu, "kvm", files, tmp, KVM_PROBE_TIMEOUT)
        if took is None:
            notes.append(f"kvm left out: KVM passed the cheap probe but the guest did not "
                         f"boot under it: {why}")
        else:
            use.append("kvm")
    return use, notes


def pair_ratio(bare: list[float], ours: list[float]) -> float:
    """The median of harness/bare within each round (both sides of a round saw the same
    load), not the ratio of the medians."""
    return statistics.median(h / b for h, b in zip(ours, bare, strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qemu", metavar="PATH")
    p.add_argument("--qemu-build", metavar="DIR")
    p.add_argument("--runs", type=int, default=5, help="boots per side and accelerator")
    p.add_argument("--target", type=float, default=1.10)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    try:
        binaries = find_binaries({"system": args.qemu}, args.qemu_build, os.environ)
        qemu = binaries.path("system")
        files = ensure(lambda line: print(f"guest: {line}", flush=True))
    except HarnessError as e:
        print(f"bench/guest.py: {e}", file=sys.stderr)
        return 2
    tmp = tmpdirs.make("bench-guest")
    results = {}
    worst = 0.0
    try:
        accels, notes = usable_accels(qemu, files, tmp)
        for note in notes:
            print(note)
        print(f"guest: {files.origin}; {args.runs} boots per side, sides alternating")
        for accel in accels:
            bare: list[float] = []
            ours: list[float] = []
            for i in range(args.runs):
                order = ("bare", "harness") if i % 2 == 0 else ("harness", "bare")
                for side in order:
                    if side == "bare":
                        bare.append(bare_boot(qemu, accel, files, tmp / f"bare-{i}.log"))
                    else:
                        ours.append(harness_boot(qemu, accel, files, tmp))
            ratio = pair_ratio(bare, ours)
            of_medians = statistics.median(ours) / statistics.median(bare)
            worst = max(worst, ratio)
            results[accel] = {"bare": bare, "harness": ours, "ratio": ratio,
                              "ratio_of_medians": of_medians}
            print(f"{accel}: boot to ready, median of {args.runs}: bare "
                  f"{statistics.median(bare):.2f} s, harness {statistics.median(ours):.2f} s; "
                  f"harness/bare {ratio:.3f} (median of per-pair ratios; target <= "
                  f"{args.target:.2f}; ratio of the medians {of_medians:.3f}); bare runs "
                  + " ".join(f"{t:.2f}" for t in bare) + "; harness runs "
                  + " ".join(f"{t:.2f}" for t in ours))
    except HarnessError as e:
        print(f"bench/guest.py: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if not results:
        print("bench/guest.py: no accelerator could boot the guest", file=sys.stderr)
        return 2
    return 0 if worst <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
