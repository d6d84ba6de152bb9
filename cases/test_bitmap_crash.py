"""SIGKILL while persistent bitmaps are in use, and what the next open makes of it.

A bitmap that QEMU had open read-write when it died cannot be trusted: the image keeps
the ``in-use`` flag, the next QEMU must load it as ``inconsistent`` and refuse to base an
incremental backup on it, and removing it must recover. A bitmap that was cleanly stored
before the kill (read-only at that moment) must load as valid *and* complete. The model
checks both on disk (the qcow2 file read directly) and live.

Recorded, not asserted, where QEMU's behaviour is a policy rather than a contract:
whether ``qemu-img check`` reports in-use bitmaps, and whether ``check -r all`` drops them.
"""

from __future__ import annotations

import pytest

from harness.actions import writes
from harness.block import qcow2_node
from harness.session import Case
from harness.vm import VM

SIZE = 16 << 20
NODE = "drive0"
WRITES = ((0, 0x1000), (0x400000, 0x20000), (SIZE - 0x10000, 0x10000))
MORE = ((0x10000, 0x200), (0x800000, 0x10000))


def stored_bitmap(qio: Case) -> None:
    """disk.qcow2 with persistent bitmap b0 already stored (loaded at the next start)."""
    qio.img.create("disk.qcow2", SIZE)
    qio.img.run("bitmap", "--add", "disk.qcow2", "b0", log=True)


def crash(qio: Case, vm: VM) -> None:
    status = vm.kill()
    assert status is not None and status < 0
    qio.log.log(f"SIGKILL {vm.name}")


def refused_incremental_backup(qio: Case, vm: VM, node: str) -> None:
    """An incremental backup from b0 into a fresh target, which QEMU must refuse."""
    qio.img.create("target.qcow2", SIZE)
    vm.qmp_log("blockdev-add", qcow2_node(qio.path("target.qcow2"), "target"))
    vm.qmp_log("blockdev-backup", job_id="backup0", device=node, target="target",
               sync="incremental", bitmap="b0", expect_error="inconsistent")
    vm.qmp_log("blockdev-del", node_name="target")


def inspect_offline(qio: Case) -> None:
    """What the tools say about the crashed image, before anything repairs it."""
    (b,) = qio.show_image_bitmaps("disk.qcow2")
    assert b.in_use, "a bitmap open read-write at the crash must keep its in-use flag"
    status, report = qio.img.check("disk.qcow2")
    qio.log.log(f"qemu-img check: exit {status}, check-errors={report.get('check-errors', 0)}, "
                f"corruptions={report.get('corruptions', 0)}")
    qio.check_disk("disk.qcow2", where="after the crash")


def expect_inconsistent(qio: Case, vm: VM, node: str) -> None:
    """Loaded as inconsistent, unusable for backup, and the oracle agrees."""
    (b,) = qio.show_bitmaps(vm, node, hashes=False)
    assert b.inconsistent, f"bitmap {b.name} loaded as valid after a crash"
    assert not b.recording
    refused_incremental_backup(qio, vm, node)
    qio.check_live(vm, node, where="after the crash")


def test_kill_after_add(qio: Case) -> None:
    """A bitmap added at run time lives only in RAM until close: a crash loses it whole
    (no stale copy on disk that could pass for valid)."""
    qio.img.create("disk.qcow2", SIZE)
    vm = qio.vm_on("disk.qcow2", NODE, launch=True)
    vm.qmp_log("block-dirty-bitmap-add", node=NODE, name="b0", persistent=True)
    writes(vm, NODE, WRITES)
    crash(qio, vm)
    assert qio.show_image_bitmaps("disk.qcow2") == []
    vm.launch()
    assert qio.show_bitmaps(vm, NODE) == []


@pytest.mark.quick
def test_kill_after_writes_and_recover(qio: Case) -> None:
    stored_bitmap(qio)
    qio.log.heading("QEMU loads b0 read-write, writes, and is killed")
    vm = qio.vm_on("disk.qcow2", NODE, launch=True)
    writes(vm, NODE, WRITES)
    qio.check_live(vm, NODE)
    crash(qio, vm)
    inspect_offline(qio)

    qio.log.heading("the next QEMU: inconsistent, refused for backup")
    vm.launch()
    expect_inconsistent(qio, vm, NODE)

    qio.log.heading("recovery: remove it and start a new bitmap")
    vm.qmp_log("block-dirty-bitmap-remove", node=NODE, name="b0")
    vm.qmp_log("block-dirty-bitmap-add", node=NODE, name="b0", persistent=True)
    writes(vm, NODE, MORE)
    vm.shutdown()
    (b,) = qio.show_image_bitmaps("disk.qcow2")
    assert not b.in_use
    qio.check_disk("disk.qcow2")


def test_kill_then_offline_repair(qio: Case) -> None:
    """``qemu-img check -r all`` is recorded (it may leave the bitmap alone); removing
    the bitmap offline must recover either way."""
    stored_bitmap(qio)
    vm = qio.vm_on("disk.qcow2", NODE, launch=True)
    writes(vm, NODE, WRITES)
    crash(qio, vm)
    status, _ = qio.img.check("disk.qcow2", "-r", "all")
    qio.log.log(f"qemu-img check -r all: exit {status}")
    after = qio.show_image_bitmaps("disk.qcow2")
    qio.log.log("check -r all " + ("kept the in-use bitmap" if after and after[0].in_use
                                   else "dropped or repaired the bitmap"))
    if after:
        qio.img.run("bitmap", "--remove", "disk.qcow2", "b0", log=True)
    assert qio.show_image_bitmaps("disk.qcow2") == []
    vm.launch()
    assert qio.show_bitmaps(vm, NODE) == []


def test_kill_during_commit(qio: Case) -> None:
    """Killed while block-commit writes into a base that carries a bitmap: the base was
    reopened read-write for the commit, so its bitmap must come back inconsistent."""
    qio.img.create("base.qcow2", SIZE)
    qio.img.run("bitmap", "--add", "base.qcow2", "b0", log=True)
    qio.img.create("top.qcow2", SIZE, backing="base.qcow2")
    vm = qio.vm_on("top.qcow2", "top", backing=["base.qcow2"], launch=True)
    writes(vm, "top", ((0, 0x800000),))
    vm.qemu_io("top", "flush")  # the data must survive the kill; the bitmap cannot

    qio.log.heading("slow commit of top into base, killed while it runs")
    vm.qmp_log("block-commit", job_id="commit0", device="top", top_node="top",
               base_node="base", speed=1 << 20)
    vm.event_wait("JOB_STATUS_CHANGE", match=lambda e: e["data"]["status"] == "running")
    (b,) = qio.show_image_bitmaps("base.qcow2", force_share=True)
    assert b.in_use, "the commit reopened base read-write: b0 must be in use on disk"
    crash(qio, vm)
    (b,) = qio.show_image_bitmaps("base.qcow2")
    assert b.in_use
    qio.check_disk("base.qcow2", where="after the crash")

    qio.log.heading("restart on the chain: b0 is inconsistent; a new active commit completes")
    vm.launch()
    (lb,) = qio.show_bitmaps(vm, "base", hashes=False)
    assert lb.inconsistent
    vm.qmp_log("block-commit", job_id="commit1", device="top", top_node="top",
               base_node="base")
    assert vm.run_job("commit1", complete=True) is None
    (lb,) = qio.show_bitmaps(vm, "base", hashes=False)
    assert lb.inconsistent, "a commit must not turn an inconsistent bitmap valid"


@pytest.mark.parametrize("moment", ["while-read-only", "after-read-write-reopen"])
def test_kill_around_reopen(qio: Case, moment: str) -> None:
    """Killed between a read-only reopen (which stores the bitmap cleanly) and the
    read-write one: the stored bitmap must be valid and complete. Killed after the
    read-write reopen: in use again, so inconsistent."""
    stored_bitmap(qio)
    vm = qio.vm_on("disk.qcow2", NODE, launch=True)
    writes(vm, NODE, WRITES)
    vm.blockdev_reopen(qcow2_node(qio.path("disk.qcow2"), NODE, read_only=True))
    if moment == "after-read-write-reopen":
        vm.blockdev_reopen(qcow2_node(qio.path("disk.qcow2"), NODE))
        writes(vm, NODE, MORE)
    crash(qio, vm)
    (b,) = qio.show_image_bitmaps("disk.qcow2")
    assert b.in_use == (moment == "after-read-write-reopen")
    qio.check_disk("disk.qcow2", where="after the crash")
    vm.launch()
    (lb,) = qio.show_bitmaps(vm, NODE, hashes=False)
    assert lb.inconsistent == b.in_use
    qio.check_live(vm, NODE, where="after restart")
