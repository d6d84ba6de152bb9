"""Persistent dirty bitmaps across restarts and read-only/read-write reopen (iotest 165).

Upstream 165 checks hashes within one run. This version also records, at every step,
what ``qemu-img info`` reads from the qcow2 header (the ``in-use`` flag must be set while
a read-write QEMU has the image open and clear once it is closed or read-only), and that
a read-only QEMU neither changes the bitmap nor drops it.
"""

from __future__ import annotations

import pytest

from harness.actions import writes
from harness.block import qcow2_node
from harness.errors import MachineError
from harness.session import Case
from harness.vm import VM

pytestmark = [pytest.mark.quick,
              pytest.mark.requires(qmp=["x-debug-block-dirty-bitmap-sha256"])]

DISK_SIZE = 1 << 30
# (offset, length): the first write straddles a 64 KiB granule boundary
REGIONS1 = ((0x0FFF00, 0x10000), (0x200000, 0x100000))
REGIONS2 = ((0x10000000, 0x20000), (0x3FFF0000, 0x10000))
# writes go through the guest device, as guest I/O would
DEVICE = "disk0/virtio-backend"


def write_regions(vm: VM, regions: tuple[tuple[int, int], ...]) -> None:
    writes(vm, DEVICE, regions, pattern=None, device=True)


def hash_of(vm: VM) -> str:
    return str(vm.qmp("x-debug-block-dirty-bitmap-sha256", node="drive0", name="bitmap0")["sha256"])


def test_persistent(qio: Case) -> None:
    qio.log.heading("read-write VM: add a persistent bitmap and write")
    vm = qio.vm_on("disk.qcow2", create=DISK_SIZE, device=True)
    vm.launch()
    vm.qmp_log("block-dirty-bitmap-add", node="drive0", name="bitmap0", persistent=True)
    write_regions(vm, REGIONS1)
    h1 = hash_of(vm)
    qio.show_bitmaps(vm, "drive0")
    flags = qio.show_image_bitmaps("disk.qcow2", force_share=True)
    # a bitmap added at run time is only stored at close: nothing on disk yet
    assert flags == []
    vm.shutdown()
    stored = qio.show_image_bitmaps("disk.qcow2")
    assert [b.flags for b in stored] == [("auto",)]

    qio.log.heading("read-only VM: the bitmap loads, nothing is lost at close")
    ro = qio.vm_on("disk.qcow2", read_only=True, device=True)
    ro.launch()
    qio.show_bitmaps(ro, "drive0")
    assert hash_of(ro) == h1
    (b,) = qio.show_image_bitmaps("disk.qcow2", force_share=True)
    assert not b.in_use, "a read-only QEMU must not mark the bitmap in use"
    ro.shutdown()
    assert "lost" not in ro.log_path.read_text(), ro.log_path.read_text()

    qio.log.heading("read-write VM again: same bitmap, then more writes")
    vm.launch()
    assert hash_of(vm) == h1
    (b,) = qio.show_image_bitmaps("disk.qcow2", force_share=True)
    assert b.in_use, "a read-write QEMU must mark a loaded persistent bitmap in use"
    write_regions(vm, REGIONS2)
    h2 = hash_of(vm)
    assert h2 != h1
    qio.show_bitmaps(vm, "drive0")

    qio.log.heading("restart: the new writes survived")
    vm.restart()
    qio.show_bitmaps(vm, "drive0")
    assert hash_of(vm) == h2
    vm.shutdown()
    (b,) = qio.show_image_bitmaps("disk.qcow2")
    assert not b.in_use


def test_reopen_rw(qio: Case) -> None:
    qio.log.heading("hashes of REGIONS1 and REGIONS1+REGIONS2")
    vm = qio.vm_on("disk.qcow2", create=DISK_SIZE, device=True)
    vm.launch()
    vm.qmp_log("block-dirty-bitmap-add", node="drive0", name="bitmap0", persistent=True)
    write_regions(vm, REGIONS1)
    h1 = hash_of(vm)
    write_regions(vm, REGIONS2)
    h12 = hash_of(vm)
    assert h1 != h12
    vm.qmp_log("block-dirty-bitmap-clear", node="drive0", name="bitmap0")
    write_regions(vm, REGIONS1)
    assert hash_of(vm) == h1
    qio.show_bitmaps(vm, "drive0")
    vm.shutdown()

    qio.log.heading("read-only VM: writes are refused and the bitmap does not change")
    ro = qio.vm_on("disk.qcow2", read_only=True, device=True)
    ro.launch()
    assert hash_of(ro) == h1
    for off, length in REGIONS2:
        with pytest.raises(MachineError, match="read-only"):
            ro.qemu_io(DEVICE, f"write {off:#x} {length:#x}", device=True)
        qio.log.log(f"qemu-io {DEVICE}: write {off:#x} {length:#x}: refused")
    assert hash_of(ro) == h1
    qio.show_bitmaps(ro, "drive0")
    qio.show_image_bitmaps("disk.qcow2", force_share=True)

    qio.log.heading("reopen read-write: the bitmap tracks writes again")
    ro.blockdev_reopen(qcow2_node(qio.path("disk.qcow2"), "drive0", read_only=False))
    (b,) = qio.show_image_bitmaps("disk.qcow2", force_share=True)
    assert b.in_use, "reopening read-write must mark the bitmap in use on disk"
    write_regions(ro, REGIONS2)
    assert hash_of(ro) == h12
    qio.show_bitmaps(ro, "drive0")
    ro.shutdown()
    (b,) = qio.show_image_bitmaps("disk.qcow2")
    assert not b.in_use

    qio.log.heading("restart: the writes made after the reopen are in the stored bitmap")
    vm.launch()
    assert hash_of(vm) == h12
    qio.show_bitmaps(vm, "drive0")
