"""Session-wide environment (binaries, probe, accelerator) and the per-test case context.

These are plain classes: pytest fixtures only create them, yield, and close them. The
environment is discovered once (by the xdist controller, or by the only process) and
travels to workers as JSON, so every worker tests the same binaries with the same accel.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.binaries import ROLES, Binaries, Probe, Program, find_binaries, probe, resolve_accel
from harness.bitmaps import HashLabels, ImageBitmap, LiveBitmap, image_bitmaps, live_bitmaps, sha256
from harness.block import blockdev, qcow2_node
from harness.errors import ConfigError, HarnessError
from harness.filters import path_filter
from harness.guest import Guest, choose_accel
from harness.guest_image import GuestFiles, cache_root, ensure
from harness.machine import Machine, short_socket_dir
from harness.model import Verdict
from harness.oracle import Oracle
from harness.processes import REGISTRY
from harness.tools import QemuImg, QemuIO, QemuNBD
from harness.transcript import Transcript
from harness.vm import VM


@dataclass(frozen=True)
class Environment:
    """The QEMU under test, what it can do, and the accelerator chosen for this run."""

    binaries: Binaries
    probe: Probe
    accel: str
    accel_note: str
    requested_accel: str = "auto"
    #: the user's own guest (--guest-kernel/--guest-initrd); None: built from apt packages
    guest: GuestFiles | None = None
    #: a directory every process of the session shares (the guest's accelerator probe)
    shared_dir: str = ""

    @classmethod
    def discover(cls, explicit: Mapping[str, str | None], build_dir: str | None,
                 accel: str, env: Mapping[str, str], guest_kernel: str | None = None,
                 guest_initrd: str | None = None) -> Environment:
        """Find and probe QEMU; raises ConfigError with one sentence when it cannot work."""
        guest = own_guest(guest_kernel, guest_initrd)
        binaries = find_binaries(explicit, build_dir, env)
        missing = binaries.missing_required()
        if missing:
            binaries.path(next(r.key for r in ROLES if r.name == missing[0]))
        p = probe(binaries)
        chosen, note = resolve_accel(accel, p)
        return cls(binaries, p, chosen, note, accel, guest)

    def sharing(self, directory: str) -> Environment:
        return replace(self, shared_dir=directory)

    def to_json(self) -> str:
        progs = {k: [v.path, v.source] for k, v in self.binaries.programs.items()}
        return json.dumps({"programs": progs, "probe": self.probe.to_json(),
                           "accel": self.accel, "accel_note": self.accel_note,
                           "requested_accel": self.requested_accel,
                           "guest": self.guest.to_json() if self.guest else None,
                           "shared_dir": self.shared_dir})

    @classmethod
    def from_json(cls, text: str) -> Environment:
        d = json.loads(text)
        progs = {k: Program(k, v[0], v[1]) for k, v in d["programs"].items()}
        return cls(Binaries(progs), Probe.from_json(d["probe"]), d["accel"], d["accel_note"],
                   d["requested_accel"],
                   GuestFiles.from_json(d["guest"]) if d["guest"] else None, d["shared_dir"])

    def header_lines(self) -> list[str]:
        """What the pytest header shows: version, accelerator (said once), binaries."""
        lines = [f"qemu: {self.probe.version} ({self.probe.package or 'no package string'})",
                 f"accel: {self.accel_note}"]
        for role in ROLES:
            prog = self.binaries.programs[role.key]
            lines.append(f"  {role.name}: {prog.path or '-'} [{prog.source}]")
        if self.guest is not None:
            lines.append(f"guest: {self.guest.origin}")
        else:
            lines.append(f"guest: from apt packages, built on first use into {cache_root()}")
        return lines

    def missing_commands(self, commands: Sequence[str]) -> list[str]:
        return [c for c in commands if not self.probe.has_command(c)]


def own_guest(kernel: str | None, initrd: str | None) -> GuestFiles | None:
    """``--guest-kernel``/``--guest-initrd``: both or neither, and files that exist."""
    if kernel is None and initrd is None:
        return None
    if not kernel or not initrd:
        given, other = ("--guest-kernel", "--guest-initrd") if kernel else (
            "--guest-initrd", "--guest-kernel")
        raise ConfigError(f"{given} needs {other} too (a guest is a kernel and its initrd)")
    for option, value in (("--guest-kernel", kernel), ("--guest-initrd", initrd)):
        if not Path(value).expanduser().is_file():
            raise ConfigError(f"{option} {value}: no such file")
    return GuestFiles(Path(kernel).expanduser().resolve(), Path(initrd).expanduser().resolve(),
                      f"{kernel} + {initrd} (--guest-kernel/--guest-initrd)")


def _quiet(_text: str) -> None:
    pass


class Case:
    """Everything one test uses: scratch dir, socket dir, transcript, tools, VMs, and the
    oracle, which sees every VM's QMP traffic and every tool run (harness/oracle.py)."""

    def __init__(self, env: Environment, scratch: Path,
                 say: Callable[[str], None] = _quiet) -> None:
        self.env = env
        self.say = say
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.sockdir = short_socket_dir()
        self.log = Transcript([path_filter(str(self.scratch), "TEST_DIR"),
                               path_filter(str(self.sockdir), "SOCK_DIR")])
        self.img = QemuImg(env.binaries.path("img"), self.scratch, self.log)
        self.io = QemuIO(env.binaries.path("io"), self.scratch, self.log)
        self.machines: list[VM] = []
        self.nbd_servers: list[QemuNBD] = []
        self._pids_before = {pid for pid, _ in REGISTRY.alive()}
        self.hashes = HashLabels()
        self.data_hashes = HashLabels("D")  # every guest of the case labels data alike
        self.oracle = Oracle(self.scratch, self.img, self.log,
                             sha256=env.probe.has_command("x-debug-block-dirty-bitmap-sha256"))
        self.img.observer = self.oracle
        self.io.observer = self.oracle

    @property
    def probe(self) -> Probe:
        return self.env.probe

    def path(self, name: str) -> Path:
        """A file in the scratch directory."""
        return self.scratch / name

    def vm(self, name: str = "vm0", args: Sequence[str] = (), machine_type: str = "pc",
           log_prefix: str = "", guest: bool = False, **kw: Any) -> VM:
        """A VM (not launched yet) that is shut down when the test ends. It writes to this
        case's transcript, which the case owns, and the oracle observes it. With ``guest``
        it boots a Linux guest at each launch (``vm.guest``, :mod:`harness.guest`)."""
        accel = self.env.accel
        if guest:
            files = self.guest_files()
            accel = choose_accel(self.env.accel, self.env.requested_accel,
                                 self.env.binaries.path("system"), files,
                                 Path(self.env.shared_dir) if self.env.shared_dir else None,
                                 self.say).accel
            kw["attachments"] = [*kw.get("attachments", ()), Guest(files, log_prefix,
                                                                   labels=self.data_hashes)]
        m = VM(name, self.env.binaries.path("system"), scratch=self.scratch,
                    accel=accel, args=args, machine_type=machine_type,
                    sockdir=self.sockdir, transcript=self.log, log_prefix=log_prefix,
                    observer=self.oracle, **kw)
        self.machines.append(m)
        return m

    def vm_on(self, image: str, node: str = "drive0", name: str = "vm0", *,
              create: int | None = None, backing: Sequence[str] = (),
              read_only: bool = False, file_node: str | None = None,
              blkdebug: str | None = None, inject: Sequence[dict[str, Any]] = (),
              discard: str | None = None, device: bool = False,
              guest: bool = False, incoming: str | None = None,
              machine_type: str | None = None, launch: bool = False, **kw: Any) -> VM:
        """A VM on a qcow2 image of the scratch dir, opened as node ``node``: the shape
        almost every case starts from, said once (any other command line: :meth:`vm`).

        ``create``: a new image of that size first. ``backing``: images below ``image``,
        bottom first, each opened read-only as a node named after its file (``base.qcow2``
        is ``base``) and the backing of the next, as a management tool opens a chain.
        ``read_only``: the node itself is. ``file_node``: its file node gets that name, so
        a ``blkdebug`` filter can later be put between. ``blkdebug``: a ``blkdebug`` node of
        that name between the node and its file from the start, with the ``inject-error``
        rules ``inject``. ``discard``: the node's ``discard`` option (``unmap``: a discard
        reaches the driver). ``device``: a virtio-blk device
        ``disk0`` on the node; writes through ``disk0/virtio-backend`` land in whatever its
        active layer is, as a guest's do. ``guest``: a Linux guest that writes through
        that device (see :meth:`vm`). ``incoming``: ``-incoming`` (``defer`` or a URI), a
        migration destination. The machine is ``pc`` with a device, else ``none``
        (nothing but the block layer), unless ``machine_type`` says. ``launch``: started
        before it is returned. ``kw`` goes to :meth:`vm` (``log_prefix=``...)."""
        if create is not None:
            self.img.create(image, create)
        args: list[str] = []
        below: str | None = None
        for layer in backing:
            stem = Path(layer).name.removesuffix(".qcow2")
            args += blockdev(qcow2_node(self.path(layer), stem, read_only=True, backing=below))
            below = stem
        top = qcow2_node(self.path(image), node, read_only=read_only,
                         **({"discard": discard} if discard is not None else {}))
        if file_node is not None:
            args += blockdev({"driver": "file", "filename": str(self.path(image)),
                              "node-name": file_node})
            top["file"] = file_node
        if blkdebug is not None:
            top["file"] = {"driver": "blkdebug", "node-name": blkdebug, "image": top["file"],
                           **({"inject-error": list(inject)} if inject else {})}
        if below is not None:
            top["backing"] = below
        args += blockdev(top)
        device = device or guest
        if device:
            args += ["-device", f"virtio-blk-pci,drive={node},id=disk0,serial=disk0"]
        if incoming is not None:
            args += ["-incoming", incoming]
        vm = self.vm(name, args=args, guest=guest,
                     machine_type=machine_type or ("pc" if device else "none"), **kw)
        if launch:
            vm.launch()
        return vm

    def guest_files(self) -> GuestFiles:
        """The guest's kernel and initrd: the user's own, or built from apt packages on
        first use (progress through ``say``) and cached."""
        if self.env.guest is not None:
            return self.env.guest
        return ensure(self.say, shared=Path(self.env.shared_dir) if self.env.shared_dir
                      else None)

    def nbd(self, image: str | Path, *args: str, name: str = "nbd0") -> QemuNBD:
        """A qemu-nbd server (not started yet) on a socket in the short socket dir."""
        server = QemuNBD(self.env.binaries.path("nbd"), self.scratch,
                         self.sockdir / f"{name}.sock", image, tuple(args))
        self.nbd_servers.append(server)
        return server

    def show_bitmaps(self, vm: VM, node: str, hashes: bool = True) -> list[LiveBitmap]:
        """Log the node's live bitmaps (count, granularity, flags, hash label)."""
        found = live_bitmaps(vm, node)
        if not found:
            self.log.log(f"{vm.log_prefix}{node}: no bitmaps")
        for b in found:
            line = b.describe()
            if hashes and self.probe.has_command("x-debug-block-dirty-bitmap-sha256"):
                line += f" sha256={self.hashes(sha256(vm, node, b.name))}"
            self.log.log(vm.log_prefix + line)
        return found

    def show_image_bitmaps(self, path: str | Path, force_share: bool = False) -> list[ImageBitmap]:
        """Log the bitmaps ``qemu-img info`` reads from the image header."""
        found = image_bitmaps(self.img, path, force_share=force_share)
        where = f"qemu-img info{' -U' if force_share else ''} {Path(path).name}"
        if not found:
            self.log.log(f"{where}: no bitmaps")
        for b in found:
            self.log.log(f"{where}: {b.describe()}")
        return found

    def check_live(self, vm: Machine, node: str, names: Sequence[str] | None = None,
                   where: str = "live") -> list[Verdict]:
        """An explicit mid-scenario check: :meth:`Oracle.check_live`."""
        return self.oracle.check_live(vm, node, names, where)

    def check_disk(self, image: str | Path, names: Sequence[str] | None = None,
                   where: str = "on disk") -> list[Verdict]:
        """An explicit check of a closed image: :meth:`Oracle.check_disk`."""
        return self.oracle.check_disk(image, names, where)

    def finish(self) -> None:
        """The end of a passing test body: shut down the VMs still running (the oracle
        checks them live before and on disk after), then the oracle's verdict line."""
        self.check_machines()
        for m in self.machines:
            if m.state == "running":
                m.shutdown()
        verdict = self.oracle.summary()
        if verdict is not None:
            self.log.log(verdict)

    def check_machines(self) -> None:
        """Raise if a VM of this test died without being asked to, or hit the file-size
        limit (QEMU lives on after that, but writes past the limit failed)."""
        for m in self.machines:
            m.check_alive()
            m.check_file_size()

    def close(self, failed: bool) -> list[str]:
        """Stop everything this test started; return problems found (not raised).

        After a failed test VMs are stopped without checking their exit status, so the
        report shows the test's own error rather than a second one from teardown.
        """
        problems: list[str] = []
        if failed:
            self.oracle.checking = False
        for m in self.machines:
            try:
                m.shutdown(check=not failed)
            except HarnessError as e:
                problems.append(str(e))
        for s in self.nbd_servers:
            s.stop()
        left = [(pid, label) for pid, label in REGISTRY.alive() if pid not in self._pids_before]
        for pid, label in left:
            problems.append(f"process {pid} ({label}) was still running after the test; "
                            "killed it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            REGISTRY.forget(pid)
        shutil.rmtree(self.sockdir, ignore_errors=True)
        return problems
