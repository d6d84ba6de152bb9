"""Live migration of dirty bitmaps between two QEMU processes (iotest 169 ground).

The source and the destination are two ``qemu-system-x86_64`` of the case; the migration
goes over a unix socket in the case's socket dir. Nothing here tells the oracle what to
expect: it follows ``migrate`` with the ``dirty-bitmaps`` capability by itself
(harness/migration.py has QEMU's rules) and checks every bitmap on the destination live
before it quits and in the image after, and again in a third VM opened on the image.

Writes while migrating: the source's bandwidth is throttled so the migration stays
``active`` while qemu-io writes land, then released; the bitmaps must hold those writes.
"""

from __future__ import annotations

import pytest

from harness.actions import migration_caps, wait_migration, writes
from harness.block import blockdev, qcow2_node
from harness.session import Case
from harness.vm import VM

SIZE = 16 << 20
NODE = "drive0"
#: name, granularity, persistent, enabled: every combination, four granularities
BITMAPS = (
    ("persistent-on", 512, True, True),
    ("persistent-off", 65536, True, False),
    ("transient-on", 4096, False, True),
    ("transient-off", 1 << 20, False, False),
)
BEFORE = ((0, 0x10000), (0xF0000, 0x10000), (0xA0201, 0x1000))
WHILE_ENABLED = ((0x300000, 0x800),)  # before the "-off" bitmaps are disabled
DURING = ((0x400000, 0x1000), (0x7FFE00, 0x400))  # the migration is active
AFTER = ((SIZE - 0x200, 0x200), (0x200000, 0x20000))  # on the destination
THROTTLED = 1000  # bytes/s: the RAM pass takes ages, the migration stays active
RELEASED = 1 << 30


def vm_for(qio: Case, name: str, image: str, incoming: str | None = None) -> VM:
    args = blockdev(qcow2_node(qio.path(image), NODE))
    if incoming is not None:
        args += ["-incoming", incoming]
    return qio.vm(name, args=args, log_prefix=f"{name}: ")


def add_bitmaps(vm: VM) -> None:
    """Every bitmap of BITMAPS with its own history: the disabled ones stop recording
    after the first writes."""
    for name, gran, persistent, _ in BITMAPS:
        vm.qmp_log("block-dirty-bitmap-add", node=NODE, name=name, granularity=gran,
                   persistent=persistent)
    writes(vm, NODE, BEFORE, 0x11)
    writes(vm, NODE, WHILE_ENABLED, 0x22)
    for name, _, _, enabled in BITMAPS:
        if not enabled:
            vm.qmp_log("block-dirty-bitmap-disable", node=NODE, name=name)


@pytest.mark.parametrize("capability", [True, False], ids=["dirty-bitmaps", "without"])
def test_shared_storage_precopy(qio: Case, capability: bool) -> None:
    """Both VMs open the same image. With the capability every bitmap travels in the
    stream (the source skips storing the persistent ones); without it the persistent
    ones go through the image (stored at the source's inactivation, loaded by the
    destination) and the transient ones stay behind."""
    qio.img.create("disk.qcow2", SIZE)
    sock = qio.sockdir / "mig.sock"
    src = vm_for(qio, "src", "disk.qcow2")
    dst = vm_for(qio, "dst", "disk.qcow2", incoming="defer")
    src.launch()
    dst.launch()
    add_bitmaps(src)

    qio.log.heading("migrate, writing on the source while the migration is active")
    for vm in (src, dst):
        migration_caps(vm, events=True, dirty_bitmaps=capability)
    dst.qmp_log("migrate-incoming", uri=f"unix:{sock}")
    src.qmp_log("migrate-set-parameters", max_bandwidth=THROTTLED)
    src.qmp_log("migrate", uri=f"unix:{sock}")
    assert wait_migration(src, until=("active",)) == "active"
    writes(src, NODE, DURING, 0x33)
    src.qmp_log("migrate-set-parameters", max_bandwidth=RELEASED)
    assert wait_migration(src) == "completed"
    assert wait_migration(dst) == "completed"
    qio.show_bitmaps(dst, NODE, hashes=False)
    qio.check_live(dst, NODE)

    qio.log.heading("the destination runs on: its enabled bitmaps record")
    writes(dst, NODE, AFTER, 0x44)
    src.shutdown()
    dst.shutdown()

    qio.log.heading("a third VM on the image: the persistent bitmaps are back")
    after = vm_for(qio, "after", "disk.qcow2")
    after.launch()
    qio.show_bitmaps(after, NODE, hashes=False)
