"""The oracle: follows every QMP command, event and tool run, and checks every bitmap.

It is the observer of every Machine (and of qemu-img / qemu-io) of a case. From what the
case sends and what QEMU accepts it keeps, per running VM, the block graph (devices and
their active layer, backing links, filters, read-only state) and a :class:`Model` of
every bitmap; per image file, the persistent bitmaps stored in it and the data written
into it. A command QEMU refuses changes nothing. It never asks QEMU what a bitmap
contains; it asks only for facts that are not contents (whether QEMU flags a bitmap
inconsistent, to decide which rule applies).

Modelled (see :data:`READ_ONLY` for what is let through as not changing anything):
  * ``block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge``, alone or as
    ``transaction`` actions (applied in order when the transaction is accepted);
  * ``blockdev-add``/``-del`` (a qcow2 node opened on an image starts from the bitmaps the
    model knows are stored in it; a read-write close stores them), ``-blockdev`` on the
    command line, ``-device ...,drive=``, ``qom-set ... drive``;
  * ``blockdev-snapshot``/``-sync`` (the device's writes go to the overlay);
  * ``block-commit``, ``blockdev-mirror`` and ``blockdev-backup`` (``sync`` incremental or
    bitmap, every ``bitmap-mode``) as jobs whose outcome comes from their events;
  * ``blockdev-reopen`` (read-only stores the bitmaps, read-write marks them in use);
  * ``block_resize`` of a node: its size, and every bitmap's (bits past the new end,
    beyond the granule that holds it, are dropped; a grown disk's new part is clean);
  * NBD exports (``block-export-add``, ``nbd-server-add``: the node is activated) and
    ``nbd`` client nodes on an export of another VM of the case: writes into them land
    in the exporting VM's node (a mirror into a migration's destination);
  * live migration (``migrate`` and friends; the rules are harness/migration.py's);
  * HMP ``qemu-io`` writes, zero writes and discards, on a node or a device (a discard
    dirties bitmaps only on a node opened with ``discard=unmap``: elsewhere QEMU
    ignores it);
  * a real guest's writes through its device (``harness/guest.py``), the same way, also
    when one is still in flight while a job ends (:meth:`Oracle.device_write_done`);
  * ``qemu-img create``/``bitmap`` and ``qemu-io`` writes on closed images.

Anything else that could move data or change a bitmap raises :class:`UnmodelledCommand`
before it is sent. A case that edits an image behind QEMU's back says so with
:meth:`Oracle.edited_by_hand`.

Checks: explicit ones (:meth:`check_live`, :meth:`check_disk`, :meth:`check_exact`) and
automatic ones: every node with bitmaps live before each shutdown (so also at the end of
the test, whose VMs are shut down by the case context), and every persistent bitmap on
disk after each clean exit, for the images the VM had open read-write. A bitmap QEMU
flags inconsistent passes; one that is valid but misses a write fails.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bitmaps import (
    LiveBitmap,
    live_bitmaps,
    live_ranges,
    ranges_count,
    ranges_sha256,
    sha256,
)
from harness.block import qemu_io_failures
from harness.errors import OracleFailure, Qcow2FormatError, UnmodelledCommand
from harness.machine import Machine
from harness.migration import (
    FAILED,
    SWITCHED,
    Migration,
    file_of,
    received,
    to_send,
    uri_of,
)
from harness.model import (
    Extents,
    Model,
    ModelBitmap,
    ModelNode,
    SyncBitmapJob,
    Verdict,
    format_ranges,
)
from harness.qcow2 import Qcow2Image
from harness.qcow2_writer import Written
from harness.tools import QemuImg, Result
from harness.transcript import Transcript

#: commands that change neither data nor bitmaps (or only the oracle's own view)
READ_ONLY = frozenset({
    "qmp_capabilities", "quit", "stop", "cont", "system_reset", "system_powerdown",
    "x-debug-block-dirty-bitmap-sha256", "x-debug-query-block-graph", "qom-get", "qom-list",
    "nbd-server-start", "nbd-server-stop", "nbd-server-remove", "block-export-del",
    "block-job-set-speed", "job-complete", "job-cancel", "job-pause", "job-resume",
    "job-finalize", "job-dismiss", "block-job-cancel", "block-job-complete",
    "block-job-pause", "block-job-resume", "block-job-finalize", "block-job-dismiss",
    "object-add", "object-del", "block-set-write-threshold", "chardev-add", "chardev-remove",
    "human-monitor-command", "migrate-continue",
})
#: migration commands the oracle follows (harness/migration.py has the rules)
MIGRATION_COMMANDS = frozenset({"migrate-set-capabilities", "migrate-set-parameters", "migrate",
                                "migrate-incoming", "migrate_cancel", "migrate-cancel",
                                "migrate-start-postcopy"})
#: COLO block replication on a secondary (a ``replication`` node): starting and stopping
#: it and each checkpoint empty the secondary's active and hidden disks and drive an
#: internal backup job. Followed only in a VM without bitmaps, where the model has
#: nothing they could change
COLO_COMMANDS = frozenset({"xen-set-replication", "xen-colo-do-checkpoint"})
#: drivers that pass writes to one child: a write to them lands below
FILTERS = {"copy-before-write": "file", "blkdebug": "image", "throttle": "file",
           "compress": "file", "preallocate": "file", "blklogwrites": "file",
           "backup-top": "file", "snapshot-access": "file"}
BITMAP_COMMANDS = ("block-dirty-bitmap-add", "block-dirty-bitmap-remove",
                   "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                   "block-dirty-bitmap-disable", "block-dirty-bitmap-merge")
#: qemu-io commands that neither write nor change anything the model follows
IO_READS = frozenset({"read", "readv", "aio_read", "aio_flush", "flush", "map", "alloc",
                      "info", "length", "help", "sleep", "open", "close", "r", "v"})
#: qemu-img subcommands that only read (``check`` without ``-r`` too)
IMG_READS = frozenset({"info", "map", "compare", "measure", "check"})
DEFAULT_GRANULARITY = 65536
SUCCESSOR = " (successor during a backup job)"


@dataclass
class StoredImage:
    """What the model knows of one image file: its size, the guest ranges written into
    it, and the persistent bitmaps stored in it (``in_use``: flagged in use on disk)."""

    path: Path
    size: int
    data: Extents = field(default_factory=Extents)
    bitmaps: dict[str, ModelBitmap] = field(default_factory=dict)
    in_use: set[str] = field(default_factory=set)
    node: str = ""  # the name of the node last opened on it (for verdict lines)


@dataclass
class GraphNode:
    """One node of a VM's block graph as the oracle follows it."""

    name: str
    driver: str
    children: dict[str, str]
    read_only: bool
    image: StoredImage | None = None
    implicit: bool = False  # created by QEMU (snapshot-sync): closed when dropped
    on_disk: set[str] = field(default_factory=set)  # its bitmaps stored in the image
    #: stored bitmaps that were in use when the node opened: QEMU loads them inconsistent
    #: and never stores them again, so they stay in use in the image
    broken: set[str] = field(default_factory=set)
    #: opened for an incoming migration, or given away by an outgoing one: QEMU neither
    #: reads nor writes the image (no bitmaps loaded, none stored) until activated
    inactive: bool = False
    #: opened with ``discard=unmap``: only then does a discard reach the driver (and
    #: dirty the bitmaps); with the default ``ignore`` QEMU drops it at once
    unmap: bool = False
    #: an NBD client node whose export is a node of another VM of the case: (vm, node)
    remote: tuple[str, str] | None = None


@dataclass
class Job:
    """A block job the oracle waits to see end."""

    kind: str
    args: dict[str, Any]
    sync: SyncBitmapJob | None = None
    mode: str = ""
    filter_node: str | None = None
    source: str = ""
    reopened: str | None = None  # a read-only node QEMU reopened read-write for it
    pivot: bool = False  # job-complete sent: a mirror that ends switches to its target


@dataclass
class InFlight:
    """A write issued through a device (by a guest) that has not completed yet: where it
    would land when it started, and what changed in the VM while it was in flight
    (``(what, harmless)``: harmless when the write's place in the model is the same
    whether it landed before or after)."""

    device: str
    offset: int
    length: int
    landing: str
    changes: list[tuple[str, bool]] = field(default_factory=list)


@dataclass
class View:
    """The oracle's picture of one running VM."""

    model: Model = field(default_factory=Model)
    graph: dict[str, GraphNode] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    rw_images: dict[Path, StoredImage] = field(default_factory=dict)
    nbd_socket: str | None = None
    #: NBD exports of the case's server: id -> (export name, node, writable)
    exports: dict[str, tuple[str, str, bool]] = field(default_factory=dict)
    inflight: list[InFlight] = field(default_factory=list)
    caps: dict[str, bool] = field(default_factory=dict)  # migration capabilities
    mapping: list[dict[str, Any]] | None = None  # the block-bitmap-mapping parameter
    incoming: str | None = None  # waits for an incoming migration ("defer" or the URI)
    drives: dict[str, str] = field(default_factory=dict)  # -drive id -> its root node


class Oracle:
    """Follows a case's VMs and tools, keeps the model in step, and checks bitmaps."""

    def __init__(self, scratch: Path, img: QemuImg, log: Transcript, sha256: bool) -> None:
        self.scratch = Path(scratch)
        self.img = img
        self.log = log
        self.has_sha256 = sha256
        self.images: dict[Path, StoredImage] = {}
        self.views: dict[str, View] = {}
        self.checks = 0
        self.had_bitmaps = False
        #: automatic checks on; off once the test has failed (teardown reports nothing more)
        self.checking = True
        self._hmp_mark: dict[str, int] = {}
        self.migrations: list[Migration] = []

    # -- what a case may ask --------------------------------------------------------------

    def model(self, vm: Machine) -> Model:
        """The model of a running VM (for reading it, or an explicit out-of-band edit)."""
        return self._view(vm).model

    def image(self, path: str | Path) -> StoredImage:
        return self._image(self._path(path))

    def edited_by_hand(self, path: str | Path, why: str) -> StoredImage:
        """An image the case changes behind QEMU's back (patched with a hex editor, a
        tool the oracle does not follow): logged, and returned for the case to update."""
        self.log.log(f"oracle: {Path(path).name} edited by hand: {why}")
        return self.image(path)

    def crafted(self, written: Written, why: str) -> StoredImage:
        """An image whose bitmaps the case wrote itself (``harness/qcow2_writer.py``): the
        model learns every bit the bytes say, so the automatic checks follow. Bitmaps a
        cleared autoclear bit makes inconsistent are not stored for QEMU to load; ``in_use``
        ones are (QEMU loads them inconsistent); one whose content is undefined is not."""
        image = self.edited_by_hand(written.path, why)
        image.size = written.virtual_size
        image.bitmaps, image.in_use = {}, set()
        for b in written.bitmaps if written.autoclear else ():
            if b.dirty is None:
                continue
            self.had_bitmaps = True
            image.bitmaps[b.name] = ModelBitmap(b.name, b.granularity, recording=b.auto,
                                                persistent=True, seen=Extents(b.dirty))
            if b.in_use:
                image.in_use.add(b.name)
        return image

    def summary(self) -> str | None:
        """The last line of every passing case's transcript (None for a test in which no
        bitmap ever existed: there is no verdict to give)."""
        if not self.checks:
            return "oracle verdict: no bitmap left to check" if self.had_bitmaps else None
        return f"oracle verdict: {self.checks} bitmap check(s), all passed"

    # -- observer of a Machine --------------------------------------------------------------

    def launched(self, vm: Machine) -> None:
        view = self.views[vm.name] = View()
        args = vm.argv
        for i, a in enumerate(args[:-1]):
            if a == "-incoming":
                view.incoming = args[i + 1]
        for i, a in enumerate(args[:-1]):
            if a == "-blockdev":
                self._add_node(vm, view, _blockdev_json(args[i + 1]))
            elif a == "-drive":
                self._add_drive(vm, view, args[i + 1])
            elif a == "-device":
                self._add_device(view, args[i + 1])

    def before_command(self, vm: Machine, cmd: str, args: dict[str, Any]) -> None:
        view = self._view(vm)
        if cmd == "human-monitor-command":
            line = str(args.get("command-line", ""))
            if line.startswith("qemu-io "):
                target, command = self._parse_hmp_io(view, line)  # raises if unmodelled
                self._refuse_inactive(vm, view, target, command)
                self._hmp_mark[vm.name] = (vm.log_path.stat().st_size
                                           if vm.log_path.exists() else 0)
            elif not line.startswith(("info ", "help")):
                raise UnmodelledCommand(f"HMP command {line!r} sent to vm {vm.name!r} may "
                                        "change data or bitmaps and the oracle does not "
                                        "model it; use QMP, or add it to harness/oracle.py")
            return
        if cmd == "transaction":
            for action in args.get("actions", []):
                self._supported(vm, str(action.get("type")), dict(action.get("data", {})))
            return
        self._supported(vm, cmd, args)

    def after_command(self, vm: Machine, cmd: str, args: dict[str, Any],
                      reply: dict[str, Any]) -> None:
        if "error" in reply:
            return  # refused: QEMU changed nothing, neither does the model
        view = self._view(vm)
        if view.inflight and cmd not in READ_ONLY and not cmd.startswith(("query-",
                                                                          "x-query-")):
            actions = ([(str(a["type"]), dict(a.get("data", {}))) for a in
                        args.get("actions", [])] if cmd == "transaction" else [(cmd, args)])
            for w in view.inflight:
                w.changes += [(f"{c} {json.dumps(a, sort_keys=True)}", c == "block-commit")
                              for c, a in actions]
        if cmd == "query-migrate":
            self._migration_status(vm, str(reply["return"].get("status", "")))
        elif cmd == "human-monitor-command":
            self._after_hmp(vm, view, str(args.get("command-line", "")), str(reply["return"]))
        elif cmd == "transaction":
            for action in args.get("actions", []):
                self._apply(vm, view, str(action["type"]), dict(action.get("data", {})))
        else:
            self._apply(vm, view, cmd, args)

    def event(self, vm: Machine, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name == "MIGRATION":
            self._migration_status(vm, str(event.get("data", {}).get("status")))
        elif name == "RESUME":
            self._migration_status(vm, "running")
        if name not in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            return
        view = self.views.get(vm.name)
        data = event.get("data", {})
        if view is None or str(data.get("device")) not in view.jobs:
            return
        job = view.jobs.pop(str(data["device"]))
        succeeded = name == "BLOCK_JOB_COMPLETED" and "error" not in data
        for w in view.inflight:
            # a job that ends does not move a write of the device's: a commit or mirror
            # copies what landed above before it pivots, a backup's sync bitmap gets it
            # from its successor or directly
            w.changes.append((f"{job.kind} job {data['device']} ended", True))
        self._job_ended(vm, view, job, succeeded)

    def before_shutdown(self, vm: Machine) -> None:
        if not self.checking or sys.exc_info()[1] is not None:
            return
        view = self._view(vm)
        busy = {j.sync.bitmap for j in view.jobs.values() if j.sync is not None}
        moving = any(m.in_flight and m.bitmaps for m in self.migrations
                     if m.source == vm.name) or any(
            m.arrived and "dest" not in m.done and m.status not in FAILED
            for m in self.migrations if m.dest == vm.name)
        for node in sorted(view.model.nodes):
            names = [n for n in sorted(view.model.nodes[node].bitmaps)
                     if SUCCESSOR not in n and n not in busy]
            gnode = view.graph.get(node)
            if names and gnode is not None and gnode.inactive:
                self.log.log(f"oracle ({vm.name}): {node} is inactive (migrated away or "
                             "never taken over): its bitmaps are not checked here")
                continue
            if names and moving:
                self.log.log(f"oracle ({vm.name}): {node}: bitmaps busy in a migration "
                             "that has not ended: not checked")
                continue
            if names:
                self.check_live(vm, node, names, where=f"before shutdown of {vm.name}")

    def exited(self, vm: Machine, clean: bool) -> None:
        view = self.views.pop(vm.name, None)
        if view is None:
            return
        for m in self.migrations:
            if m.source == vm.name and m.in_flight and not m.switched:
                m.status = "failed"  # the source died before it switched over
            elif m.source == vm.name and m.in_flight and m.status.startswith("postcopy"):
                self._lost_in_postcopy(m)
        for gnode in view.graph.values():
            if gnode.image is None or gnode.inactive:
                continue  # an inactive node's image is not QEMU's to write
            if clean:
                if not gnode.read_only:
                    self._store(view, gnode)
            else:
                self._crashed(view, gnode)
        if clean and self.checking and sys.exc_info()[1] is None:
            # (not while another error is on its way out: that one is the report)
            for path, image in sorted(view.rw_images.items()):
                if image.bitmaps:
                    self.check_disk(path, where=f"{path.name} after shutdown of {vm.name}")

    def device_write_started(self, vm: Machine, device: str, offset: int,
                             length: int) -> object:
        """A guest write through ``device`` is issued (it completes later)."""
        view = self._view(vm)
        node = self._landing(view, device)
        gnode = view.graph.get(node)
        if gnode is not None and gnode.inactive:
            raise UnmodelledCommand(f"a guest write to {device!r} of vm {vm.name!r} lands in "
                                    f"{node!r}, which is inactive (migrated away, or waiting "
                                    "for a migration): QEMU must not write there")
        w = InFlight(device, offset, length, node)
        view.inflight.append(w)
        return w

    def device_write_done(self, vm: Machine, token: object, ok: bool) -> None:
        """The guest write has completed (``ok``) or failed (nothing is modelled, as for
        a refused qemu-io write). If what changed while it was in flight leaves its place
        in doubt, the oracle says so rather than guess."""
        view = self.views.get(vm.name)
        if view is None or not isinstance(token, InFlight) or token not in view.inflight:
            return
        view.inflight.remove(token)
        if not ok:
            return
        doubt = [what for what, harmless in token.changes if not harmless]
        if doubt:
            raise UnmodelledCommand(
                f"a guest write {token.offset:#x}+{token.length:#x} through {token.device!r} "
                f"was in flight while {'; '.join(doubt)}: the oracle cannot tell where it "
                "landed; wait for the write first, or model this race in harness/oracle.py")
        self._device_write(view, token.device, "data", token.offset, token.length)

    def _device_write(self, view: View, target: str, kind: str, offset: int,
                      length: int) -> None:
        """A write issued to ``target`` (a device or a node) lands in its active layer.

        One issued to a ``snapshot-access`` node (a fleecing view) never reaches the disk
        below it: QEMU fails a write there, and a discard drops that area from the view,
        discarding it in the copy-before-write filter's target (the fleecing image)."""
        fleecing = self._fleecing_target(view, target)
        if fleecing is not None:
            if kind != "data" and fleecing in view.graph and view.graph[fleecing].unmap:
                mark_dirty(view.model, fleecing, offset, length)
            return
        node = self._landing(view, target)
        if kind == "data":
            self._write(view, node, offset, length)
        elif view.graph[node].unmap:
            mark_dirty(view.model, node, offset, length)

    # -- observer of qemu-img / qemu-io ----------------------------------------------------

    def tool_ran(self, tool: str, args: Sequence[str], result: Result) -> None:
        if result.status != 0:
            return
        if tool == "qemu-img":
            self._after_img(list(args))
        elif tool == "qemu-io":
            self._after_io_tool(list(args), result.stdout + result.stderr)

    def before_tool(self, tool: str, args: Sequence[str]) -> None:
        self._refuse_nbd_writers(tool, args)
        if tool == "qemu-img":
            sub = args[0] if args else ""
            if sub in IMG_READS or sub in ("create", "bitmap", "convert"):
                return
            known = [a for a in args if self._path(a) in self.images
                     and self.images[self._path(a)].bitmaps]
            if known:
                raise UnmodelledCommand(f"qemu-img {sub} on {Path(known[0]).name} may change "
                                        "its data or bitmaps and the oracle does not model "
                                        "it; tell it with edited_by_hand()")
        elif tool == "qemu-io":
            for cmd in _tool_io_commands(args):
                _parse_io(cmd)  # raises if unmodelled

    def _refuse_nbd_writers(self, tool: str, args: Sequence[str]) -> None:
        """A tool may read a writable export of a VM, never write through it: the oracle
        follows writes into a VM's node only from that VM or an NBD client node of
        another VM of the case."""
        reads = (tool == "qemu-img" and bool(args) and args[0] in IMG_READS) or (
            tool == "qemu-io" and "-r" in args)
        if reads:
            return
        for name, v in self.views.items():
            if v.nbd_socket is None or not any(w for _, _, w in v.exports.values()):
                continue
            if any(v.nbd_socket in str(a) for a in args):
                raise UnmodelledCommand(f"{tool} on the writable NBD export of vm {name!r} "
                                        "may write where the oracle cannot see it; use "
                                        "qemu-io -r, or a node of a VM of the case")

    # -- checks --------------------------------------------------------------------------

    def check_live(self, vm: Machine, node: str, names: Sequence[str] | None = None,
                   where: str = "live") -> list[Verdict]:
        """Each bitmap the model has on ``node`` against QEMU's live view (NBD ranges,
        count and sha256 must agree); logs one verdict line per bitmap."""
        view = self._view(vm)
        mnode = view.model.nodes.get(node)
        if mnode is None:
            raise OracleFailure(f"vm {vm.name!r} has no node {node!r} in the oracle's model")
        live = {b.name: b for b in live_bitmaps(vm, node)}
        verdicts = []
        states: list[str] = []
        for name in names if names is not None else sorted(
                n for n in mnode.bitmaps if SUCCESSOR not in n):
            if name not in live:
                raise OracleFailure(f"bitmap {name!r} on {node!r} ({where}) is gone: QEMU "
                                    f"has {sorted(live) or 'no bitmaps'}")
            b = live[name]
            ranges = [] if b.inconsistent else live_ranges(vm, node, name, self.img,
                                                           view.nbd_socket)
            if not b.inconsistent:
                self._views_agree(vm, mnode, b.name, b.count, b.granularity, ranges, where)
                states += self._state_problems(mnode.bitmaps[name], b, node, where)
            verdicts.append(view.model.verdict(node, name, ranges, b.inconsistent))
        self._judge(verdicts, where)  # missing writes first: they are what a backup loses
        if states:
            raise OracleFailure("\n".join(states), verdicts)
        return verdicts

    def _views_agree(self, vm: Machine, mnode: ModelNode, name: str, count: int,
                     granularity: int, ranges: list[tuple[int, int]], where: str) -> None:
        """QEMU's count and hash must describe the same bits as the NBD view."""
        problems = []
        if ranges_count(ranges, granularity) != count:
            problems.append(f"count {count} but the NBD view has "
                            f"{ranges_count(ranges, granularity)} dirty bytes")
        if self.has_sha256 and sha256(vm, mnode.name, name) != ranges_sha256(
                ranges, granularity, mnode.size):
            problems.append("its sha256 does not match the bits of the NBD view")
        if problems:
            raise OracleFailure(f"bitmap {name!r} on {mnode.name!r} ({where}): QEMU's views "
                                f"disagree: {'; '.join(problems)}")

    def _state_problems(self, model: ModelBitmap, live: LiveBitmap, node: str,
                        where: str) -> list[str]:
        """Granularity, enabled state and persistence as the model has them: a bitmap that
        stopped recording loses the next writes, a transient one is lost at the next quit."""
        problems = []
        if live.granularity != model.granularity:
            problems.append(f"granularity {live.granularity}, the model's is "
                            f"{model.granularity}")
        if live.recording != model.recording:
            problems.append("it is " + ("recording" if live.recording else "not recording")
                            + ", the model says " + ("enabled" if model.recording
                                                     else "disabled"))
        if live.persistent != model.persistent:
            problems.append("it is " + ("persistent" if live.persistent else "transient")
                            + ", the model says " + ("persistent" if model.persistent
                                                     else "transient"))
        if not problems:
            return []
        return [f"bitmap {model.name!r} on {node!r} ({where}): " + "; ".join(problems)]

    def check_disk(self, path: str | Path, names: Sequence[str] | None = None,
                   where: str = "on disk", exact: bool = False) -> list[Verdict]:
        """The model's stored bitmaps of an image against the file itself (read directly,
        no QEMU involved); ``in_use`` on disk counts as inconsistent. ``exact``: the model
        knows every bit (a crafted image), so extra ranges fail too."""
        image = self.image(path)
        qimg = Qcow2Image.open(image.path)
        stored = {b.name: b for b in qimg.bitmaps}
        verdicts = []
        for name in names if names is not None else sorted(image.bitmaps):
            if name not in stored or name not in image.bitmaps:
                raise OracleFailure(
                    f"persistent bitmap {name!r} of {image.node or image.path.name!r} "
                    f"({where}): the model has {sorted(image.bitmaps) or 'none'}, "
                    f"{image.path.name} stores {sorted(stored) or 'none'}")
            b = stored[name]
            inconsistent = not b.usable
            ranges = [] if inconsistent else b.dirty_ranges()
            verdicts.append(image.bitmaps[name].verdict(image.node or image.path.stem,
                                                        image.size, ranges, inconsistent))
        self._judge(verdicts, where)
        extra = [v for v in verdicts if exact and v.extra]
        if extra:
            raise OracleFailure("\n".join(
                f"bitmap {v.bitmap!r} of {image.path.name} ({where}) has dirty ranges the "
                f"model does not: extra {format_ranges(v.extra)}" for v in extra), verdicts)
        return verdicts

    def check_exact(self, vm: Machine, node: str, names: Iterable[str],
                    where: str) -> list[Verdict]:
        """The bitmaps against the model, exactly: after a backup the model knows every
        bit, so extra ranges fail too (the job did not clear what its mode clears)."""
        verdicts = self.check_live(vm, node, list(names), where=where)
        extra = [v for v in verdicts if v.extra]
        if extra:
            raise OracleFailure("\n".join(
                f"bitmap {v.bitmap!r} on {v.node!r} ({where}) has dirty ranges the model "
                f"says are clean (a backup cleared them, or the image never held them): "
                f"extra {format_ranges(v.extra)}; model requires "
                f"{format_ranges(v.required)}, QEMU has {format_ranges(v.actual)}"
                for v in extra), verdicts)
        return verdicts

    def check_ranges(self, vm: Machine, node: str, bitmap: str, ranges: Extents,
                     where: str, window: tuple[int, int] | None = None,
                     exact: bool = True) -> Verdict:
        """Ranges a client read from QEMU (an exported bitmap) against the model,
        exactly: a missing range would be lost from a backup, an extra one means QEMU did
        not show the bitmap as the model has it at that point. ``window`` (offset,
        length): the client read only that part of the disk. ``exact=False`` where the
        model may not know every bit (a commit dirties whole clusters of the base): only
        a missing range fails, as in :meth:`check_live`."""
        v = self._view(vm).model.verdict(node, bitmap, ranges)
        if window is not None:
            start, end = window[0], window[0] + window[1]
            got, req = Extents(ranges).window(start, end), v.required.window(start, end)
            v = dataclasses.replace(v, required=req, actual=got, missing=req.minus(got),
                                    extra=got.minus(req))
        self._judge([v], where)
        if v.extra and exact:
            raise OracleFailure(f"{where}: {bitmap} read as {format_ranges(ranges)}; the "
                                f"model requires {format_ranges(v.required)}", [v])
        return v

    def ranges_vary(self, vm: Machine, node: str, bitmap: str, why: str) -> None:
        """Say that a bitmap's exact ranges differ from run to run (e.g. they depend on the
        order of a failed job's parallel copies): verdict lines show ``why`` instead of
        them. The check itself is unchanged."""
        self._view(vm).model.bitmap(node, bitmap).varies = why

    def _judge(self, verdicts: list[Verdict], where: str) -> list[Verdict]:
        for v in verdicts:
            self.log.log(f"oracle ({where}): {v.describe()}")
        self.checks += len(verdicts)
        bad = [v.failure(where) for v in verdicts if not v.ok]
        if bad:
            raise OracleFailure("\n".join(bad), verdicts)
        return verdicts

    # -- following commands --------------------------------------------------------------

    def _supported(self, vm: Machine, cmd: str, args: dict[str, Any]) -> None:
        if cmd in READ_ONLY or cmd.startswith(("query-", "x-query-")):
            return
        if cmd in BITMAP_COMMANDS or cmd in ("blockdev-add", "blockdev-del",
                                             "blockdev-snapshot", "blockdev-snapshot-sync",
                                             "block-commit", "blockdev-mirror",
                                             "blockdev-reopen", "x-blockdev-reopen",
                                             "device_add", "device_del", "nbd-server-add",
                                             "block_resize"):
            return
        if cmd == "blockdev-backup":
            if "bitmap" in args and args.get("sync") not in ("incremental", "bitmap"):
                raise UnmodelledCommand(f"blockdev-backup with sync={args.get('sync')} and a "
                                        "bitmap is not modelled by the oracle")
            return
        if cmd == "block-export-add":
            if args.get("writable") and args.get("type") != "nbd":
                raise UnmodelledCommand(f"a writable {args.get('type')} export lets clients "
                                        "write where the oracle cannot see it")
            return
        if cmd == "qom-set":
            return
        if cmd in MIGRATION_COMMANDS:
            self._check_migration(vm, cmd, args)
            return
        if cmd in COLO_COMMANDS:
            if any(n.bitmaps for n in self._view(vm).model.nodes.values()):
                raise UnmodelledCommand(f"{cmd} (vm {vm.name!r}) empties the COLO secondary's "
                                        "active and hidden disks, which the oracle does not "
                                        "model for a VM with bitmaps")
            return
        raise UnmodelledCommand(f"{cmd} (vm {vm.name!r}) may move data or change bitmaps and "
                                "the oracle does not model it; model it in harness/oracle.py "
                                "or tell the oracle with edited_by_hand()")

    def _apply(self, vm: Machine, view: View, cmd: str, a: dict[str, Any]) -> None:
        m = view.model
        if cmd == "block-dirty-bitmap-add":
            self.had_bitmaps = True
            node = self._node(view, str(a["node"]))
            gran = int(a.get("granularity", self._default_granularity(node)))
            m.add_bitmap(node.name, str(a["name"]), gran, recording=not a.get("disabled"),
                         persistent=bool(a.get("persistent")))
        elif cmd == "block-dirty-bitmap-remove":
            node = self._node(view, str(a["node"]))
            m.remove_bitmap(node.name, str(a["name"]))
            node.on_disk.discard(str(a["name"]))
            if node.image is not None:
                node.image.bitmaps.pop(str(a["name"]), None)
                node.image.in_use.discard(str(a["name"]))
        elif cmd == "block-dirty-bitmap-clear":
            m.clear(self._node(view, str(a["node"])).name, str(a["name"]))
        elif cmd == "block-dirty-bitmap-enable":
            m.enable(self._node(view, str(a["node"])).name, str(a["name"]))
        elif cmd == "block-dirty-bitmap-disable":
            m.disable(self._node(view, str(a["node"])).name, str(a["name"]))
        elif cmd == "block-dirty-bitmap-merge":
            target = self._node(view, str(a["node"])).name
            sources = [(self._resolve(view, str(s["node"])), str(s["name"]))
                       if isinstance(s, dict) else (target, str(s)) for s in a["bitmaps"]]
            m.merge(target, str(a["target"]), sources)
        elif cmd == "blockdev-add":
            self._add_node(vm, view, a)
        elif cmd == "blockdev-del":
            self._close(view, str(a["node-name"]))
        elif cmd in ("blockdev-reopen", "x-blockdev-reopen"):
            for opts in a.get("options", [a]):
                self._reopen(vm, view, dict(opts))
        elif cmd == "blockdev-snapshot":
            self._snapshot(view, str(a["node"]), str(a["overlay"]))
        elif cmd == "blockdev-snapshot-sync":
            base = self._resolve(view, str(a.get("node-name", a.get("device"))))
            overlay = str(a["snapshot-node-name"])
            path = self._path(str(a["snapshot-file"]))
            size = view.model.nodes[base].size
            self.images[path] = StoredImage(path, size, node=overlay)
            # QEMU opens the overlay with the flags of the node it covers (discard too)
            view.graph[overlay] = GraphNode(overlay, "qcow2", {"backing": base}, False,
                                            self.images[path], implicit=True,
                                            unmap=view.graph[base].unmap)
            view.model.node(overlay, size).data = self.images[path].data
            view.rw_images[path] = self.images[path]
            self._snapshot(view, base, overlay, add_backing=False)
        elif cmd in ("block-commit", "blockdev-mirror", "blockdev-backup"):
            self._job_started(vm, view, cmd, a)
        elif cmd == "block_resize":
            self._resize(view, self._landing(view, str(a.get("node-name", a.get("device")))),
                         int(a["size"]))
        elif cmd == "device_add" and "drive" in a and "id" in a:
            view.devices[str(a["id"])] = str(a["drive"])
        elif cmd == "device_del":
            view.devices.pop(str(a.get("id")), None)
        elif cmd == "qom-set" and a.get("property") == "drive":
            device = str(a["path"]).rstrip("/").split("/")
            for dev in list(view.devices):
                if dev in device:
                    view.devices[dev] = str(a["value"])
        elif cmd == "nbd-server-start":
            addr = a.get("addr", {})
            if addr.get("type") == "unix":
                view.nbd_socket = str(addr.get("data", addr).get("path"))
        elif cmd == "nbd-server-stop":
            view.nbd_socket = None
            view.exports.clear()
        elif cmd in ("block-export-add", "nbd-server-add"):
            self._export(view, cmd, a)
        elif cmd in ("block-export-del", "nbd-server-remove"):
            view.exports.pop(str(a.get("id", a.get("name"))), None)
        elif cmd in ("job-complete", "block-job-complete"):
            job = view.jobs.get(str(a.get("id", a.get("device"))))
            if job is not None:
                job.pivot = True
        elif cmd in MIGRATION_COMMANDS or cmd == "cont":
            self._apply_migration(vm, view, cmd, a)

    # -- migration (the rules are harness/migration.py's) --------------------------------

    def _check_migration(self, vm: Machine, cmd: str, args: dict[str, Any]) -> None:
        """Refuse what would move data where the oracle cannot follow it."""
        if cmd == "migrate-set-capabilities":
            for c in args.get("capabilities", []):
                if c.get("capability") == "block" and c.get("state"):
                    raise UnmodelledCommand("the migration capability 'block' copies disks "
                                            "in the migration stream, which the oracle does "
                                            "not follow; migrate storage with blockdev-mirror")
        elif cmd == "migrate":
            if args.get("blk") or args.get("inc"):
                raise UnmodelledCommand("migrate with blk/inc copies disks in the migration "
                                        "stream, which the oracle does not follow; migrate "
                                        "storage with blockdev-mirror")
            uri = uri_of(args)
            waiting = sorted(n for n, v in self.views.items() if v.incoming is not None)
            if self._incoming_vm(uri) is None and waiting:
                raise UnmodelledCommand(f"migrate to {uri or args}: no VM of this case waits "
                                        f"for it ({', '.join(waiting)} wait(s) elsewhere); "
                                        "the oracle must know where the bitmaps go")

    def _incoming_vm(self, uri: str | None) -> str | None:
        for name, v in self.views.items():
            if uri is not None and v.incoming == uri:
                return name
        return None

    def _apply_migration(self, vm: Machine, view: View, cmd: str, a: dict[str, Any]) -> None:
        if cmd == "migrate-set-capabilities":
            for c in a.get("capabilities", []):
                view.caps[str(c["capability"])] = bool(c["state"])
        elif cmd == "migrate-set-parameters" and "block-bitmap-mapping" in a:
            view.mapping = list(a["block-bitmap-mapping"])
        elif cmd == "migrate-incoming":
            view.incoming = uri_of(a) or str(a)
            path = file_of(view.incoming, writes=False)
            saved = [m for m in self.migrations if path is not None and m.file == path]
            if saved and saved[-1].dest is None:
                saved[-1].dest = vm.name  # the destination reads what the source saved
        elif cmd == "migrate":
            uri = uri_of(a) or str(a)
            m = Migration(vm.name, self._incoming_vm(uri), uri,
                          bool(view.caps.get("dirty-bitmaps")),
                          None if view.mapping is None else list(view.mapping),
                          file=file_of(uri, writes=True))
            self.migrations.append(m)
        elif cmd == "cont" and any(m.source == vm.name and m.switched
                                   for m in self.migrations):
            self._activate(view)  # "continuing after completed migration": images back

    def _migration_status(self, vm: Machine, status: str) -> None:
        """A MIGRATION status (event or query-migrate reply; ``running``: a RESUME) seen
        on ``vm``, as the source or the destination of a migration the oracle follows."""
        for m in self.migrations:
            if m.source == vm.name and m.in_flight and status != "running":
                m.status = status
                if status in SWITCHED:
                    self._switchover(m)
                if status == "completed" or status in FAILED:
                    m.done.add("source")
                if status in FAILED and m.switched and vm.name in self.views:
                    self._activate(self.views[vm.name])  # QEMU takes its images back
            elif m.dest == vm.name and m.status not in FAILED and "dest" not in m.done:
                if status in ("running", "completed") and not m.arrived:
                    self._arrive(m)
                if status == "completed" or status in FAILED:
                    m.done.add("dest")

    def _switchover(self, m: Migration) -> None:
        """The source stops and gives its images away: what travels is fixed now."""
        if m.switched:
            return
        m.switched = True
        view = self.views.get(m.source)
        if view is None:
            m.sent = []
            return
        nodes = {n: {b: bm for b, bm in mn.bitmaps.items() if SUCCESSOR not in b}
                 for n, mn in view.model.nodes.items()}
        backends = self._backends(view)
        m.sent = to_send(nodes, m.mapping, backends) if m.bitmaps else []
        travelling: dict[str, set[str]] = {}
        aliases = {(s.node, s.name) for s in m.sent}
        for n, bitmaps in nodes.items():
            travelling[n] = {b for b in bitmaps
                             if self._sent_from(m, n, b, aliases, backends)}
        self._inactivate(view, travelling)

    def _sent_from(self, m: Migration, node: str, name: str,
                   aliases: set[tuple[str, str]], backends: dict[str, str]) -> bool:
        one = to_send({node: {name: ModelBitmap(name, 1)}}, m.mapping, backends)
        return bool(one) and (one[0].node, one[0].name) in aliases

    def _inactivate(self, view: View, travelling: dict[str, set[str]]) -> None:
        """``bdrv_inactivate_all`` on the source: each read-write qcow2 node stores its
        persistent bitmaps and releases them, except those travelling with the migration
        (QEMU skips storing them; the image keeps its old, in-use copy)."""
        for gnode in view.graph.values():
            if gnode.inactive:
                continue
            gnode.inactive = True
            mnode = view.model.nodes.get(gnode.name)
            if gnode.image is None or gnode.read_only or mnode is None:
                continue
            image = gnode.image
            for name in sorted(mnode.bitmaps):
                b = mnode.bitmaps[name]
                if not b.persistent or name in travelling.get(gnode.name, set()):
                    continue
                image.bitmaps[name] = b.copy()
                image.in_use.discard(name)
                gnode.on_disk.add(name)
                del mnode.bitmaps[name]
            view.rw_images.pop(image.path, None)

    def _activate(self, view: View) -> None:
        """The images become QEMU's again (a destination taking over, a source after a
        failed migration or ``cont``): each qcow2 node loads the bitmaps stored in its
        image, except an in-use one whose name it already has (a migrated bitmap, or the
        source's own that never left RAM), and flags them in use."""
        view.incoming = None
        for gnode in view.graph.values():
            self._activate_node(view, gnode)

    def _activate_tree(self, view: View, name: str) -> None:
        """``bdrv_activate`` of one node: the node and everything below it."""
        gnode = view.graph.get(name)
        if gnode is None:
            return
        self._activate_node(view, gnode)
        for role, child in gnode.children.items():
            if role != "path":
                self._activate_tree(view, child)

    def _activate_node(self, view: View, gnode: GraphNode) -> None:
        if not gnode.inactive:
            return
        gnode.inactive = False
        image = gnode.image
        if image is None:
            return
        mnode = view.model.node(gnode.name, image.size)
        for bname, b in image.bitmaps.items():
            if bname not in mnode.bitmaps:
                mnode.bitmaps[bname] = b.copy()
                self.had_bitmaps = True
        gnode.on_disk = set(image.bitmaps)
        gnode.broken = image.in_use & gnode.on_disk
        if not gnode.read_only:
            image.in_use |= gnode.on_disk
            view.rw_images[image.path] = image

    def _arrive(self, m: Migration) -> None:
        """The destination takes over: the migrated bitmaps appear on its nodes (before
        its images are activated, as in QEMU), then the images are activated."""
        m.arrived = True
        assert m.dest is not None
        view = self.views[m.dest]
        self._switchover(m)  # (if its event is still on the way) m.sent is what travelled
        # a drive id names the first node below the drive's filters, as on the source
        landed = received(m.sent or [], view.mapping,
                          {d: n for n, d in self._backends(view).items()})
        unknown = [b.name for node, b in landed if node not in view.model.nodes]
        if unknown:
            # QEMU cancels the bitmap part of the incoming migration at the first unknown
            # node or alias and drops every bitmap it received; the VM still migrates
            self.log.log(f"oracle ({m.dest}): bitmaps for no node here ({', '.join(unknown)}):"
                         " QEMU drops every migrated bitmap")
            landed = []
        for node, b in landed:
            mnode = view.model.nodes[node]
            if b.name in mnode.bitmaps:
                raise OracleFailure(f"vm {m.dest!r} took over a migration although node "
                                    f"{node!r} already had a bitmap {b.name!r}: QEMU refuses "
                                    "that, the oracle does not know what happened")
            mnode.bitmaps[b.name] = b
            m.landed.append((node, b.name))
            self.had_bitmaps = True
        self._activate(view)

    def _lost_in_postcopy(self, m: Migration) -> None:
        """The source died in post-copy, before its end: the destination cancels the
        incoming bitmaps and releases every one still unfinished, which is all of them
        (QEMU sends their COMPLETE chunks last, in ``dirty_bitmap_save_complete``). With
        ``dirty-bitmaps`` alone it runs on ("All states are migrated except dirty
        bitmaps") and reports ``completed``; with ``postcopy-ram`` it exits."""
        m.status = "failed"
        m.done.add("source")
        view = self.views.get(m.dest or "")
        if view is None:
            return
        for node, name in m.landed:
            mnode = view.model.nodes.get(node)
            if mnode is not None:
                mnode.bitmaps.pop(name, None)
        self.log.log(f"oracle ({m.dest}): the source died in post-copy: the bitmaps on "
                     f"the way are dropped ({', '.join(n for _, n in m.landed) or 'none'})")

    def stream_edited(self, original: str | Path, edited: str | Path, why: str,
                      dropped: bool) -> None:
        """The migration stream a ``migrate`` saved to ``original`` was copied to
        ``edited`` with its bitmap part changed by the case (``harness/migstream.py``): a
        destination reading ``edited`` gets what the source sent, or with ``dropped`` none
        of it (QEMU cancels the incoming bitmaps at the first chunk it cannot place and
        drops every one not finished, which is all of them until the stream's end)."""
        saved = [m for m in self.migrations if m.file == str(original)]
        if not saved:
            raise UnmodelledCommand(f"no migration of this case saved its stream to "
                                    f"{original}")
        m = saved[-1]
        self.migrations.append(dataclasses.replace(m, file=str(edited), dest=None, done=set(m.done),
                                       landed=[], sent=[] if dropped else m.sent))
        self.log.log(f"oracle: {Path(edited).name} is {Path(original).name} edited: {why}"
                     + ("; no migrated bitmap survives it" if dropped else ""))

    # -- NBD exports and the client nodes that write into them -----------------------------

    def _export(self, view: View, cmd: str, a: dict[str, Any]) -> None:
        """An NBD export of the case's server. QEMU activates the exported node first
        (``blk_exp_add``: exports carry non-shared storage migration, so a destination's
        image is written before the migration hands over): its image is QEMU's from now."""
        if cmd == "block-export-add":
            if a.get("type") != "nbd":
                return
            node = self._resolve(view, str(a["node-name"]))
            export_id = str(a["id"])
            name = str(a.get("name", a["node-name"]))
        else:
            node = self._resolve(view, str(a["device"]))
            export_id = name = str(a.get("name", a["device"]))
        view.exports[export_id] = (name, node, bool(a.get("writable")))
        self._activate_tree(view, node)

    def _remote_of(self, opts: dict[str, Any]) -> tuple[str, str] | None:
        """The (vm, node) an ``nbd`` client node reaches: an export of a VM of the case
        whose NBD server listens on that unix socket (None for anything else)."""
        server = opts.get("server")
        if not isinstance(server, dict) or server.get("type") != "unix":
            return None
        export = str(opts.get("export", ""))
        for name, v in self.views.items():
            if v.nbd_socket is None or v.nbd_socket != str(server.get("path")):
                continue
            for ename, node, _ in v.exports.values():
                if ename == export:
                    return name, node
        return None

    def _write(self, view: View, node: str, offset: int, length: int) -> None:
        """Data written into ``node``; through an NBD client node it lands in the node of
        the VM that exports it (recorded by that node's bitmaps, not by this VM's)."""
        gnode = view.graph.get(node)
        if gnode is not None and gnode.remote is not None:
            vm_name, remote = gnode.remote
            there = self.views.get(vm_name)
            if there is not None and remote in there.model.nodes:
                there.model.write(remote, offset, length)
                return
        view.model.write(node, offset, length)

    def _refuse_inactive(self, vm: Machine, view: View, target: str, command: str) -> None:
        if not _parse_io(command):
            return
        node = self._landing(view, target)
        gnode = view.graph.get(node)
        if gnode is not None and gnode.inactive:
            raise UnmodelledCommand(f"a qemu-io write to {node!r} of vm {vm.name!r}, which is "
                                    "inactive (its migration switched over, or it waits for "
                                    "one): QEMU must not write there")

    # -- graph -----------------------------------------------------------------------------

    def _add_node(self, vm: Machine, view: View, opts: dict[str, Any]) -> str:
        """A node and, inline, its children; returns its name."""
        driver = str(opts.get("driver"))
        children: dict[str, str] = {}
        for role in ("file", "backing", "image", "target"):
            child = opts.get(role)
            if isinstance(child, dict):
                children[role] = self._add_node(vm, view, child)
            elif isinstance(child, str):
                children[role] = child
        name = str(opts.get("node-name", f"#inline-{len(view.graph)}"))
        read_only = bool(opts.get("read-only", False))
        gnode = GraphNode(name, driver, children, read_only, inactive=view.incoming is not None,
                          unmap=_unmaps(opts))
        if driver == "nbd":
            gnode.remote = self._remote_of(opts)
        view.graph[name] = gnode
        if driver == "file":
            gnode.image = None
            gnode.children["path"] = str(opts.get("filename"))
            return name
        path = self._file_of(view, gnode)
        if driver == "qcow2" and path is not None:
            image = self._image(path)
            gnode.image = image
            image.node = name
            mnode = view.model.node(name, image.size)
            mnode.data = image.data
            if gnode.inactive:
                return name  # opened for an incoming migration: loaded when activated
            for bname, b in image.bitmaps.items():
                mnode.bitmaps[bname] = b.copy()
            gnode.on_disk = set(image.bitmaps)
            gnode.broken = image.in_use & gnode.on_disk
            if not read_only:
                image.in_use |= gnode.on_disk
                view.rw_images[path] = image
        elif driver not in FILTERS and driver != "file":
            # a raw image has no header to read its size from: ask QEMU
            size = self._image(path).size if path is not None else 0
            view.model.node(name, size or _node_size(vm, name))
        if view.model.nodes.get(name) is not None and view.model.nodes[name].bitmaps:
            self.had_bitmaps = True
        return name

    def _file_of(self, view: View, gnode: GraphNode) -> Path | None:
        """The image file under a node, through filters (blkdebug) to the file node."""
        seen = 0
        child = gnode.children.get("file") or gnode.children.get("image")
        while child is not None and seen < 10:
            seen += 1
            below = view.graph.get(child)
            if below is None:
                return None
            if below.driver == "file":
                return self._path(below.children["path"])
            child = below.children.get("file") or below.children.get("image")
        return None

    def _add_drive(self, vm: Machine, view: View, spec: str) -> None:
        """``-drive if=none,id=ID,node-name=NODE,driver=...,file.filename=...``: a node
        tree as ``-blockdev`` would give, under a BlockBackend named ``ID`` (a device of
        that name for qemu-io, a name of its own in a migration). Any other ``-drive`` (no
        id, no node-name: QEMU's generated names are not the oracle's to guess) is left
        out of the model: a command or a write that reaches it then fails as one on a node
        the oracle does not know."""
        opts = _blockdev_json(spec)
        drive = opts.pop("id", None)
        if opts.pop("if", "none") != "none" or drive is None or "node-name" not in opts:
            return
        if isinstance(opts.get("file"), str):
            opts["file"] = {"driver": "file", "filename": opts["file"]}
        root = self._add_node(vm, view, opts)
        view.drives[str(drive)] = root
        view.devices[str(drive)] = root

    def _backends(self, view: View) -> dict[str, str]:
        """``{node: drive id}``: the node each named BlockBackend stands on, filters
        without bitmaps skipped (QEMU's init_dirty_bitmap_migration)."""
        out = {}
        for drive, node in view.drives.items():
            gnode = view.graph.get(node)
            while (gnode is not None and gnode.driver in FILTERS
                   and not (gnode.name in view.model.nodes
                            and view.model.nodes[gnode.name].bitmaps)):
                gnode = view.graph.get(gnode.children.get(FILTERS[gnode.driver], ""))
            if gnode is not None:
                out[gnode.name] = drive
        return out

    def _add_device(self, view: View, spec: str) -> None:
        opts = dict(p.split("=", 1) for p in spec.split(",")[1:] if "=" in p)
        if "drive" in opts and "id" in opts:
            view.devices[opts["id"]] = opts["drive"]

    def _resolve(self, view: View, name: str) -> str:
        """A device id (``disk0``, ``disk0/virtio-backend``) or a node name -> node."""
        if name in view.graph:
            return name
        dev = name.split("/", 1)[0]
        if dev in view.devices:
            return view.devices[dev]
        raise OracleFailure(f"the oracle knows no node or device {name!r} (known nodes: "
                            f"{sorted(view.graph)}; devices: {sorted(view.devices)})")

    def _node(self, view: View, name: str) -> GraphNode:
        return view.graph[self._resolve(view, name)]

    def _landing(self, view: View, name: str) -> str:
        """The node a write issued to ``name`` lands in: through filters, to the format."""
        node = self._resolve(view, name)
        for _ in range(10):
            g = view.graph.get(node)
            if g is None or g.driver not in FILTERS:
                break
            node = g.children[FILTERS[g.driver]]
        return node

    def _fleecing_target(self, view: View, name: str) -> str | None:
        """Where a request to ``name`` goes when it passes a ``snapshot-access`` node: the
        landing node of its copy-before-write filter's target ("" when the oracle does not
        know it); None when it passes none."""
        node = self._resolve(view, name)
        for _ in range(10):
            g = view.graph.get(node)
            if g is None or g.driver not in FILTERS:
                return None
            if g.driver == "snapshot-access":
                cbw = view.graph.get(g.children.get("file", ""))
                target = cbw.children.get("target") if cbw is not None else None
                return (self._landing(view, target)
                        if target is not None and target in view.graph else "")
            node = g.children[FILTERS[g.driver]]
        return None

    def _snapshot(self, view: View, base: str, overlay: str, add_backing: bool = True) -> None:
        """The overlay goes on top of ``base``: the device now writes into it, and QEMU
        reopens ``base`` read-only as a backing file (storing its persistent bitmaps)."""
        base = self._resolve(view, base)
        if add_backing:
            view.graph[overlay].children["backing"] = base
        below = view.graph[base]
        if not below.read_only:
            if below.image is not None:
                self._store(view, below)
            below.read_only = True
        for dev, node in view.devices.items():
            if node == base:
                view.devices[dev] = overlay

    def _reopen(self, vm: Machine, view: View, opts: dict[str, Any]) -> None:
        gnode = view.graph[str(opts["node-name"])]
        ro = bool(opts.get("read-only", False))
        gnode.unmap = _unmaps(opts)  # an option left out is reset to its default
        for role in ("file", "backing", "image", "target"):
            child = opts.get(role)
            if isinstance(child, str):
                gnode.children[role] = child
            elif isinstance(child, dict):
                gnode.children[role] = self._add_node(vm, view, child)
            elif role in opts and child is None:
                gnode.children.pop(role, None)
        if gnode.image is not None:
            if ro and not gnode.read_only:
                self._store(view, gnode)
            elif not ro and gnode.read_only:
                self._reopen_rw(view, gnode)
        gnode.read_only = ro

    def _reopen_rw(self, view: View, gnode: GraphNode) -> None:
        """Read-write again: the stored bitmaps are flagged in use on disk."""
        gnode.read_only = False
        if gnode.image is not None:
            gnode.image.in_use |= gnode.on_disk
            view.rw_images[gnode.image.path] = gnode.image

    def _close(self, view: View, name: str) -> None:
        gnode = view.graph.pop(name, None)
        if gnode is None:
            return
        if gnode.image is not None and not gnode.read_only:
            self._store(view, gnode)
        view.model.nodes.pop(name, None)
        for dev in [d for d, n in view.devices.items() if n == name]:
            del view.devices[dev]

    def _resize(self, view: View, node: str, size: int) -> None:
        """``block_resize``: the node, its image and its bitmaps take the new size."""
        view.model.resize(node, size)
        gnode = view.graph.get(node)
        if gnode is not None and gnode.image is not None:
            gnode.image.size = size  # its data extents are the model node's, cut already

    def _store(self, view: View, gnode: GraphNode) -> None:
        """A read-write node stores its persistent bitmaps (close, read-only reopen)."""
        assert gnode.image is not None
        mnode = view.model.nodes.get(gnode.name)
        if mnode is None:
            return
        gnode.image.bitmaps = {n: b.copy() for n, b in mnode.bitmaps.items() if b.persistent}
        gnode.image.in_use = gnode.broken & set(gnode.image.bitmaps)
        gnode.on_disk = set(gnode.image.bitmaps)

    def _crashed(self, view: View, gnode: GraphNode) -> None:
        """QEMU died: the image keeps what was stored (stale bits of a bitmap in use are
        harmless: QEMU must load it inconsistent); bitmaps only in RAM are gone. A
        read-only node's image keeps exactly what it had: what QEMU changed in RAM since
        (``block-dirty-bitmap-enable``/``-disable`` are allowed on a read-only bitmap)
        was never written."""
        assert gnode.image is not None
        mnode = view.model.nodes.get(gnode.name)
        if mnode is None or gnode.read_only:
            return
        gnode.image.bitmaps = {n: mnode.bitmaps[n].copy() for n in gnode.on_disk
                               if n in mnode.bitmaps}

    def _default_granularity(self, gnode: GraphNode) -> int:
        """QEMU's default: the cluster size, clamped to 4 KiB..64 KiB (read from the
        image header, not asked from QEMU)."""
        if gnode.image is None:
            return DEFAULT_GRANULARITY
        try:
            cluster = Qcow2Image.open(gnode.image.path).header.cluster_size
        except (OSError, Qcow2FormatError):
            return DEFAULT_GRANULARITY
        return min(max(cluster, 4096), DEFAULT_GRANULARITY)

    # -- jobs ----------------------------------------------------------------------------

    def _job_started(self, vm: Machine, view: View, cmd: str, a: dict[str, Any]) -> None:
        job_id = str(a.get("job-id", a.get("device")))
        source = self._resolve(view, str(a["device"]))
        job = Job(cmd, a, source=source)
        if cmd == "block-commit":
            # QEMU reopens the base read-write for the job (and keeps it so after an
            # active commit, where it becomes the active layer)
            base = view.graph.get(self._commit_layers(view, job)[1])
            if base is not None and base.read_only:
                job.reopened = base.name
                self._reopen_rw(view, base)
        if cmd == "blockdev-backup":
            if "bitmap" in a:
                job.sync = view.model.backup_begin(self._landing(view, source), str(a["bitmap"]))
                job.mode = ("on-success" if a.get("sync") == "incremental"
                            else str(a.get("bitmap-mode", "on-success")))
            if "filter-node-name" in a:
                f = str(a["filter-node-name"])
                job.filter_node = f
                view.graph[f] = GraphNode(f, "copy-before-write", {"file": source}, False)
                for dev, node in view.devices.items():
                    if node == source:
                        view.devices[dev] = f
        view.jobs[job_id] = job

    def _job_ended(self, vm: Machine, view: View, job: Job, succeeded: bool) -> None:
        a = job.args
        if job.kind == "blockdev-backup":
            if job.sync is not None:
                got = None
                if not succeeded and job.mode == "always":
                    got = self._received(vm, view, str(a["target"]))
                view.model.backup_end(job.sync, job.mode, succeeded, got)
            if job.filter_node is not None:
                view.graph.pop(job.filter_node, None)
                for dev, node in view.devices.items():
                    if node == job.filter_node:
                        view.devices[dev] = job.source
        elif job.kind == "block-commit":
            top, base, through = self._commit_layers(view, job)
            above = [n for n, g in view.graph.items() if g.children.get("backing") == top]
            # the job first grows a base smaller than the top (commit_run, mirror_run)
            if view.model.nodes[base].size < view.model.nodes[top].size:
                self._resize(view, base, view.model.nodes[top].size)
            if succeeded:
                view.model.commit(top, base, through)
            if job.reopened is not None and (above or not succeeded):
                # back to read-only after the job, which stores what the commit wrote
                self._reopen(vm, view, {"node-name": base, "read-only": True})
            if not succeeded:
                return
            for n in above:
                view.graph[n].children["backing"] = base
            if not above:
                for dev, node in view.devices.items():
                    if node == top:
                        view.devices[dev] = base
            for n in [top, *through]:
                if view.graph[n].implicit:
                    self._close(view, n)
        elif job.kind == "blockdev-mirror" and succeeded:
            # the target holds the source's data (written there while the job ran: a
            # lower bound for the bitmaps of a target that had them all along). It ends
            # "completed" after job-complete (the device switches to the target) or after
            # a block-job-cancel of a ready job (no switch: a point-in-time copy)
            target = str(a["target"])
            sync = str(a.get("sync"))
            layers = self._chain(view, job.source) if sync == "full" else [job.source]
            for layer in layers:
                for off, length in view.model.nodes[layer].data:
                    self._write(view, target, off, length)
            if not job.pivot:
                return
            for dev, node in view.devices.items():
                if node == job.source:
                    view.devices[dev] = target

    def _commit_layers(self, view: View, job: Job) -> tuple[str, str, list[str]]:
        """(top, base, the layers between) of a ``block-commit``."""
        top = self._resolve(view, str(job.args.get("top-node", job.source)))
        chain = self._chain(view, top)
        base = str(job.args.get("base-node", chain[-1]))
        return top, base, chain[1:chain.index(base)] if base in chain else []

    def _chain(self, view: View, top: str) -> list[str]:
        out = [top]
        while (below := view.graph[out[-1]].children.get("backing")) is not None:
            out.append(below)
        return out

    def _received(self, vm: Machine, view: View, target: str) -> Extents:
        """What a failed backup's target holds: its own allocated extents, read with
        ``qemu-img map`` after a flush (the oracle's own commands, unobserved)."""
        from harness.backup import received

        gnode = view.graph[target]
        vm.execute("human-monitor-command", {"command-line": f'qemu-io {target} "flush"'})
        path = gnode.image.path if gnode.image is not None else self._file_of(view, gnode)
        assert path is not None
        return received(self.img, path, force_share=True)

    # -- writes ------------------------------------------------------------------------------

    def _parse_hmp_io(self, view: View, line: str) -> tuple[str, str]:
        words = shlex.split(line)
        device = len(words) > 2 and words[1] == "-d"
        target = words[2] if device else words[1]
        command = words[-1]
        _parse_io(command)
        return target, command

    def _after_hmp(self, vm: Machine, view: View, line: str, reply: str) -> None:
        if not line.startswith("qemu-io "):
            return
        target, command = self._parse_hmp_io(view, line)
        mark = self._hmp_mark.pop(vm.name, 0)
        with open(vm.log_path, "rb") as f:
            f.seek(mark)
            out = f.read().decode(errors="replace")
        if qemu_io_failures(reply, out):
            # refused (read-only node, permission conflict), or failed with an I/O error:
            # nothing written. QEMU marks the bitmaps of the node a failed request reached
            # (bdrv_co_write_req_finish), but a filter above it (copy-before-write's
            # break-guest-write) fails it before it gets there, and qemu-io's message does
            # not say which: a failed request's range is not required (QEMU may have it)
            return
        for kind, off, length in _parse_io(command):
            self._device_write(view, target, kind, off, length)

    def _after_io_tool(self, args: list[str], output: str) -> None:
        if "-r" in args or not args:
            return
        path = self._path(args[-1])
        image = self.images.get(path)
        if image is None:
            return
        for cmd in _tool_io_commands(args):
            for kind, off, length in _parse_io(cmd):
                if kind == "data":
                    image.data.add(off, length)
                for b in image.bitmaps.values():
                    if b.recording:
                        b.seen.add(off, length)

    def _after_img(self, args: list[str]) -> None:
        sub = args[0]
        if sub == "create":
            pos = [x for i, x in enumerate(args[1:], 1) if not x.startswith("-")
                   and args[i - 1] not in ("-f", "-F", "-b", "-o")]
            path = self._path(pos[0])
            self.images[path] = StoredImage(path, _virtual_size(path))
        elif sub == "convert":
            out = self._path(args[-1])
            copy = self.images[out] = StoredImage(out, _virtual_size(out))
            if "--bitmaps" in args and "--image-opts" not in args:
                source = self.image(args[-2])
                # a bitmap in use on disk is inconsistent: --skip-broken-bitmaps leaves it
                # behind (without it QEMU refuses the whole conversion)
                copy.bitmaps = {n: b.copy() for n, b in source.bitmaps.items()
                                if n not in source.in_use}
                copy.data = source.data.copy()
        elif sub == "bitmap":
            self._img_bitmap(args[1:])

    def _img_bitmap(self, args: list[str]) -> None:
        ops: list[tuple[str, str | None]] = []
        gran: int | None = None
        source_file: str | None = None
        pos: list[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if a in ("--add", "--remove", "--clear", "--enable", "--disable"):
                ops.append((a[2:], None))
            elif a in ("--merge", "-g", "-b", "-f", "-F"):
                if a == "--merge":
                    ops.append(("merge", args[i + 1]))
                elif a == "-g":
                    gran = _size(args[i + 1])
                elif a == "-b":
                    source_file = args[i + 1]
                i += 1
            elif a.startswith("-"):
                pass
            else:
                pos.append(a)
            i += 1
        path, name = self._path(pos[0]), pos[1]
        image = self._image(path)
        for op, src in ops:
            if op == "add":
                self.had_bitmaps = True
                image.bitmaps[name] = ModelBitmap(name, gran or DEFAULT_GRANULARITY,
                                                  recording="--disable" not in args,
                                                  persistent=True)
                return  # --add with --disable is one operation
            if op == "remove":
                image.bitmaps.pop(name, None)
            elif op == "clear":
                image.bitmaps[name].seen = Extents()
            elif op == "enable":
                image.bitmaps[name].recording = True
            elif op == "disable":
                image.bitmaps[name].recording = False
            elif op == "merge" and src is not None:
                other = self._image(self._path(source_file)) if source_file else image
                image.bitmaps[name].seen.update(other.bitmaps[src].required(other.size))

    # -- helpers ---------------------------------------------------------------------------

    def _view(self, vm: Machine) -> View:
        if vm.name not in self.views:
            raise OracleFailure(f"vm {vm.name!r} is not running: the oracle has no view of it")
        return self.views[vm.name]

    def _path(self, p: str | Path) -> Path:
        path = Path(p)
        return (path if path.is_absolute() else self.scratch / path).resolve()

    def _image(self, path: Path) -> StoredImage:
        if path not in self.images:
            self.images[path] = StoredImage(path, _virtual_size(path))
        return self.images[path]


def mark_dirty(model: Model, node: str, offset: int, length: int) -> None:
    """A request that dirties bitmaps without new data (a discard)."""
    for b in model.nodes[node].bitmaps.values():
        if b.recording:
            b.seen.add(offset, length)


def _unmaps(opts: dict[str, Any]) -> bool:
    """Whether ``-blockdev``/``blockdev-add`` options make discards reach the driver."""
    return opts.get("discard") in ("unmap", "on")


def _node_size(vm: Machine, node: str) -> int:
    """A node's size, asked from QEMU (a fact about the node, not about any bitmap)."""
    for entry in vm.execute("query-named-block-nodes").get("return", []):
        if entry.get("node-name") == node:
            return int(entry.get("image", {}).get("virtual-size", 0))
    return 0


def _virtual_size(path: Path) -> int:
    try:
        return Qcow2Image.open(path).header.virtual_size
    except (OSError, Qcow2FormatError):
        return 0


_SUFFIX = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def _size(text: str) -> int:
    """A number as qemu-io and qemu-img read it: decimal or hex, optional k/M/G suffix."""
    t = text.strip()
    mult = 1
    if t and t[-1].lower() in _SUFFIX and not t.lower().startswith("0x"):
        mult = _SUFFIX[t[-1].lower()]
        t = t[:-1]
    return int(t, 0) * mult


def _parse_io(command: str) -> list[tuple[str, int, int]]:
    """What one qemu-io command does to a disk: ``("data"|"dirty", offset, length)``
    items. Reads give none; a command the oracle does not know raises."""
    words = shlex.split(command)
    if not words:
        return []
    name, rest = words[0], words[1:]
    if name in IO_READS:
        return []
    if name in ("write", "aio_write", "w", "writev", "discard", "d", "aio_discard"):
        flags: list[str] = []
        pos: list[str] = []
        i = 0
        while i < len(rest):
            a = rest[i]
            if a in ("-P", "-s", "-i"):
                i += 1
            elif a.startswith("-") and not a[1:2].isdigit():
                flags += list(a[1:])
            else:
                pos.append(a)
            i += 1
        if "b" in flags:
            return []  # vmstate, not the disk
        offset = _size(pos[0])
        length = sum(_size(p) for p in pos[1:]) if name == "writev" else _size(pos[1])
        kind = "dirty" if name in ("discard", "d", "aio_discard") else "data"
        return [(kind, offset, length)]
    raise UnmodelledCommand(f"qemu-io command {command!r} is not modelled by the oracle")


def _tool_io_commands(args: Sequence[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-c"]


def _blockdev_json(text: str) -> dict[str, Any]:
    if text.lstrip().startswith("{"):
        return dict(json.loads(text))
    opts: dict[str, Any] = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        cur = opts
        *parents, leaf = k.split(".")
        for p in parents:
            cur = cur.setdefault(p, {})
        cur[leaf] = {"on": True, "off": False}.get(v, v)
    return opts

