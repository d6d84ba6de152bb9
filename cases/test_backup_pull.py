"""Pull-mode backups, the way libvirt takes them: image fleecing exported over NBD.

In pull mode QEMU copies nothing itself. It keeps a point-in-time view of the disk
(copy-before-write saves old data into a temporary *fleecing* image before the guest
overwrites it), exports that view over NBD together with a disabled dirty bitmap, and a
backup client reads the dirty extents (``qemu-img map`` with ``x-dirty-bitmap``) and then
exactly those extents. Two ways to build the view:

* ``backup-sync-none``: a qcow2 fleecing overlay whose backing is the source, filled by a
  ``blockdev-backup sync=none`` job; it starts in a ``transaction`` with the bitmap
  changes, so bitmap and view share one point in time. The overlay is exported.
* ``cbw-snapshot-access``: a ``copy-before-write`` filter with the fleecing image as its
  target, put between the guest's device and the source with ``qom-set``, and a
  ``snapshot-access`` node on it, which is exported. ``blockdev-add`` and ``qom-set``
  cannot be part of a ``transaction``, so the VM is paused (``stop``) from the filter's
  insertion until the bitmap transaction is done: no guest write may fall between the
  view's point in time and the bitmaps'. (The filter cannot be bypassed by mistake:
  while it has a parent it refuses write to any other user of the source, so the
  ``snapshot-access`` node cannot even be added before the device writes through it.)

The story: a full backup over NBD starts checkpoint c0; an incremental since c0 uses
libvirt's checkpoint pattern (disable c0, add c1, in the fleecing transaction) and is
taken in push mode from the same point too; a differential since c0 exports a disabled
merge of c0 and c1. While each export is up the guest keeps writing: the export must
still equal the reference captured at the fleecing point while the source no longer
does. Each pulled image must hold exactly the bitmap's extents and restore to the
reference; the push-mode image of the same point must hold the same extents. After
tear-down every bitmap is checked by the model, live and on disk.
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.actions import (
    Regions,
    action,
    add_target,
    backup_job,
    bitmap_add,
    del_target,
    guest_writes,
)
from harness.backup import (
    Chain,
    NbdExport,
    Reference,
    compare_export,
    copy_extents,
    copy_whole_export,
    create_target,
    dirty_extents,
    nbd_export_add,
    nbd_export_del,
    nbd_server_start,
    received,
    reference,
    verify_restore,
)
from harness.block import qcow2_node
from harness.errors import OracleFailure
from harness.model import Extents, format_ranges
from harness.session import Case
from harness.vm import VM

SIZE = 4 << 20
GRAN = 64 << 10
NODE = "drive0"
DEVICE = "disk0/virtio-backend"
DISK_QOM = "/machine/peripheral/disk0"
EXPORT = "backup"

# (offset, length) of each phase's writes; several straddle two 64 KiB granules
W0 = ((0, 0x20000), (0x100000, 0x10000), (0x200000, 0x30000), (0x3F0000, 0x10000))
W1 = ((0x8000, 0x10000), (0x100000, 0x1000), (0x2F0000, 0x20000), (0x3FFE00, 0x200))
W2 = ((0x40000, 0x10000), (0x210000, 0x8000))
# while an export is up: over data the view must keep (already copied or not), and over
# clusters the source never had (the view must keep reading zeroes there)
DURING0 = ((0x10000, 0x1000), (0x300000, 0x10000))
DURING1 = ((0x100800, 0x200), (0x180000, 0x10000), (0x8000, 0x200))
DURING2 = ((0x40000, 0x1000), (0x3F0000, 0x1000), (0x210000, 0x200))

METHODS = (
    pytest.param("backup-sync-none", marks=pytest.mark.requires(
        qmp=["nbd-server-start", "transaction"])),
    # a snapshot-access node reaches no bitmap of the source: the export names it by node
    pytest.param("cbw-snapshot-access", marks=pytest.mark.requires(
        qmp=["nbd-server-start", "transaction"],
        drivers=["copy-before-write", "snapshot-access"],
        node_bitmaps=["block-export-add.bitmaps"])),
)


class Fleecing:
    """The point-in-time view of ``NODE`` for backup ``n``, built by ``method``."""

    def __init__(self, qio: Case, vm: VM, method: str, n: int) -> None:
        self.qio, self.vm, self.method, self.n = qio, vm, method, n
        self.image = f"fleece{n}.qcow2"
        self.export: NbdExport | None = None

    @property
    def node(self) -> str:
        """The node the view is exported from."""
        return "fleece" if self.method == "backup-sync-none" else "fl-access"

    def bitmap_ref(self, name: str) -> str | dict[str, str]:
        """A bitmap of the source as the export names it: by name where it is reachable
        from the exported node (the overlay's backing file), else by node and name."""
        return name if self.method == "backup-sync-none" else {"node": NODE, "name": name}

    def begin(self, actions: list[dict[str, Any]],
              jobs: tuple[dict[str, Any], ...] = ()) -> None:
        """Start the view; ``actions`` (bitmap changes) and ``jobs`` (push-mode backups)
        happen at its point.

        The fleecing job goes before the push jobs: a backup job inserts its filter above
        the source and moves the source's parents onto it, except where that would make
        a loop. A push filter inserted first takes the fleecing overlay's backing link;
        the fleecing filter, inserted next, then cannot take the push filter's link to
        the source (a loop through the overlay), and two filters sharing the source
        refuse each other write (QEMU: "Permission conflict on node 'drive0'")."""
        vm = self.vm
        self.qio.img.create(self.image, SIZE)
        path = self.qio.path(self.image)
        if self.method == "backup-sync-none":
            vm.qmp_log("blockdev-add", qcow2_node(path, "fleece", backing=NODE))
            vm.qmp_log("transaction", actions=[
                *actions,
                action("blockdev-backup", job_id="fleecing", device=NODE, target="fleece",
                       sync="none"),
                *jobs,
            ])
            return
        vm.qmp_log("blockdev-add", qcow2_node(path, "fleece", backing=None))
        vm.qmp_log("stop")
        vm.qmp_log("blockdev-add", driver="copy-before-write", node_name="fl-cbw", file=NODE,
                   target="fleece")
        vm.qmp_log("qom-set", path=DISK_QOM, property="drive", value="fl-cbw")
        if actions or jobs:
            vm.qmp_log("transaction", actions=[*actions, *jobs])
        vm.qmp_log("cont")
        vm.qmp_log("blockdev-add", driver="snapshot-access", node_name="fl-access",
                   file="fl-cbw")

    def publish(self, bitmap: str | None = None) -> NbdExport:
        """Start the VM's NBD server in its socket dir and export the view (with a bitmap)."""
        socket = self.vm.socket_path.parent / "backup.nbd"
        nbd_server_start(self.vm, socket)
        self.export = nbd_export_add(self.vm, self.node, EXPORT, socket,
                                     None if bitmap is None else self.bitmap_ref(bitmap))
        return self.export

    def end(self) -> None:
        """Tear down: export, NBD server, the view's nodes."""
        vm = self.vm
        if self.export is not None:
            nbd_export_del(vm, self.export)
            vm.qmp_log("nbd-server-stop")
            self.export = None
        if self.method == "backup-sync-none":
            vm.qmp_log("job-cancel", id="fleecing")
            vm.run_job("fleecing")
        else:
            vm.qmp_log("blockdev-del", node_name="fl-access")
            vm.qmp_log("qom-set", path=DISK_QOM, property="drive", value=NODE)
            vm.qmp_log("blockdev-del", node_name="fl-cbw")
        vm.qmp_log("blockdev-del", node_name="fleece")


def guest_writes_during(qio: Case, vm: VM, export: NbdExport, ref: Reference,
                        regions: Regions, pattern: int) -> None:
    """The guest writes while the view is exported; the source changes, the view not."""
    guest_writes(vm, regions, pattern)
    vm.qemu_io(DEVICE, "flush", device=True)
    res = qio.img.run("compare", "-U", "src.qcow2", ref.image, check=False)
    assert res.status == 1, (f"the writes during the export left the source equal to "
                             f"reference {ref.n}: they prove nothing")
    qio.log.log(f"the source now differs from reference {ref.n}: {res.stdout.strip()}")
    cmp = compare_export(qio, export, ref)
    if not cmp.identical:
        raise OracleFailure(f"export {export.name!r} changed under guest writes: it differs "
                            f"from reference {ref.n} at offset {cmp.first_offset:#x}")
    qio.log.log(f"export {export.name!r}: identical to reference {ref.n}")


def pull_incremental(qio: Case, vm: VM, export: NbdExport, bitmap: str, image: str,
                     backing: str) -> Extents:
    """What a backup client does: map the bitmap over NBD, copy only its extents. What
    it read must be exactly the model's bitmap (rounded to its granularity)."""
    extents = dirty_extents(qio.img, export, bitmap)
    qio.log.log(f"NBD client: qemu:dirty-bitmap:{bitmap} dirty {format_ranges(extents)}")
    qio.oracle.check_ranges(vm, NODE, bitmap, extents, f"exported {bitmap}")
    create_target(qio.img, image, SIZE, backing=backing)
    copy_extents(qio, export, extents, image)
    held = received(qio.img, image)
    assert held == extents, (f"{image} holds {format_ranges(held)}, not the dirty extents "
                             f"{format_ranges(extents)}")
    qio.log.log(f"{image} holds exactly the dirty extents")
    return extents


@pytest.mark.parametrize("method", METHODS)
def test_pull_backups(qio: Case, method: str) -> None:
    vm = qio.vm_on("src.qcow2", NODE, create=SIZE, device=True, launch=True)
    qio.log.heading("guest writes")
    guest_writes(vm, W0, 0x11)

    qio.log.heading(f"backup 0 (full) over NBD; checkpoint c0 starts at its point ({method})")
    ref0 = reference(qio, vm, NODE, "src.qcow2", 0)
    view = Fleecing(qio, vm, method, 0)
    view.begin([bitmap_add(NODE, "c0", GRAN, persistent=True)])
    export = view.publish()
    guest_writes_during(qio, vm, export, ref0, DURING0, 0x12)
    copy_whole_export(qio, export, "full.qcow2")
    view.end()
    full = Chain(("full.qcow2",))
    verify_restore(qio, full, ref0, "backup-0")
    qio.show_bitmaps(vm, NODE)
    qio.check_live(vm, NODE, where="after backup 0")

    qio.log.heading("guest writes, tracked by c0")
    guest_writes(vm, W1, 0x22)

    qio.log.heading("backup 1 since c0: disable c0 and add c1 at the fleecing point; a "
                    "push-mode backup from c0 in the same transaction")
    ref1 = reference(qio, vm, NODE, "src.qcow2", 1)
    add_target(qio, vm, "push1.qcow2", SIZE, backing="full.qcow2")
    view = Fleecing(qio, vm, method, 1)
    view.begin([
        action("block-dirty-bitmap-disable", node=NODE, name="c0"),
        bitmap_add(NODE, "c1", GRAN, persistent=True),
    ], jobs=(action("blockdev-backup", **backup_job("push1", NODE, "push1", sync="bitmap",
                                                    bitmap="c0", bitmap_mode="never")),))
    assert vm.run_job("push1") is None
    del_target(vm, "push1.qcow2")
    export = view.publish("c0")
    guest_writes_during(qio, vm, export, ref1, DURING1, 0x33)
    pulled = pull_incremental(qio, vm, export, "c0", "inc1.qcow2", full.top)
    view.end()
    verify_restore(qio, full.then("inc1.qcow2"), ref1, "backup-1-pull")
    verify_restore(qio, full.then("push1.qcow2"), ref1, "backup-1-push")
    pushed = received(qio.img, "push1.qcow2")
    assert pushed == pulled, (f"push mode copied {format_ranges(pushed)}, pull mode "
                              f"{format_ranges(pulled)}")
    qio.log.log("push1.qcow2 holds the same extents as inc1.qcow2")
    qio.show_bitmaps(vm, NODE)
    qio.check_live(vm, NODE, where="after backup 1")

    qio.log.heading("guest writes, tracked by c1")
    guest_writes(vm, W2, 0x44)

    qio.log.heading("backup 2, a differential since c0: c0 and c1 merged into a disabled "
                    "bitmap at the fleecing point")
    ref2 = reference(qio, vm, NODE, "src.qcow2", 2)
    view = Fleecing(qio, vm, method, 2)
    view.begin([
        bitmap_add(NODE, "since-c0", GRAN, disabled=True),
        action("block-dirty-bitmap-merge", node=NODE, target="since-c0", bitmaps=["c0", "c1"]),
    ])
    export = view.publish("since-c0")
    guest_writes_during(qio, vm, export, ref2, DURING2, 0x55)
    pull_incremental(qio, vm, export, "since-c0", "diff2.qcow2", full.top)
    view.end()
    vm.qmp_log("block-dirty-bitmap-remove", node=NODE, name="since-c0")
    verify_restore(qio, full.then("diff2.qcow2"), ref2, "backup-2")
    qio.show_bitmaps(vm, NODE)
    qio.check_live(vm, NODE, where="after backup 2")

    qio.log.heading("shutdown: the checkpoints are stored")
    vm.shutdown()
    qio.show_image_bitmaps("src.qcow2")
    qio.check_disk("src.qcow2")


@pytest.mark.requires(qmp=["nbd-server-start", "block-export-add"])
def test_enabled_bitmap_not_exported(qio: Case) -> None:
    """A read-only export refuses a bitmap that still records (its bits would change
    under the client); that is why the exported bitmap is a disabled one."""
    vm = qio.vm_on("src.qcow2", NODE, create=SIZE, device=True, launch=True)
    vm.qmp_log("block-dirty-bitmap-add", node=NODE, name="c0", granularity=GRAN)
    socket = vm.socket_path.parent / "backup.nbd"
    nbd_server_start(vm, socket)
    vm.qmp_log("block-export-add", type="nbd", id=EXPORT, name=EXPORT, node_name=NODE,
               bitmaps=["c0"], expect_error="incompatible with readonly export")
    vm.qmp_log("nbd-server-stop")
    vm.shutdown()
