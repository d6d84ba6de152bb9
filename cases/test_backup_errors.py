"""Push backups that QEMU refuses, and backup jobs that meet I/O errors on the way.

A refused ``blockdev-backup`` must leave everything as it was: the sync bitmap keeps its
bits and still records (no frozen successor left behind when the refusal comes after
QEMU created one), no copy-before-write filter stays in the graph, and the next backup
from the bitmap is a complete incremental. Every refusal ``block/backup.c`` and the QMP
layer have for a push backup is tried once, on one VM, the bitmap checked exactly after
each.

A job that meets an I/O error acts as ``on-source-error`` / ``on-target-error`` say:
``stop`` pauses it (``BLOCK_JOB_ERROR``, status ``paused``) until ``job-resume``, and
``ignore`` retries the failed copy; either way the backup must end complete, restore to
the source as it was when it started, and leave the bitmap as a success does. While the
stopped job waits the guest keeps writing, over clusters the job has not copied yet:
copy-before-write must still save their old data first. A ``sync=top`` backup whose
allocation scan fails must fail, not end with a backup that lacks data.
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.actions import add_target, backup_job, del_target, full_backup, writes
from harness.actions import bitmap_add as add_bitmap_action
from harness.backup import Chain, host_offset, received, reference, verify_restore
from harness.bitmaps import live_bitmap
from harness.block import blockdev
from harness.model import Extents, format_ranges
from harness.session import Case
from harness.vm import VM

SIZE = 4 << 20
GRAN = 64 << 10
NODE = "drive0"

W0 = ((0, 0x20000), (0x100000, 0x10000), (0x3F0000, 0x10000))
W1 = ((0x200000, 0x30000), (0x8000, 0x1000), (0x3F8000, 0x8000))
W2 = ((0x40000, 0x10000),)

EIO = 5


def start(qio: Case, rules: tuple[dict[str, Any], ...] = ()) -> VM:
    """The source: qcow2 over a blkdebug ``dbg0`` (with ``rules``) over the file node
    ``file0`` of ``src.qcow2``."""
    return qio.vm_on("src.qcow2", NODE, create=SIZE, file_node="file0", blkdebug="dbg0",
                     inject=rules, launch=True)


def bitmap_add(name: str, **more: Any) -> dict[str, Any]:
    return add_bitmap_action(NODE, name, GRAN, **more)


def node_names(vm: VM) -> list[str]:
    return sorted(n["node-name"] for n in vm.qmp("query-named-block-nodes"))


def unchanged(qio: Case, vm: VM, nodes: list[str], where: str) -> None:
    """After a refusal: the same nodes (no filter left behind), b0 neither busy nor
    stopped recording, and exactly the bits it had (the model did not change)."""
    assert node_names(vm) == nodes, f"{where}: the graph changed: {node_names(vm)}"
    b0 = live_bitmap(vm, NODE, "b0")
    assert not b0.busy and b0.recording, f"{where}: b0 is left {b0.describe()}"
    qio.oracle.check_exact(vm, NODE, ["b0"], where)


#: (what is refused, blockdev-backup arguments over the defaults, a piece of the error)
REFUSALS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("the source as its own target", {"target": NODE, "sync": "full"},
     "Source and target cannot be the same"),
    ("an empty CD-ROM drive as the source", {"device": "cd", "sync": "full"},
     "Device is not inserted"),
    ("an empty CD-ROM drive as the target", {"target": "cd", "sync": "full"},
     "Device is not inserted"),
    ("compression on a raw target", {"target": "raw1", "sync": "full", "compress": True},
     "Compression is not supported"),
    ("sync=bitmap without a bitmap", {"sync": "bitmap"}, "bitmap"),
    ("bitmap-mode without a bitmap", {"sync": "full", "bitmap-mode": "always"}, "bitmap"),
    ("sync=incremental with bitmap-mode=always",
     {"sync": "incremental", "bitmap": "b0", "bitmap-mode": "always"}, "on-success"),
    ("a bitmap that does not exist", {"sync": "incremental", "bitmap": "nope"},
     "could not be found"),
    ("a bitmap of another node", {"sync": "incremental", "bitmap": "other0"},
     "could not be found"),
    ("x-perf max-workers 0", {"sync": "full", "x-perf": {"max-workers": 0}},
     "max-workers must be between 1 and"),
    ("x-perf max-chunk -1", {"sync": "full", "x-perf": {"max-chunk": -1}},
     "max-chunk must be zero"),
    # from here on QEMU has frozen b0 (created its successor) before it refuses: the
    # refusal must give b0 back, bits and recording
    ("x-perf max-chunk below the cluster size",
     {"sync": "incremental", "bitmap": "b0", "x-perf": {"max-chunk": 4096}},
     "less than backup cluster size"),
    ("a target of another size", {"target": "small", "sync": "incremental", "bitmap": "b0"},
     "different sizes"),
    ("a filter node name already in use",
     {"sync": "incremental", "bitmap": "b0", "filter-node-name": "file0"}, "file0"),
    ("a negative speed", {"sync": "incremental", "bitmap": "b0", "speed": -1}, "speed"),
)


@pytest.mark.requires(qmp=["blockdev-backup"], args=["blockdev-backup.x-perf.max-chunk"],
                      drivers=["host_cdrom"])
def test_refused_backups_change_nothing(qio: Case) -> None:
    vm = start(qio)
    qio.log.heading("writes, then b0 and a full backup in one transaction; more writes")
    writes(vm, NODE, W0, 0x11)
    full = full_backup(qio, vm, NODE, "src.qcow2", SIZE, bitmaps=[bitmap_add("b0")])
    writes(vm, NODE, W1, 0x22)

    qio.log.heading("the nodes the refusals name: targets, an empty CD-ROM drive, and a "
                    "second qcow2 node with its own bitmap")
    add_target(qio, vm, "inc1.qcow2", SIZE, backing=full.top)
    qio.img.create("small.qcow2", SIZE // 2)
    vm.qmp_log("blockdev-add", driver="qcow2", node_name="small", backing=None,
               file={"driver": "file", "filename": str(qio.path("small.qcow2"))})
    qio.img.create("raw1.raw", SIZE, fmt="raw")
    vm.qmp_log("blockdev-add", driver="raw", node_name="raw1",
               file={"driver": "file", "filename": str(qio.path("raw1.raw"))})
    vm.qmp_log("blockdev-add", driver="host_cdrom", node_name="cd", filename="/dev/null",
               read_only=True)
    qio.img.create("other.qcow2", SIZE)
    vm.qmp_log("blockdev-add", driver="qcow2", node_name="other",
               file={"driver": "file", "filename": str(qio.path("other.qcow2"))})
    vm.qmp_log("block-dirty-bitmap-add", node="other", name="other0", granularity=GRAN)
    nodes = node_names(vm)

    for what, args, error in REFUSALS:
        qio.log.heading(f"refused: {what}")
        vm.qmp_log("blockdev-backup", {**backup_job("bad", NODE, "inc1"), **args},
                   expect_error=error)
        unchanged(qio, vm, nodes, f"after refusing {what}")

    qio.log.heading("b0 in use by a running backup: a second one from b0 is refused, and "
                    "so is one with the same job id")
    add_target(qio, vm, "never1.qcow2", SIZE, backing=full.top)
    vm.qmp_log("blockdev-backup", backup_job("busy", NODE, "never1", sync="bitmap",
                                             bitmap="b0", bitmap_mode="never", speed=1))
    assert live_bitmap(vm, NODE, "b0").busy, "b0 is not busy while a backup uses it"
    vm.qmp_log("blockdev-backup", backup_job("bad", NODE, "inc1", sync="incremental",
                                             bitmap="b0"), expect_error="in use")
    vm.qmp_log("block-dirty-bitmap-add", node=NODE, name="b1", granularity=GRAN)
    vm.qmp_log("blockdev-backup", backup_job("busy", NODE, "inc1", sync="incremental",
                                             bitmap="b1"), expect_error="busy")
    assert not live_bitmap(vm, NODE, "b1").busy, "a refused backup left b1 busy"
    vm.qmp_log("block-dirty-bitmap-remove", node=NODE, name="b1")
    vm.qmp_log("job-cancel", id="busy")
    assert vm.run_job("busy") == "Operation canceled"
    del_target(vm, "never1.qcow2")
    unchanged(qio, vm, nodes, "after the cancelled backup (bitmap-mode=never)")

    qio.log.heading("after all that, an incremental from b0 is complete")
    ref = reference(qio, vm, NODE, "src.qcow2", 1)
    vm.qmp_log("blockdev-backup", backup_job("backup1", NODE, "inc1", sync="incremental",
                                             bitmap="b0"))
    assert vm.run_job("backup1") is None
    del_target(vm, "inc1.qcow2")
    qio.oracle.check_exact(vm, NODE, ["b0"], "after backup 1")
    verify_restore(qio, full.then("inc1.qcow2"), ref, "backup-1")
    vm.shutdown()


# -- I/O errors met by a running job ----------------------------------------------------

# W0 allocates host clusters 0x50000-0x80000 of src.qcow2 (L2 table at 0x40000), so W1's
# first new cluster, guest 0x200000, lands at 0x90000: nothing reads it before backup 1
SOURCE_HOST = 0x90000
SOURCE_GUEST = 0x200000
# a fresh 4 MiB qcow2 target: the job's first or second data cluster lands at 0x60000
TARGET_EIO = {"event": "pwritev", "iotype": "write", "errno": EIO, "once": True,
              "sector": 0x60000 // 512}
SOURCE_EIO = {"event": "read_aio", "iotype": "read", "errno": EIO, "once": True,
              "sector": SOURCE_HOST // 512}
# while a stopped job waits: into the cluster whose copy failed (for the source side; for
# the target side whichever cluster that was), and into a clean one
DURING = ((SOURCE_GUEST + 0x800, 0x1000), (0x300000, 0x10000))


def wait_stopped(vm: VM, job: str) -> None:
    """The BLOCK_JOB_ERROR of a ``stop`` action, then the job sitting in ``paused`` with
    ``io-status: failed`` (QEMU pauses it at its next pause point, soon)."""
    ev = vm.event_wait("BLOCK_JOB_ERROR", timeout=60.0,
                       match=lambda e: bool(e["data"].get("device") == job))
    if vm.transcript is not None:
        vm.transcript.event(ev, vm.log_prefix)
    vm.event_wait("JOB_STATUS_CHANGE", timeout=60.0,
                  match=lambda e: bool(e["data"] == {"id": job, "status": "paused"}))
    (info,) = [j for j in vm.qmp("query-block-jobs") if j["device"] == job]
    assert info["paused"] and info["io-status"] == "failed", f"{job}: {info}"
    if vm.transcript is not None:
        vm.transcript.log(f"{vm.log_prefix}job {job}: paused, io-status failed")


@pytest.mark.parametrize("side", ["target", "source"])
@pytest.mark.parametrize("act", ["stop", "ignore"])
def test_io_error_action(qio: Case, side: str, act: str) -> None:
    """One EIO on the way, ``on-<side>-error=<act>``: the backup still ends complete."""
    vm = start(qio, (SOURCE_EIO,) if side == "source" else ())
    qio.log.heading("writes, then b0 and a full backup in one transaction; more writes")
    writes(vm, NODE, W0, 0x11)
    full = full_backup(qio, vm, NODE, "src.qcow2", SIZE, bitmaps=[bitmap_add("b0")])
    writes(vm, NODE, W1, 0x22)
    vm.qemu_io(NODE, "flush")
    if side == "source":
        assert host_offset(qio.img, "src.qcow2", SOURCE_GUEST) == SOURCE_HOST
        qio.log.log(f"source: guest cluster {SOURCE_GUEST:#x} is at {SOURCE_HOST:#x} in "
                    "src.qcow2, where blkdebug fails the first read once")

    qio.log.heading(f"backup 1: incremental, on-{side}-error={act}, one EIO on the {side}")
    ref = reference(qio, vm, NODE, "src.qcow2", 1)
    add_target(qio, vm, "inc1.qcow2", SIZE, backing=full.top,
               inject=(TARGET_EIO,) if side == "target" else ())
    vm.qmp_log("blockdev-backup", backup_job("backup1", NODE, "inc1", sync="incremental",
                                             bitmap="b0", filter_node_name="cbw1",
                                             **{f"on-{side}-error": act}))
    if act == "stop":
        wait_stopped(vm, "backup1")
        qio.log.heading("the job waits; the guest writes, over the cluster whose copy "
                        "failed too: copy-before-write saves its old data first")
        writes(vm, "cbw1", DURING, 0x33)
        vm.qmp_log("job-resume", id="backup1")
    assert vm.run_job("backup1") is None
    del_target(vm, "inc1.qcow2")
    qio.show_bitmaps(vm, NODE)
    qio.oracle.check_exact(vm, NODE, ["b0"], "after backup 1")
    verify_restore(qio, full.then("inc1.qcow2"), ref, "backup-1")

    qio.log.heading("backup 2 from b0 onto the chain")
    writes(vm, NODE, W2, 0x44)
    ref = reference(qio, vm, NODE, "src.qcow2", 2)
    add_target(qio, vm, "inc2.qcow2", SIZE, backing="inc1.qcow2")
    vm.qmp_log("blockdev-backup", backup_job("backup2", NODE, "inc2", sync="incremental",
                                             bitmap="b0"))
    assert vm.run_job("backup2") is None
    del_target(vm, "inc2.qcow2")
    qio.oracle.check_exact(vm, NODE, ["b0"], "after backup 2")
    verify_restore(qio, full.then("inc1.qcow2").then("inc2.qcow2"), ref, "backup-2")
    vm.shutdown()


NAMELESS = ("QEMU bug in 7.2.22 and 10.0.2: backup_job_create names the refused node with "
            "bdrv_get_device_name(), which is empty for a node that no device uses, so the "
            "error reads 'Device is not inserted: ' or 'Compression is not supported for "
            "this drive ' and names nothing (bdrv_get_device_or_node_name() would)")


@pytest.mark.xfail(raises=AssertionError, strict=False, reason=NAMELESS)
@pytest.mark.requires(qmp=["blockdev-backup"], drivers=["host_cdrom"])
@pytest.mark.parametrize("refused", ["not-inserted", "compress"])
def test_refusal_names_the_node(qio: Case, refused: str) -> None:
    """A refusal should say which node: a backup of many disks names the one at fault."""
    vm = start(qio)
    if refused == "not-inserted":
        vm.qmp_log("blockdev-add", driver="host_cdrom", node_name="cd", filename="/dev/null",
                   read_only=True)
        args = backup_job("bad", "cd", NODE, sync="full")
        node = "cd"
    else:
        qio.img.create("raw1.raw", SIZE, fmt="raw")
        vm.qmp_log("blockdev-add", driver="raw", node_name="raw1",
                   file={"driver": "file", "filename": str(qio.path("raw1.raw"))})
        args = backup_job("bad", NODE, "raw1", sync="full", compress=True)
        node = "raw1"
    reply = vm.qmp_log("blockdev-backup", args, expect_error=True)
    desc = reply["error"]["desc"]
    assert f"'{node}'" in desc or desc.rstrip().endswith(node), (
        f"the refusal does not name node {node!r}: {desc!r}")
    vm.shutdown()


# -- sync=top: only what the top layer holds ----------------------------------------------

BASE_DATA = ((0, 0x30000), (0x200000, 0x10000))
TOP_DATA = ((0x10000, 0x10000), (0x100000, 0x20000), (0x3F0000, 0x10000))
#: the first L2 table the top image loads: nothing reads top.qcow2's mapping before the
#: backup job asks which clusters the top holds
SCAN_EIO = {"event": "l2_load", "iotype": "read", "errno": EIO, "once": True}


@pytest.mark.parametrize("scan", ["ok", "scan-error"])
def test_sync_top(qio: Case, scan: str) -> None:
    """``sync=top`` copies the clusters the top layer holds, found by a scan of its
    allocation before the copy; a scan that cannot read the mapping must fail the job."""
    qio.img.create("base.qcow2", SIZE)
    qio.io.io("base.qcow2", *(f"write -P 0x11 {o:#x} {n:#x}" for o, n in BASE_DATA),
              log=True)
    qio.img.create("top.qcow2", SIZE, backing="base.qcow2")
    qio.io.io("top.qcow2", *(f"write -P 0x22 {o:#x} {n:#x}" for o, n in TOP_DATA),
              log=True)
    file: dict[str, Any] = {"driver": "file", "filename": str(qio.path("top.qcow2"))}
    if scan == "scan-error":
        file = {"driver": "blkdebug", "image": file, "inject-error": [SCAN_EIO]}
    vm = qio.vm(machine_type="none", args=blockdev({
        "driver": "qcow2", "node-name": "top", "file": file,
        "backing": {"driver": "qcow2", "node-name": "base", "read-only": True,
                    "file": {"driver": "file", "filename": str(qio.path("base.qcow2"))}}}))
    vm.launch()

    qio.log.heading(f"a sync=top backup of top onto an overlay of base ({scan})")
    ref = reference(qio, vm, "top", "top.qcow2", 1)
    add_target(qio, vm, "topcopy.qcow2", SIZE, backing="base.qcow2")
    vm.qmp_log("blockdev-backup", backup_job("backup1", "top", "topcopy", sync="top"))
    error = vm.run_job("backup1")
    del_target(vm, "topcopy.qcow2")
    if scan == "scan-error":
        assert error == "Input/output error", f"a failed allocation scan ended {error!r}"
        assert not received(qio.img, "topcopy.qcow2"), "the failed job copied data"
    else:
        assert error is None, f"backup1 failed: {error}"
        held, top = received(qio.img, "topcopy.qcow2"), Extents(TOP_DATA)
        assert held == top, (f"topcopy.qcow2 holds {format_ranges(held)}, not the top "
                             f"layer's {format_ranges(top)}")
        qio.log.log(f"topcopy.qcow2 holds exactly the top layer's clusters {format_ranges(held)}")
        verify_restore(qio, Chain(("base.qcow2", "topcopy.qcow2")), ref, "backup-1")
    vm.shutdown()
