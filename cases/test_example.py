"""The README's example case: a bitmap through an external snapshot and an active commit.

Nothing here tells the oracle anything: it follows the commands and checks the bitmap.
"""

import pytest

from harness.actions import writes
from harness.session import Case

DEVICE = "disk0/virtio-backend"


@pytest.mark.quick
@pytest.mark.requires(qmp=["blockdev-snapshot-sync", "block-commit"])
def test_bitmap_survives_snapshot_and_commit(qio: Case) -> None:
    vm = qio.vm_on("base.qcow2", "base", create=4 << 20, device=True)  # disk0 on node base
    vm.launch()
    vm.qmp_log("block-dirty-bitmap-add", node="base", name="b0", persistent=True)
    writes(vm, DEVICE, [(0, 0x10000)], 0x11, device=True)       # lands in base

    qio.log.heading("snapshot: the device now writes into top")
    vm.qmp_log("blockdev-snapshot-sync", node_name="base", format="qcow2",
               snapshot_file=str(qio.path("top.qcow2")), snapshot_node_name="top")
    writes(vm, DEVICE, [(0x100000, 0x1000)], 0x22, device=True)  # lands in top
    vm.qmp_log("block-dirty-bitmap-clear", node="base", name="b0",
               expect_error="readonly")                          # base is a backing file now

    qio.log.heading("active commit of top into base")
    vm.qmp_log("block-commit", job_id="commit0", device="top", base_node="base")
    assert vm.run_job("commit0", complete=True) is None
    qio.check_live(vm, "base")          # an explicit check; the rest is automatic:
    vm.restart()                        # live before the shutdown, on disk after it
