"""Explicit reopen rw -> ro -> rw of a qcow2 node with persistent bitmaps.

This is the mechanism under the reference bug: a read-only reopen stores the bitmaps in the
image (clearing ``in-use``) and must keep them in RAM, read-only; the read-write reopen
must set ``in-use`` again and make them track writes. Each bitmap is checked by the model
live (over NBD) and on disk (parsed from the file while QEMU holds it read-only, and after
shutdown), through two full cycles and a restart.
"""

from __future__ import annotations

import pytest

from harness.actions import writes
from harness.block import qcow2_node
from harness.errors import MachineError
from harness.session import Case
from harness.vm import VM

SIZE = 32 << 20
NODE = "drive0"
BITMAP_SETS = {
    "one": (("b0", 65536, True),),
    "several": (("b0", 65536, True), ("fine", 512, True), ("coarse", 1 << 20, True),
                ("frozen", 65536, False)),
}
CYCLE_WRITES = (
    ((0, 0x1000), (0x7FFE00, 0x400), (0x1F00000, 0x100000)),
    ((0x10000, 0x200), (0x1000000, 0x30000), (SIZE - 0x200, 0x200)),
    ((0x40000, 0x10000), (0x1A00000, 0x1000)),
)


def reopen(qio: Case, vm: VM, read_only: bool) -> None:
    vm.blockdev_reopen(qcow2_node(qio.path("disk.qcow2"), NODE, read_only=read_only))



def in_use_flags(qio: Case) -> dict[str, bool]:
    return {b.name: b.in_use for b in qio.show_image_bitmaps("disk.qcow2", force_share=True)}


@pytest.mark.parametrize("bitmaps", list(BITMAP_SETS))
def test_reopen_cycles(qio: Case, bitmaps: str) -> None:
    specs = BITMAP_SETS[bitmaps]
    qio.img.create("disk.qcow2", SIZE)
    vm = qio.vm_on("disk.qcow2", NODE, launch=True)

    qio.log.heading("read-write: add persistent bitmaps, write")
    for name, gran, enabled in specs:
        vm.qmp_log("block-dirty-bitmap-add", node=NODE, name=name, granularity=gran,
                   persistent=True, disabled=not enabled)
    writes(vm, NODE, CYCLE_WRITES[0])
    qio.check_live(vm, NODE)
    assert in_use_flags(qio) == {}, "bitmaps added at run time are stored only at close"

    for cycle in (1, 2):
        qio.log.heading(f"cycle {cycle}: reopen read-only stores the bitmaps and keeps them")
        before = {b.name: b for b in qio.show_bitmaps(vm, NODE)}
        reopen(qio, vm, read_only=True)
        assert in_use_flags(qio) == {n: False for n, _, _ in specs}
        qio.check_disk("disk.qcow2", where=f"stored by read-only reopen {cycle}")
        after = {b.name: b for b in qio.show_bitmaps(vm, NODE)}
        assert {n: b.count for n, b in after.items()} == {n: b.count for n, b in before.items()}
        qio.check_live(vm, NODE, where=f"read-only {cycle}")

        qio.log.heading(f"cycle {cycle}: read-only refuses writes and bitmap changes")
        with pytest.raises(MachineError, match="read-only"):
            vm.qemu_io(NODE, "write 0 512")
        qio.log.log("qemu-io drive0: write 0 512: refused")
        for cmd in ("block-dirty-bitmap-clear", "block-dirty-bitmap-remove"):
            vm.qmp_log(cmd, node=NODE, name="b0", expect_error="is readonly")

        qio.log.heading(f"cycle {cycle}: reopen read-write; the bitmaps track writes")
        reopen(qio, vm, read_only=False)
        assert in_use_flags(qio) == {n: True for n, _, _ in specs}
        writes(vm, NODE, CYCLE_WRITES[cycle])
        qio.show_bitmaps(vm, NODE)
        qio.check_live(vm, NODE, where=f"read-write {cycle}")

    qio.log.heading("shutdown and restart: every write is in the stored bitmaps")
    vm.shutdown()
    assert in_use_flags(qio) == {n: False for n, _, _ in specs}
    qio.check_disk("disk.qcow2")
    vm.launch()
    qio.check_live(vm, NODE, where="after restart")


def test_bitmap_state_changes_while_read_only(qio: Case) -> None:
    """What QEMU allows on a read-only node: enable/disable and adding bitmaps are
    accepted (they change no stored data yet); the model follows, and the result must be
    right once the node is read-write again and after a restart."""
    qio.img.create("disk.qcow2", SIZE)
    qio.log.heading("offline: 'on' enabled, 'off' disabled; QEMU writes read-write")
    qio.img.run("bitmap", "--add", "disk.qcow2", "on", log=True)
    qio.img.run("bitmap", "--add", "--disable", "disk.qcow2", "off", log=True)
    vm = qio.vm_on("disk.qcow2", NODE, launch=True)
    writes(vm, NODE, CYCLE_WRITES[0])

    qio.log.heading("read-only: disable 'on', enable 'off', add a new persistent bitmap")
    reopen(qio, vm, read_only=True)
    vm.qmp_log("block-dirty-bitmap-disable", node=NODE, name="on")
    vm.qmp_log("block-dirty-bitmap-enable", node=NODE, name="off")
    vm.qmp_log("block-dirty-bitmap-add", node=NODE, name="late", persistent=True)
    qio.show_bitmaps(vm, NODE)

    qio.log.heading("read-write: writes go to 'off' and 'late' only")
    reopen(qio, vm, read_only=False)
    writes(vm, NODE, CYCLE_WRITES[1])
    qio.show_bitmaps(vm, NODE)
    qio.check_live(vm, NODE)
    vm.shutdown()
    qio.show_image_bitmaps("disk.qcow2")
    qio.check_disk("disk.qcow2")
    vm.launch()
    qio.check_live(vm, NODE, where="after restart")
