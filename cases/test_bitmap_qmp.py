"""QMP bitmap commands at their edges, where a crash would take every bitmap with it.

Known QEMU bugs are kept as non-strict xfails restricted to the exception they raise: on a
QEMU that has the bug the test is reported as ``xfail`` with the reason; on one that has it
fixed it reports ``XPASS``; any other failure is a real failure.
"""

from __future__ import annotations

import pytest

from harness.errors import MachineExitError
from harness.session import Case
from harness.vm import VM

pytestmark = pytest.mark.quick

SIZE = 8 << 20


def vm_with_bitmaps(qio: Case) -> VM:
    vm = qio.vm_on("disk.qcow2", create=SIZE, launch=True)
    vm.qmp("block-dirty-bitmap-add", node="drive0", name="a", persistent=True)
    vm.qmp("block-dirty-bitmap-add", node="drive0", name="fine", granularity=512)
    vm.qemu_io("drive0", "write 0x10000 0x1000")
    return vm


@pytest.mark.xfail(raises=MachineExitError, strict=False,
                   reason="QEMU bug seen in 7.2.22, 10.0.2, 10.0.13 and 10.2.2: "
                   "block-dirty-bitmap-merge with an empty 'bitmaps' list dies with SIGSEGV "
                   "(block_dirty_bitmap_merge frees a backup bitmap that was never allocated)")
def test_merge_with_empty_source_list(qio: Case) -> None:
    vm = vm_with_bitmaps(qio)
    before = vm.qmp("x-debug-block-dirty-bitmap-sha256", node="drive0", name="a")
    reply = vm.qmp_raw("block-dirty-bitmap-merge", node="drive0", target="a", bitmaps=[])
    assert "return" in reply or reply["error"]["class"] == "GenericError", reply
    assert vm.qmp("x-debug-block-dirty-bitmap-sha256", node="drive0", name="a") == before


def test_merge_edges(qio: Case) -> None:
    """Merging a bitmap into itself changes nothing; different granularities merge (the
    coarse target gains whole granules); a merge that fails on an unknown name is rolled
    back (merging coarse would have grown a)."""
    vm = vm_with_bitmaps(qio)
    qio.show_bitmaps(vm, "drive0")
    vm.qmp_log("block-dirty-bitmap-merge", node="drive0", target="a", bitmaps=["a"])
    vm.qmp_log("block-dirty-bitmap-add", node="drive0", name="coarse", granularity=1 << 20)
    vm.qmp_log("block-dirty-bitmap-merge", node="drive0", target="coarse", bitmaps=["fine"])
    vm.qmp_log("block-dirty-bitmap-merge", node="drive0", target="a",
               bitmaps=["coarse", "nosuch"], expect_error="not found")
    states = {b.name: b.count for b in qio.show_bitmaps(vm, "drive0")}
    assert states == {"a": 0x10000, "fine": 0x1000, "coarse": 1 << 20}
