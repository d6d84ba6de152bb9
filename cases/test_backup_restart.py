"""A backup chain through the seed scenario: snapshot, active commit, restart, crash.

The reference bug leaves a persistent bitmap that loads as valid but misses writes; the
only proof that a bitmap is good enough is an incremental backup built from it that
restores to the disk as it was. So a chain of backups is taken at every stage of the seed
scenario (test_255), each restored (``qemu-img convert`` of the chain) and compared with
the source captured when it started:

0. a full backup, with the persistent bitmap ``b0`` on ``base`` added in its transaction;
1. an incremental from ``b0`` before the snapshot;
2. during the external snapshot ``base <- top``: guest writes go to ``top``, ``base/b0``
   holds what changed in ``base`` before the snapshot, and ``top/b0`` (added in the
   snapshot's transaction) what changed since. The device's incremental is both merged
   (``block-dirty-bitmap-merge`` with a ``{node, name}`` source) into a temporary bitmap
   on ``top``; ``top/b0`` is cleared in the same transaction. ``base/b0`` cannot be
   cleared (a bitmap of a read-only node is read-only), so its bits stay;
3. after the active commit of ``top`` into ``base``: the commit wrote ``top``'s data into
   ``base``, so ``base/b0`` covers every write since backup 2 (and the stale bits of step
   2, which cost size, not correctness), and the incremental is taken from it;
4. after a restart (``clean-restart``): ``b0`` is stored at shutdown and loaded again,
   the next incremental must restore too. With ``sigkill`` QEMU is killed instead: ``b0``
   was in use, it comes back inconsistent, an incremental from it must be refused, and
   the backup client falls back to a new full backup (and a new ``b0``), after which the
   next incremental restores again.

The model checks every bitmap before and after each backup (exactly: after a backup it
knows every bit), live and on disk.
"""

from __future__ import annotations

import pytest

from harness.actions import (
    action,
    add_target,
    backup_job,
    bitmap_add,
    del_target,
    full_backup,
    guest_writes,
    incremental_backup,
)
from harness.backup import Chain, reference, verify_restore
from harness.bitmaps import live_bitmap
from harness.block import qcow2_node
from harness.session import Case
from harness.vm import VM

SIZE = 4 << 20
GRAN = 64 << 10
DEVICE = "disk0/virtio-backend"

# (offset, length) of each phase's writes; several straddle two 64 KiB granules
W0 = ((0, 0x20000), (0x100000, 0x10000), (0x300000, 0x20000), (0x3F0000, 0x10000))
W1 = ((0x8000, 0x1000), (0x1F8000, 0x10000))
W2 = ((0x40000, 0x10000), (0x3FF000, 0x1000))   # base after backup 1: only base/b0 knows
W3 = ((0x100000, 0x800), (0x280000, 0x20000))   # top, before backup 2
W4 = ((0x20000, 0x10000),)                      # top, after backup 2
DURING_COMMIT = ((0x200000, 0x10000), (0x3FFE00, 0x200))
W5 = ((0x60000, 0x10000), (0x380000, 0x8000))   # base after backup 3, before the restart
W6 = ((0x0, 0x200), (0x240000, 0x10000))        # after the restart

ENDINGS = ("clean-restart", "sigkill")


def full(qio: Case, vm: VM, n: int, node: str, image: str) -> Chain:
    """A new persistent ``b0`` and a full backup in one transaction; restored at once."""
    return full_backup(qio, vm, node, f"{node}.qcow2", SIZE, n, image,
                       [bitmap_add(node, "b0", GRAN, persistent=True)])


def incremental(qio: Case, vm: VM, n: int, node: str, chain: Chain) -> Chain:
    """``sync=incremental`` from ``node``'s ``b0`` onto the chain, checked exactly before
    and after; restored at once."""
    qio.oracle.check_exact(vm, node, ["b0"], f"before backup {n}")
    return incremental_backup(qio, vm, node, f"{node}.qcow2", SIZE, n, chain)


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.requires(qmp=["blockdev-backup", "blockdev-snapshot", "block-dirty-bitmap-merge",
                           "transaction"],
                      # base/b0 joins an incremental of top as a {node, name} merge source
                      node_bitmaps=["block-dirty-bitmap-merge.bitmaps"])
def test_backup_chain(qio: Case, ending: str) -> None:
    # base.qcow2 under a virtio-blk device: the VM before the snapshot and after the commit
    # (the same command line restarts it)
    vm = qio.vm_on("base.qcow2", "base", create=SIZE, device=True, launch=True)

    qio.log.heading("backup 0: full, with the persistent bitmap base/b0 in its transaction")
    guest_writes(vm, W0, 0x11)
    chain = full(qio, vm, 0, "base", "full.qcow2")

    qio.log.heading("backup 1 before the snapshot: incremental from base/b0")
    guest_writes(vm, W1, 0x22)
    chain = incremental(qio, vm, 1, "base", chain)

    qio.log.heading("writes into base, then the snapshot base <- top with top/b0 in its "
                    "transaction")
    guest_writes(vm, W2, 0x33)
    qio.img.create("top.qcow2", SIZE, backing="base.qcow2")
    vm.qmp_log("blockdev-add", qcow2_node(qio.path("top.qcow2"), "top",
                                                               backing=None))
    vm.qmp_log("transaction", actions=[
        bitmap_add("top", "b0", GRAN, persistent=True),
        action("blockdev-snapshot", node="base", overlay="top"),
    ])
    guest_writes(vm, W3, 0x44)
    qio.show_bitmaps(vm, "base")
    qio.show_bitmaps(vm, "top")
    qio.oracle.check_exact(vm, "base", ["b0"], "before backup 2")
    qio.oracle.check_exact(vm, "top", ["b0"], "before backup 2")

    qio.log.heading("backup 2 during the snapshot: the device's changes are base/b0 and "
                    "top/b0 merged; top/b0 cleared in the same transaction")
    ref = reference(qio, vm, "top", "top.qcow2", 2)
    target = add_target(qio, vm, "inc2.qcow2", SIZE, chain.top)
    vm.qmp_log("transaction", actions=[
        bitmap_add("top", "merged", GRAN, disabled=True),
        action("block-dirty-bitmap-merge", node="top", target="merged",
               bitmaps=[{"node": "base", "name": "b0"}, "b0"]),
        action("block-dirty-bitmap-clear", node="top", name="b0"),
        action("blockdev-backup", **backup_job("backup2", "top", target, sync="bitmap",
                                               bitmap="merged", bitmap_mode="never")),
    ])
    assert vm.run_job("backup2") is None
    del_target(vm, "inc2.qcow2")
    qio.oracle.check_exact(vm, "top", ["b0", "merged"], "after backup 2")
    vm.qmp_log("block-dirty-bitmap-remove", node="top", name="merged")
    chain = chain.then("inc2.qcow2")
    verify_restore(qio, chain, ref, "backup-2")
    vm.qmp_log("block-dirty-bitmap-clear", node="base", name="b0", expect_error="readonly")
    qio.oracle.check_exact(vm, "base", ["b0"], "after backup 2, base/b0 kept")

    qio.log.heading("writes into top; active commit of top into base, writes while it runs")
    guest_writes(vm, W4, 0x55)
    vm.qmp_log("block-commit", job_id="commit0", device="top", base_node="base")
    assert vm.run_job("commit0", complete=True,
                      on_ready=lambda: guest_writes(vm, DURING_COMMIT, 0x66)) is None
    vm.qmp_log("blockdev-del", node_name="top")
    qio.show_bitmaps(vm, "base")

    qio.log.heading("backup 3 after the commit: incremental from base/b0")
    chain = incremental(qio, vm, 3, "base", chain)
    guest_writes(vm, W5, 0x77)
    vm.qemu_io(DEVICE, "flush", device=True, log=True)

    if ending == "clean-restart":
        qio.log.heading("restart: b0 is stored at shutdown and loaded again")
        vm.shutdown()
        qio.show_image_bitmaps("base.qcow2")
        qio.check_disk("base.qcow2")
        vm.launch()
        qio.show_bitmaps(vm, "base")
        qio.check_live(vm, "base", where="after the restart")

        qio.log.heading("backup 4 after the restart: incremental from base/b0")
        guest_writes(vm, W6, 0x88)
        incremental(qio, vm, 4, "base", chain)
    else:
        qio.log.heading("SIGKILL: b0 was in use")
        status = vm.kill()
        assert status is not None and status < 0, f"QEMU exited with {status} after SIGKILL"
        qio.log.log(f"SIGKILL {vm.name}")
        (stored,) = qio.show_image_bitmaps("base.qcow2")
        assert stored.in_use, "b0 open read-write at the kill lost its in-use flag"
        qio.check_disk("base.qcow2", where="after the kill")
        vm.launch()
        qio.show_bitmaps(vm, "base", hashes=False)
        qio.check_live(vm, "base", where="after the kill")

        qio.log.heading("backup 4: b0 is inconsistent; an incremental is refused, so a "
                        "new full backup with a new b0")
        assert live_bitmap(vm, "base", "b0").inconsistent, "b0 loaded as valid after SIGKILL"
        target = add_target(qio, vm, "inc4.qcow2", SIZE, chain.top)
        vm.qmp_log("blockdev-backup", backup_job("backup4", "base", target, sync="incremental",
                                                 bitmap="b0"), expect_error="inconsistent")
        del_target(vm, "inc4.qcow2")
        vm.qmp_log("block-dirty-bitmap-remove", node="base", name="b0")
        chain = full(qio, vm, 4, "base", "full4.qcow2")

        qio.log.heading("backup 5: incremental from the new b0 onto the new full backup")
        guest_writes(vm, W6, 0x88)
        incremental(qio, vm, 5, "base", chain)
    vm.shutdown()
    qio.check_disk("base.qcow2")
