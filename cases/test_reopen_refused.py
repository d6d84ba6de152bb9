"""A blockdev-reopen that QEMU refuses must leave the node exactly as it was.

Found by the exploration (``harness/explore/``): a guest's disk holds write permission on
its node, so a read-only reopen of that node is refused ("Read-only block node ... cannot
support read-write users"). QEMU's qcow2 driver prepares a read-only reopen by storing the
persistent bitmaps and marking them read-only (``qcow2_reopen_prepare`` ->
``qcow2_reopen_bitmaps_ro``) before the permission check that refuses it, and the abort
path does not undo that: the node stays read-write with read-only bitmaps, so every later
guest write and discard fails with EPERM (``bdrv_has_readonly_bitmaps``), and the image
says the bitmap is not in use while the node is still open read-write.

Known QEMU bugs are kept as non-strict xfails restricted to the exception they raise.
"""

from __future__ import annotations

import pytest

from harness.actions import guest_writes
from harness.block import qcow2_node
from harness.errors import MachineError
from harness.qcow2 import Qcow2Image
from harness.session import Case

NODE = "drive0"


@pytest.mark.quick
@pytest.mark.requires(qmp=["blockdev-reopen"])
def test_refused_reopen_of_a_node_without_bitmaps(qio: Case) -> None:
    """The control: without a persistent bitmap the same refusal changes nothing."""
    vm = qio.vm_on("disk.qcow2", NODE, create=4 << 20, device=True, launch=True)
    vm.qmp_log("block-dirty-bitmap-add", node=NODE, name="t0")  # transient: not stored
    vm.blockdev_reopen(qcow2_node(qio.path("disk.qcow2"), NODE, read_only=True),
                       expect_error="cannot support read-write users")
    guest_writes(vm, [(0x30000, 0x1000)], 0x5A)


@pytest.mark.quick
@pytest.mark.requires(qmp=["blockdev-reopen"])
@pytest.mark.xfail(raises=(MachineError, AssertionError), strict=False, reason=(
    "QEMU bug seen in 7.2.22 and 10.0.2: a read-only blockdev-reopen refused by the "
    "permission check (a guest disk holds write permission) has already stored the "
    "persistent bitmaps and marked them read-only (qcow2_reopen_prepare -> "
    "qcow2_reopen_bitmaps_ro), and qcow2_reopen_abort does not undo it: every later guest "
    "write fails with EPERM, and the image says the bitmap is not in use while the node "
    "is open read-write"))
def test_refused_read_only_reopen_leaves_bitmaps_writable(qio: Case) -> None:
    vm = qio.vm_on("disk.qcow2", NODE, create=4 << 20, device=True, launch=True)
    vm.qmp_log("block-dirty-bitmap-add", node=NODE, name="b0", persistent=True)
    guest_writes(vm, [(0, 0x1000)], 0x11)
    vm.blockdev_reopen(qcow2_node(qio.path("disk.qcow2"), NODE, read_only=True),
                       expect_error="cannot support read-write users")
    guest_writes(vm, [(0x30000, 0x1000)], 0x5A)  # the guest's disk must still work
    stored = {b.name: b for b in Qcow2Image.open(qio.path("disk.qcow2")).bitmaps}
    assert not stored["b0"].usable, (
        "the node is still read-write, yet the image holds b0 as not in use: after a crash "
        "it would load as consistent")
