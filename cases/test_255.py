"""The seed scenario: a bitmap through an external snapshot, block-commit and restarts.

The reference bug (qemu-block, May 2019): a persistent bitmap on a qcow2 node is stored
and dropped from RAM when the node is reopened read-only for an external snapshot; after
``block-commit`` nothing tracks guest writes; after a restart the bitmap loads as valid but
misses those writes. Upstream's iotest 260 (numbered 255 in the series) never restarts
after the commit; here the bitmap is checked by the model at every step, live over NBD
and on disk after each shutdown, with restarts at every point that matters.

Guest writes go through a virtio-blk device, so they land in whatever the active layer
is: the base before the snapshot, the overlay after it, the overlay (mirrored into the
base) during the active commit, and the base again after ``job-complete``.
"""

from __future__ import annotations

import pytest

from harness.actions import guest_writes
from harness.block import qcow2_node
from harness.session import Case
from harness.vm import VM

SIZE = 4 << 20
# (offset, length) of each phase's writes; some straddle 64 KiB granules
BEFORE_SNAPSHOT = ((0, 0x10000), (0x2FF000, 0x2000))
IN_OVERLAY = ((0x10000, 0x200), (0x100000, 0x30000))
DURING_COMMIT = ((0x200000, 0x10000), (0x3FFE00, 0x200))
AFTER_COMMIT = ((0x20000, 0x10000), (0x180000, 0x1000))

RESTARTS = {
    "no-restart": (),
    "restart-after-snapshot": ("snapshot",),
    "restart-after-commit": ("commit",),
    "restart-after-final-writes": ("final",),
    "restart-everywhere": ("snapshot", "commit", "final"),
}


def snapshot(qio: Case, vm: VM, method: str, base: str, overlay: str) -> None:
    """An external snapshot of ``base`` into a new ``overlay`` node, by either command."""
    path = qio.path(f"{overlay}.qcow2")
    if method == "blockdev-snapshot-sync":
        vm.qmp_log("blockdev-snapshot-sync", node_name=base, snapshot_file=str(path),
                   snapshot_node_name=overlay, format="qcow2")
    else:
        qio.img.create(path.name, SIZE, backing=f"{base}.qcow2")
        vm.qmp_log("blockdev-add", qcow2_node(path, overlay, backing=None))
        vm.qmp_log("blockdev-snapshot", node=base, overlay=overlay)


@pytest.mark.parametrize("method", ["blockdev-snapshot-sync", "blockdev-snapshot"])
@pytest.mark.parametrize("persistent,restarts", [
    pytest.param(False, "no-restart", id="transient"),
    # the run that restarts everywhere is the seed scenario in full: part of check-quick
    *(pytest.param(True, r, id=f"persistent-{r}",
                   marks=[pytest.mark.quick] if r == "restart-everywhere" else [])
      for r in RESTARTS),
])
def test_snapshot_commit(qio: Case, method: str, persistent: bool, restarts: str) -> None:
    restart_at = RESTARTS[restarts]
    qio.img.create("base.qcow2", SIZE)

    qio.log.heading("bitmap on the base, guest writes into the base")
    vm = qio.vm_on("base.qcow2", "base", device=True, launch=True)
    vm.qmp_log("block-dirty-bitmap-add", node="base", name="bitmap0", persistent=persistent)
    guest_writes(vm, BEFORE_SNAPSHOT, 0x11)
    qio.check_live(vm, "base")

    qio.log.heading(f"external snapshot with {method}; guest writes land in the overlay")
    snapshot(qio, vm, method, "base", "top")
    guest_writes(vm, IN_OVERLAY, 0x22)
    qio.show_bitmaps(vm, "top")
    qio.check_live(vm, "base")

    if "snapshot" in restart_at:
        qio.log.heading("restart on the chain base <- top")
        vm.shutdown()
        qio.check_disk("base.qcow2")
        vm = qio.vm_on("top.qcow2", "top", "vm1", backing=["base.qcow2"], device=True,
                       launch=True)
        qio.check_live(vm, "base")

    qio.log.heading("active commit of top into base, guest writes while it runs")
    vm.qmp_log("block-commit", job_id="commit0", device="top", base_node="base")
    assert vm.run_job("commit0", complete=True,
                      on_ready=lambda: guest_writes(vm, DURING_COMMIT, 0x33)) is None
    qio.check_live(vm, "base")

    if "commit" in restart_at:
        qio.log.heading("restart on the base alone")
        vm.shutdown()
        qio.check_disk("base.qcow2")
        vm = qio.vm_on("base.qcow2", "base", "vm2", device=True, launch=True)
        qio.check_live(vm, "base")

    qio.log.heading("guest writes into the base after the commit")
    guest_writes(vm, AFTER_COMMIT, 0x44)
    qio.show_bitmaps(vm, "base")
    qio.check_live(vm, "base")
    vm.shutdown()
    if not persistent:
        assert qio.img.bitmaps("base.qcow2") == [], "a non-persistent bitmap was stored"
        return
    qio.check_disk("base.qcow2")

    if "final" in restart_at:
        qio.log.heading("restart: the stored bitmap has every write")
        vm = qio.vm_on("base.qcow2", "base", "vm3", device=True, launch=True)
        qio.show_bitmaps(vm, "base")
        qio.check_live(vm, "base")


def test_intermediate_commit(qio: Case) -> None:
    """base <- mid <- top, bitmaps on base and mid; commit mid into base while top stays."""
    qio.img.create("base.qcow2", SIZE)

    qio.log.heading("base with a persistent bitmap; writes")
    vm = qio.vm_on("base.qcow2", "base", device=True, launch=True)
    vm.qmp_log("block-dirty-bitmap-add", node="base", name="b-base", persistent=True)
    guest_writes(vm, BEFORE_SNAPSHOT, 0x11)

    qio.log.heading("snapshot to mid, a persistent bitmap on mid, writes into mid")
    snapshot(qio, vm, "blockdev-snapshot-sync", "base", "mid")
    vm.qmp_log("block-dirty-bitmap-add", node="mid", name="b-mid", persistent=True)
    guest_writes(vm, IN_OVERLAY, 0x22)

    qio.log.heading("snapshot to top, writes into top")
    snapshot(qio, vm, "blockdev-snapshot-sync", "mid", "top")
    guest_writes(vm, DURING_COMMIT, 0x33)
    qio.check_live(vm, "base")
    qio.check_live(vm, "mid")

    qio.log.heading("commit mid into base (top stays active)")
    vm.qmp_log("block-commit", job_id="commit0", device="top", top_node="mid",
               base_node="base")
    assert vm.run_job("commit0") is None
    qio.check_live(vm, "base")

    qio.log.heading("more writes into top; then restart on base <- top")
    guest_writes(vm, AFTER_COMMIT, 0x44)
    vm.shutdown()
    qio.check_disk("base.qcow2")
    qio.check_disk("mid.qcow2")
    vm = qio.vm_on("top.qcow2", "top", "vm1", backing=["base.qcow2"], device=True, launch=True)
    qio.show_bitmaps(vm, "base")
    qio.check_live(vm, "base")
