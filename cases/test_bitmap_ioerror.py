"""EIO on the image's metadata writes while bitmaps are stored or marked in use.

A ``blkdebug`` filter is inserted under the qcow2 node at the chosen moment (the qcow2
node is reopened with ``file`` pointing at it), so the writes before that moment work and
only the step under test fails. Two fault shapes: writes to the header cluster only
(sector 0: the header extension and flags), and every write to the file.

Three moments: storing at shutdown, storing at a read-only reopen, and setting ``in-use``
at a read-write reopen. What QEMU does is recorded (replies, its stderr message, the exit
status, the flags on disk); the invariant asserted is the oracle's: whatever happens, no
bitmap is ever reported valid and incomplete, on disk, after a restart, or after a crash
that follows the failed step.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import pytest

from harness.actions import writes
from harness.errors import LaunchError, MachineError
from harness.qcow2 import Qcow2Image
from harness.qcow2_writer import poke
from harness.session import Case
from harness.vm import VM

SIZE = 16 << 20
NODE = "drive0"
FAULTS: dict[str, dict[str, Any]] = {
    "header-writes": {"event": "pwritev", "iotype": "write", "errno": 5, "once": False,
                      "sector": 0},
    "all-writes": {"event": "pwritev", "iotype": "write", "errno": 5, "once": False},
}
BEFORE = ((0, 0x1000), (0x400000, 0x20000))
AFTER = ((0x800000, 0x10000), (SIZE - 0x200, 0x200))


def qcow2_over(file_node: str, read_only: bool = False) -> dict[str, Any]:
    opts: dict[str, Any] = {"driver": "qcow2", "node-name": NODE, "file": file_node}
    if read_only:
        opts["read-only"] = True
    return opts


def insert_fault(qio: Case, vm: VM, fault: str, read_only: bool) -> None:
    """Put a blkdebug filter with the fault between the qcow2 node and its file."""
    qio.log.log(f"inject EIO: {fault}")
    vm.qmp("blockdev-add", driver="blkdebug", image="file0", node_name="dbg",
           inject_error=[FAULTS[fault]])
    vm.qmp("blockdev-reopen", options=[qcow2_over("dbg", read_only)])


def qemu_said(qio: Case, vm: VM, since: int) -> None:
    """Log QEMU's own stderr lines about bitmaps since byte ``since`` of its log."""
    text = vm.log_path.read_bytes()[since:].decode(errors="replace")
    for line in text.splitlines():
        if re.search(r"bitmap", line, re.I):
            qio.log.log("QEMU: " + line.split(": ", 1)[-1])


def log_size(vm: VM) -> int:
    return vm.log_path.stat().st_size if vm.log_path.exists() else 0


def setup(qio: Case, vm_read_only: bool = False) -> VM:
    qio.img.create("disk.qcow2", SIZE)
    qio.img.run("bitmap", "--add", "disk.qcow2", "b0", log=True)
    return qio.vm_on("disk.qcow2", NODE, read_only=vm_read_only, file_node="file0",
                     launch=True)


def try_writes(qio: Case, vm: VM) -> None:
    """Guest writes after the failed step: QEMU may refuse them (a node whose bitmaps
    could not be made writable refuses writes); only accepted ones reach the model."""
    try_writes_at(qio, vm, AFTER)
    qio.check_live(vm, NODE, where="after the failed step")


def try_writes_at(qio: Case, vm: VM, regions: tuple[tuple[int, int], ...] |
                  list[tuple[int, int]]) -> None:
    for off, length in regions:
        try:
            writes(vm, NODE, [(off, length)])
        except MachineError as e:
            qio.log.log(f"qemu-io {NODE}: write {off:#x} {length:#x}: refused "
                        f"({e.reason.rsplit(': ', 1)[-1]})")


def written_then_armed(qio: Case, fault: str) -> VM:
    """A read-write VM whose bitmap saw BEFORE, with the fault armed under the node."""
    vm = setup(qio)
    writes(vm, NODE, BEFORE)
    insert_fault(qio, vm, fault, read_only=False)
    return vm


def verify_after(qio: Case, where: str) -> None:
    """The invariant on disk and after a clean restart without the fault."""
    (b,) = qio.show_image_bitmaps("disk.qcow2")
    qio.check_disk("disk.qcow2", where=where)
    vm = qio.vm_on("disk.qcow2", NODE, "after", file_node="file0", launch=True)
    (lb,) = qio.show_bitmaps(vm, NODE, hashes=False)
    assert lb.inconsistent == b.in_use
    qio.check_live(vm, NODE, where=f"{where}, restarted")
    vm.shutdown()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_store_at_shutdown(qio: Case, fault: str) -> None:
    vm = written_then_armed(qio, fault)
    qio.log.heading("quit: QEMU stores the bitmap through the failing file")
    mark = log_size(vm)
    status = vm.shutdown(check=False)
    qio.log.log(f"QEMU exit status: {status}")
    qemu_said(qio, vm, mark)
    verify_after(qio, "after a failed store at shutdown")


def end_vm(qio: Case, vm: VM, end: str) -> None:
    """The end after the failed step: a crash, or a clean quit (whose store goes through
    the still failing file) - each must leave an image that tells the truth."""
    if end == "crash":
        vm.kill()
        qio.log.log("SIGKILL vm0")
    else:
        mark = log_size(vm)
        status = vm.shutdown(check=False)
        qio.log.log(f"quit: QEMU exit status {status}")
        qemu_said(qio, vm, mark)


ENDS = ("crash", "quit")


@pytest.mark.parametrize("end", ENDS)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_store_at_read_only_reopen(qio: Case, fault: str, end: str) -> None:
    vm = written_then_armed(qio, fault)
    qio.log.heading("reopen read-only: the store fails")
    mark = log_size(vm)
    reply = vm.qmp_log("blockdev-reopen", options=[qcow2_over("dbg", read_only=True)],
                       check=False)
    qemu_said(qio, vm, mark)
    qio.show_bitmaps(vm, NODE, hashes=False)
    if "return" not in reply:
        # the node stayed read-write: its bitmap must keep tracking writes
        qio.log.heading(f"still read-write: writes, then a {end}")
        try_writes(qio, vm)
    end_vm(qio, vm, end)
    verify_after(qio, f"after a failed read-only reopen and a {end}")


@pytest.mark.parametrize("end", ENDS)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_in_use_at_read_write_reopen(qio: Case, fault: str, end: str) -> None:
    """The most dangerous moment: if QEMU let the node become read-write with the bitmap
    recording but not marked in use on disk, a crash would leave a valid-looking bitmap
    that misses the writes made afterwards."""
    vm = setup(qio, vm_read_only=True)
    insert_fault(qio, vm, fault, read_only=True)
    qio.log.heading("reopen read-write: marking the bitmap in use fails")
    mark = log_size(vm)
    reply = vm.qmp_log("blockdev-reopen", options=[qcow2_over("dbg", read_only=False)],
                       check=False)
    qemu_said(qio, vm, mark)
    qio.show_bitmaps(vm, NODE, hashes=False)
    flags = qio.show_image_bitmaps("disk.qcow2", force_share=True)
    if "return" in reply:
        qio.log.heading(f"the node is read-write: writes, then a {end}")
        try_writes(qio, vm)
    end_vm(qio, vm, end)
    assert flags, "the bitmap vanished from the image"
    verify_after(qio, f"after a failed in-use update and a {end}")


def test_store_clean_bitmap_at_shutdown(qio: Case) -> None:
    """A bitmap with no dirty bit has no data clusters: its bitmap table is the first
    thing the store writes, and that write fails. The bitmap must stay in use."""
    vm = setup(qio)
    writes(vm, NODE, BEFORE)
    vm.qmp_log("block-dirty-bitmap-clear", node=NODE, name="b0")
    insert_fault(qio, vm, "all-writes", read_only=False)
    qio.log.heading("quit: the store of the bitmap table fails")
    mark = log_size(vm)
    qio.log.log(f"QEMU exit status: {vm.shutdown(check=False)}")
    qemu_said(qio, vm, mark)
    verify_after(qio, "after a failed store of a clean bitmap")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_remove_persistent(qio: Case, fault: str) -> None:
    """block-dirty-bitmap-remove must delete the bitmap from the image before it lets go
    of it in RAM. When the image cannot be written, the remove fails and the bitmap
    stays, recording; the image must still describe it truthfully."""
    vm = written_then_armed(qio, fault)
    qio.log.heading("remove b0: the image update fails")
    mark = log_size(vm)
    vm.qmp_log("block-dirty-bitmap-remove", node=NODE, name="b0", expect_error=True)
    qemu_said(qio, vm, mark)
    qio.show_bitmaps(vm, NODE, hashes=False)
    try_writes(qio, vm)
    end_vm(qio, vm, "quit")
    verify_after(qio, "after a failed remove")


def test_image_marked_corrupt(qio: Case) -> None:
    """QEMU marks an image corrupt (a data write that would overwrite the refcount table)
    and stops using it: the node has no driver any more. Its bitmaps can then be neither
    stored nor trusted: b0 must stay in use on disk (inconsistent when read), adding a
    bitmap is refused with a sentence, and the next QEMU may open the image read-only
    only."""
    qio.img.create("disk.qcow2", SIZE)
    qio.img.run("bitmap", "--add", "disk.qcow2", "b0", log=True)
    qio.io.run("-f", "qcow2", "-c", "write 0 0x10000", "disk.qcow2", log=True)
    image = Qcow2Image.open(qio.path("disk.qcow2"))
    raw = qio.path("disk.qcow2").read_bytes()
    (l2,) = struct.unpack_from(">Q", raw, image.header.l1_table_offset)
    l2 &= 0x00FFFFFFFFFFFE00
    entry = (1 << 63) | image.header.refcount_table_offset  # COPIED, in the reftable
    poke(qio.path("disk.qcow2"), l2, struct.pack(">Q", entry))
    qio.oracle.edited_by_hand("disk.qcow2", "guest cluster 0 mapped onto the refcount table")
    qio.log.log("guest cluster 0 now maps onto the refcount table's cluster")
    vm = qio.vm_on("disk.qcow2", NODE, launch=True)
    writes(vm, NODE, [(0x100000, 0x1000)])
    mark = log_size(vm)
    try_writes_at(qio, vm, [(0, 0x200)])
    said = vm.log_path.read_bytes()[mark:].decode(errors="replace")
    assert "Marking image as corrupt" in said, said
    vm.qmp_log("block-dirty-bitmap-add", node=NODE, name="b1", expect_error="No medium")
    vm.qmp_log("block-dirty-bitmap-add", node=NODE, name="b1", persistent=True,
               expect_error="No medium")
    vm.shutdown(check=False)
    (b,) = qio.show_image_bitmaps("disk.qcow2")
    assert b.in_use, "a bitmap of a corrupt image was stored as valid"
    info = qio.img.info("disk.qcow2", force_share=True)
    corrupt = info.get("format-specific", {}).get("data", {}).get("corrupt")
    qio.log.log(f"qemu-img info: corrupt: {corrupt}")
    assert corrupt is True
    after = qio.vm_on("disk.qcow2", NODE, "after")
    with pytest.raises(LaunchError):
        after.launch()  # the node is on the command line: QEMU exits at once
    said = after.log_path.read_text(errors="replace")
    assert "cannot be opened read/write" in said, said
    qio.log.log("a new QEMU refuses to open it read-write")
