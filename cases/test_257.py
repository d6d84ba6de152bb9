"""Push-mode incremental backups (``blockdev-backup``) that must restore to the right data.

Upstream's iotest 257 checks bitmap counts after each ``bitmap-mode`` and outcome. Here
every successful backup is also restored (the chain full <- inc1 <- ... flattened with
``qemu-img convert``) and compared with the source as it was when that backup started,
and the bitmap left behind is checked exactly against the model (harness/model.py,
``backup_begin``/``backup_end``): a bit the mode should have kept and QEMU dropped fails,
and so does a bit it should have cleared and QEMU kept.

The matrix: ``sync=incremental`` and ``sync=bitmap`` with ``bitmap-mode`` ``on-success``,
``always``, ``never``; each run to success, cancelled, failed by EIO on the target and
failed by EIO on the source. A second backup after each then proves the bitmap and the
kept images still make a complete chain (for ``always``, the partial first backup stays
in it; for the others a failed first backup is thrown away). Then bitmap management in
``transaction``: incremental + differential backups from one point in time, libvirt-style
checkpoints (disable/add/merge, a rollback), and bitmaps merged across an external
snapshot chain.

Every backup job is started with ``auto-dismiss: false`` so its error can be read from
``query-jobs`` before it disappears (with auto-dismiss QEMU removes a failed job before
the harness can ask, and the error would read as success).
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.actions import (
    action,
    add_target,
    backup_job,
    bitmap_add,
    del_target,
    full_backup,
    writes,
)
from harness.backup import (
    Chain,
    completed_job_size,
    expect_incomplete,
    failed_job_progress,
    host_offset,
    reference,
    verify_restore,
)
from harness.block import qcow2_node
from harness.errors import MachineExitError
from harness.session import Case
from harness.vm import VM

SIZE = 4 << 20
GRAN = 64 << 10
NODE = "drive0"

# (offset, length) of each phase's writes; several straddle two 64 KiB granules
W0 = ((0, 0x10000), (0x100000, 0x20000), (0x2F8000, 0x10000), (0x3F0000, 0x10000))
W1 = ((0, 0x1000), (0xF8000, 0x10000), (0x208000, 0x10000), (0x3E0000, 0x10000))
# during backup 1: into cluster 0 (the throttled job copies it first, then sleeps), into
# 0x200000 (dirty, not yet copied: copy-before-write must save the old data first) and
# into 0x300000-0x320000 (not dirty: nothing to save, only the new bits)
DURING = ((0x800, 0x200), (0x20C000, 0x200), (0x300000, 0x18000))
W2 = ((0x10000, 0x30000), (0xE8000, 0x10000), (0x3FFE00, 0x200))
W3 = ((0x80000, 0x10000), (0x1FF000, 0x2000))
W4 = ((0x380000, 0x800), (0x0, 0x200))

# speed 1 B/s lets block-copy start exactly one chunk (the first dirty run, cluster 0)
# and then sleep for hours; set-speed 0 or job-cancel wakes it. So what is copied before
# the writes made during the job is the same on every run.
CRAWL = 1

MODES: dict[str, dict[str, str]] = {
    "incremental": {"sync": "incremental"},
    "on-success": {"sync": "bitmap", "bitmap-mode": "on-success"},
    "always": {"sync": "bitmap", "bitmap-mode": "always"},
    "never": {"sync": "bitmap", "bitmap-mode": "never"},
}
OUTCOMES = ("success", "cancel", "target-eio", "source-eio")

# A fresh 4 MiB qcow2 target keeps header, refcount table, refcount block and L1 in its
# first four clusters; the first allocating write adds the L2 table at 0x40000 and data
# from 0x50000. Host cluster 0x60000 is therefore the first or second data cluster the
# job writes, whichever guest cluster that is (parallel copies land in any order).
TARGET_EIO = {"event": "pwritev", "iotype": "write", "errno": 5, "once": True,
              "sector": 0x60000 // 512}
# the source fault hits the second half of W1's straddling write: a dirty cluster
SOURCE_EIO_AT = 0x210000


# -- set-up and steps -------------------------------------------------------------------


def target(qio: Case, vm: VM, image: str, backing: str | None = None,
           inject: tuple[dict[str, Any], ...] = ()) -> str:
    return add_target(qio, vm, image, SIZE, backing, inject)


def take_full(qio: Case, vm: VM, bitmaps: tuple[str, ...], image: str = "full.qcow2",
         device: str = NODE, source: str = "src.qcow2", n: int = 0,
         before: tuple[dict[str, Any], ...] = ()) -> Chain:
    """``before`` actions, new bitmaps and a full backup in one transaction."""
    return full_backup(qio, vm, device, source, SIZE, n, image,
                       [bitmap_add(device, b, GRAN) for b in bitmaps], before)


def insert_source_fault(qio: Case, vm: VM) -> None:
    """blkdebug under the source qcow2 node (between it and its file node ``file0``): the
    next read of one dirty cluster fails."""
    vm.qemu_io(NODE, "flush")
    host = host_offset(qio.img, "src.qcow2", SOURCE_EIO_AT)
    qio.log.log(f"source: guest cluster {SOURCE_EIO_AT:#x} is at {host:#x} in src.qcow2")
    rule = {"event": "read_aio", "iotype": "read", "errno": 5, "once": True,
            "sector": host // 512}
    vm.qmp_log("blockdev-add", driver="blkdebug", image="file0", node_name="dbg",
               inject_error=[rule])
    vm.blockdev_reopen({"driver": "qcow2", "node-name": NODE, "file": "dbg"})


def remove_source_fault(vm: VM) -> None:
    vm.blockdev_reopen({"driver": "qcow2", "node-name": NODE, "file": "file0"})
    vm.qmp_log("blockdev-del", node_name="dbg")


# -- the bitmap-mode x outcome matrix ---------------------------------------------------


@pytest.mark.parametrize("mode,outcome", [
    pytest.param(m, o, id=f"{m}-{o}") for m in MODES for o in OUTCOMES
])
def test_bitmap_sync(qio: Case, mode: str, outcome: str) -> None:
    vm = qio.vm_on("src.qcow2", NODE, create=SIZE, file_node="file0", launch=True)
    qio.log.heading("writes, then bitmap b0 and a full backup in one transaction")
    writes(vm, NODE, W0, 0x11)
    full = take_full(qio, vm, ("b0",))

    qio.log.heading("writes after the full backup: b0 tracks them")
    writes(vm, NODE, W1, 0x22)
    qio.oracle.check_exact(vm, NODE, ["b0"], "before backup 1")

    qio.log.heading(f"backup 1: {' '.join(f'{k}={v}' for k, v in MODES[mode].items())}, "
                    f"outcome {outcome}")
    ref1 = reference(qio, vm, NODE, "src.qcow2", 1)
    throttled = outcome in ("success", "cancel")
    if outcome == "target-eio":
        # which guest cluster the failing host cluster holds changes from run to run, so
        # how far the job got does too; under "always" so does what backup 2 must copy
        qio.log.add_filter(failed_job_progress)
        if mode == "always":
            qio.log.add_filter(completed_job_size("backup2"))
    target(qio, vm, "inc1.qcow2", backing="full.qcow2",
               inject=(TARGET_EIO,) if outcome == "target-eio" else ())
    if outcome == "source-eio":
        insert_source_fault(qio, vm)
    extra: dict[str, Any] = {"speed": CRAWL, "filter-node-name": "cbw1"} if throttled else {}
    vm.qmp_log("blockdev-backup", backup_job("backup1", NODE, "inc1", bitmap="b0",
                                             **MODES[mode], **extra))
    if throttled:
        writes(vm, "cbw1", DURING, 0x33)
        if outcome == "success":
            vm.qmp_log("block-job-set-speed", device="backup1", speed=0)
        else:
            vm.qmp_log("job-cancel", id="backup1")
    error = vm.run_job("backup1")
    del_target(vm, "inc1.qcow2")
    if outcome == "source-eio":
        remove_source_fault(vm)
    expected_error = {"success": None, "cancel": "Operation canceled"}.get(
        outcome, "Input/output error")
    assert error == expected_error, f"backup1 ended with {error!r}"

    succeeded = outcome == "success"
    if mode == "always" and outcome == "target-eio":
        qio.oracle.ranges_vary(vm, NODE, "b0", "the bits inc1.qcow2 did not receive; "
                               "which ones depends on copy order")
    else:
        qio.show_bitmaps(vm, NODE)
    qio.oracle.check_exact(vm, NODE, ["b0"], "after backup 1")
    chain = full.then("inc1.qcow2", partial=not succeeded)
    if succeeded:
        verify_restore(qio, chain, ref1, "backup-1")
    else:
        expect_incomplete(qio, chain, ref1, "backup-1")

    # what backup 2 builds on: "never" keeps every bit since the full backup, so each of
    # its backups is a differential over the full one; "always" cleared what inc1 got,
    # so inc1 must stay even when partial; otherwise a failed inc1 is thrown away
    keep_inc1 = mode != "never" and (succeeded or mode == "always")
    base = chain if keep_inc1 else full
    qio.log.heading(f"writes, then backup 2 (same mode) onto {base.describe()}")
    writes(vm, NODE, W2, 0x44)
    ref2 = reference(qio, vm, NODE, "src.qcow2", 2)
    target(qio, vm, "inc2.qcow2", backing=base.top)
    vm.qmp_log("blockdev-backup", backup_job("backup2", NODE, "inc2", bitmap="b0", **MODES[mode]))
    assert vm.run_job("backup2") is None
    del_target(vm, "inc2.qcow2")
    qio.show_bitmaps(vm, NODE)
    qio.oracle.check_exact(vm, NODE, ["b0"], "after backup 2")
    verify_restore(qio, base.then("inc2.qcow2"), ref2, "backup-2")
    vm.shutdown()


# -- bitmap management in transactions ----------------------------------------------------


@pytest.mark.quick
@pytest.mark.xfail(raises=MachineExitError, strict=False,
                   reason="QEMU bug seen in 10.2.2 (11 of 20 runs), not in 10.0.x or 7.2.22: "
                   "the first backup of the transaction ends while the second completes, "
                   "bdrv_drop_filter aborts (block.c:5423 Assertion 'from->quiesce_counter' "
                   "failed); reduced in test_backup_drain.py")
def test_incremental_and_differential(qio: Case) -> None:
    """Two bitmaps from the full backup on: ``inc`` is cleared by each incremental,
    ``diff`` never; each differential copies ``diff`` into a temporary bitmap in the
    same transaction, so it holds every change since the full backup. Both backups of
    a round start at one point in time. Then a new full backup clears both bitmaps in
    its own transaction, and the next differential builds on it."""
    vm = qio.vm_on("src.qcow2", NODE, create=SIZE, file_node="file0", launch=True)
    qio.log.heading("writes, then bitmaps inc and diff and a full backup in one transaction")
    writes(vm, NODE, W0, 0x11)
    full = take_full(qio, vm, ("inc", "diff"))
    incs = full
    for n, regions, pattern in ((1, W1, 0x22), (2, W2, 0x33)):
        qio.log.heading(f"writes, then backup {n}: incremental from inc, differential "
                        "from a copy of diff, one transaction")
        writes(vm, NODE, regions, pattern)
        ref = reference(qio, vm, NODE, "src.qcow2", n)
        target(qio, vm, f"inc{n}.qcow2", backing=incs.top)
        target(qio, vm, f"diff{n}.qcow2", backing=full.top)
        vm.qmp_log("transaction", actions=[
            bitmap_add(NODE, "merged", GRAN, disabled=True),
            action("block-dirty-bitmap-merge", node=NODE, target="merged", bitmaps=["diff"]),
            action("blockdev-backup", **backup_job(f"inc{n}", NODE, f"inc{n}", sync="incremental",
                                                    bitmap="inc")),
            action("blockdev-backup", **backup_job(f"diff{n}", NODE, f"diff{n}", sync="bitmap",
                                                    bitmap="merged", bitmap_mode="never")),
        ])
        assert vm.run_job(f"inc{n}") is None
        assert vm.run_job(f"diff{n}") is None
        qio.oracle.check_exact(vm, NODE, ["diff", "inc", "merged"], f"after backup {n}")
        vm.qmp_log("block-dirty-bitmap-remove", node=NODE, name="merged")
        for image in (f"inc{n}.qcow2", f"diff{n}.qcow2"):
            del_target(vm, image)
        incs = incs.then(f"inc{n}.qcow2")
        verify_restore(qio, incs, ref, f"backup-{n}-incremental")
        verify_restore(qio, full.then(f"diff{n}.qcow2"), ref, f"backup-{n}-differential")
        qio.show_bitmaps(vm, NODE)

    qio.log.heading("backup 3: a new full backup; inc and diff cleared in its transaction")
    full3 = take_full(qio, vm, (), image="full3.qcow2", n=3, before=(
        action("block-dirty-bitmap-clear", node=NODE, name="inc"),
        action("block-dirty-bitmap-clear", node=NODE, name="diff"),
    ))
    qio.log.heading("writes after the new full backup: both bitmaps start from it")
    writes(vm, NODE, W3, 0x44)
    qio.oracle.check_exact(vm, NODE, ["diff", "inc"], "after writes on the new base")

    qio.log.heading("backup 4: a differential onto the new full backup")
    ref = reference(qio, vm, NODE, "src.qcow2", 4)
    target(qio, vm, "diff4.qcow2", backing=full3.top)
    vm.qmp_log("blockdev-backup", backup_job("diff4", NODE, "diff4", sync="bitmap",
                                             bitmap="diff", bitmap_mode="never"))
    assert vm.run_job("diff4") is None
    del_target(vm, "diff4.qcow2")
    qio.oracle.check_exact(vm, NODE, ["diff", "inc"], "after backup 4")
    verify_restore(qio, full3.then("diff4.qcow2"), ref, "backup-4")
    vm.shutdown()


def checkpoint_backup(qio: Case, vm: VM, n: int, image: str, sources: list[str],
                      before: tuple[dict[str, Any], ...] = ()) -> None:
    """One transaction: ``before`` actions, a temporary bitmap merged from the checkpoint
    bitmaps ``sources``, and a backup from it onto the full backup. Then restored."""
    ref = reference(qio, vm, NODE, "src.qcow2", n)
    target(qio, vm, image, backing="full.qcow2")
    node = image.removesuffix(".qcow2")
    vm.qmp_log("transaction", actions=[
        *before,
        bitmap_add(NODE, "merged", GRAN, disabled=True),
        action("block-dirty-bitmap-merge", node=NODE, target="merged", bitmaps=sources),
        action("blockdev-backup", **backup_job(f"backup{n}", NODE, node, sync="bitmap",
                                                bitmap="merged", bitmap_mode="never")),
    ])
    assert vm.run_job(f"backup{n}") is None
    del_target(vm, image)
    qio.oracle.check_exact(vm, NODE, ["merged"], f"after backup {n}")
    vm.qmp_log("block-dirty-bitmap-remove", node=NODE, name="merged")
    verify_restore(qio, Chain(("full.qcow2", image)), ref, f"backup-{n}")


def test_checkpoints(qio: Case) -> None:
    """libvirt-style checkpoints: each backup disables the current bitmap and adds the
    next one in its transaction; "since checkpoint K" is a merge of the bitmaps from K
    on. A transaction that fails must roll back the clear and enable before it."""
    vm = qio.vm_on("src.qcow2", NODE, create=SIZE, file_node="file0", launch=True)
    qio.log.heading("writes, then checkpoint c0 with the full backup")
    writes(vm, NODE, W0, 0x11)
    take_full(qio, vm, ("c0",))

    qio.log.heading("writes; backup 1 since c0: disable c0, add c1, back up a copy of c0")
    writes(vm, NODE, W1, 0x22)

    checkpoint_backup(qio, vm, 1, "inc1.qcow2", ["c0"], before=(
        action("block-dirty-bitmap-disable", node=NODE, name="c0"),
        bitmap_add(NODE, "c1", GRAN),
    ))

    qio.log.heading("writes reach c1 only (c0 is disabled)")
    writes(vm, NODE, W2, 0x33)
    qio.show_bitmaps(vm, NODE)
    qio.oracle.check_exact(vm, NODE, ["c0", "c1"], "after backup 1")

    qio.log.heading("backup 2: everything since the full backup, c0 and c1 merged")
    checkpoint_backup(qio, vm, 2, "diff2.qcow2", ["c0", "c1"])

    qio.log.heading("a failing transaction: clear c1 and enable c0 are rolled back")
    vm.qmp_log("transaction", actions=[
        action("block-dirty-bitmap-clear", node=NODE, name="c1"),
        action("block-dirty-bitmap-enable", node=NODE, name="c0"),
        bitmap_add(NODE, "c1", GRAN),
    ], expect_error="already exists")
    qio.show_bitmaps(vm, NODE)
    writes(vm, NODE, W3, 0x44)
    qio.oracle.check_exact(vm, NODE, ["c0", "c1"], "after the rollback")

    qio.log.heading("delete checkpoint c1: merge it into c0, enable c0, clear c1")
    vm.qmp_log("transaction", actions=[
        action("block-dirty-bitmap-merge", node=NODE, target="c0", bitmaps=["c1"]),
        action("block-dirty-bitmap-enable", node=NODE, name="c0"),
        action("block-dirty-bitmap-clear", node=NODE, name="c1"),
    ])
    writes(vm, NODE, W4, 0x55)
    qio.show_bitmaps(vm, NODE)
    qio.oracle.check_exact(vm, NODE, ["c0", "c1"], "after deleting c1")

    qio.log.heading("backup 3 since the full backup, from c0 alone")
    checkpoint_backup(qio, vm, 3, "diff3.qcow2", ["c0"])
    vm.shutdown()


# -- bitmaps across an external snapshot chain -------------------------------------------


@pytest.mark.requires(node_bitmaps=["block-dirty-bitmap-merge.bitmaps"])
def test_merge_across_snapshots(qio: Case) -> None:
    """b0 on base from the full backup on; each external snapshot adds the next bitmap on
    the new overlay in the same transaction, so no write falls between two bitmaps.
    "Everything since the full backup" is then base/b0 + mid/b1 + top/b2 merged into a
    bitmap on the active node, and a backup of the active node from it restores."""
    vm = qio.vm_on("base.qcow2", "base", create=SIZE, launch=True)
    qio.log.heading("writes, then bitmap b0 on base and a full backup in one transaction")
    writes(vm, "base", W0, 0x11)
    full = take_full(qio, vm, ("b0",), device="base", source="base.qcow2")
    qio.log.heading("writes into base, tracked by b0")
    writes(vm, "base", W1, 0x22)

    active = "base"
    for overlay, bitmap, regions, pattern in (("mid", "b1", W2, 0x33), ("top", "b2", W3, 0x44)):
        qio.log.heading(f"snapshot {active} -> {overlay} with bitmap {bitmap} on {overlay}, "
                        "one transaction; writes land in it")
        qio.img.create(f"{overlay}.qcow2", SIZE, backing=f"{active}.qcow2")
        vm.qmp_log("blockdev-add", qcow2_node(qio.path(f"{overlay}.qcow2"), overlay,
                                                backing=None))
        vm.qmp_log("transaction", actions=[
            bitmap_add(overlay, bitmap, GRAN),
            action("blockdev-snapshot", node=active, overlay=overlay),
        ])
        writes(vm, overlay, regions, pattern)
        active = overlay
    for node, bitmap in (("base", "b0"), ("mid", "b1"), ("top", "b2")):
        qio.show_bitmaps(vm, node)
        qio.oracle.check_exact(vm, node, [bitmap], "before backup 1")

    qio.log.heading("backup 1 of top since the full backup: b0, b1, b2 merged into top/merged")
    ref = reference(qio, vm, "top", "top.qcow2", 1)
    target(qio, vm, "inc1.qcow2", backing=full.top)
    sources = [{"node": "base", "name": "b0"}, {"node": "mid", "name": "b1"}, "b2"]
    vm.qmp_log("transaction", actions=[
        bitmap_add("top", "merged", GRAN, disabled=True),
        action("block-dirty-bitmap-merge", node="top", target="merged", bitmaps=sources),
        action("blockdev-backup", **backup_job("backup1", "top", "inc1",
                                                sync="bitmap", bitmap="merged",
                                                bitmap_mode="on-success")),
    ])
    assert vm.run_job("backup1") is None
    del_target(vm, "inc1.qcow2")
    qio.oracle.check_exact(vm, "top", ["b2", "merged"], "after backup 1")
    verify_restore(qio, full.then("inc1.qcow2"), ref, "backup-1")
    vm.shutdown()
