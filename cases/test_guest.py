"""A real Linux guest writes through its virtio-blk disk while the block layer works.

Every other case writes with qemu-io over HMP and runs no guest code. Here a distro
kernel with a busybox initramfs (built on first use, ``harness/guest_image.py``) writes
with ``dd oflag=direct`` to ``/dev/vda``: real virtio-blk requests from a running vCPU,
through snapshots, an active commit, backups, reboots and QEMU restarts. The oracle models
each guest write where the device's active layer is, exactly as a qemu-io write through
the device; nothing here tells it anything.

Writes that race a job are started, then the job acts, then the write is awaited
(``guest.start_write(...).wait()``): where such a write lands depends on timing, so the
oracle accepts it only when every possible landing leaves the bitmaps the same (a commit
or mirror copies what landed above before it pivots) and refuses to guess otherwise.

The console goes to ``<scratch>/<vm>.console.log``, never to the transcript; guest data
is shown as checksum labels (``D1``...), the same bytes under the same label anywhere in
the case.
"""

from __future__ import annotations

import hashlib
import re

import pytest

from harness.actions import bitmap_add, full_backup, guest_writes, incremental_backup
from harness.block import blockdev, qcow2_node
from harness.guest import PendingWrite
from harness.session import Case
from harness.vm import VM

pytestmark = pytest.mark.guest

SIZE = 4 << 20
MiB = 1 << 20


_COMMIT_SIZE = re.compile(r'(\{"event": "BLOCK_JOB_(?:READY|COMPLETED)", "data": \{"device": '
                          r'"commit0", "len": )(\d+)(, "offset": )\2\b')


def commit_job_size(text: str) -> str:
    """``len``/``offset`` of commit0's READY and COMPLETED events become ``SIZE`` when
    equal: how much the job copies depends on where a racing guest write landed (copied
    once or twice); a job that stopped short would still show both numbers."""
    return _COMMIT_SIZE.sub(r'\1"SIZE"\3"SIZE"', text)


def reads_back(vm: VM, regions: list[tuple[int, int]], pattern: int) -> None:
    """The guest reads ``pattern`` over ``regions`` (O_DIRECT, from the device)."""
    for off, length in regions:
        got = vm.guest.checksum(off, length, show=False)
        assert got == hashlib.sha256(bytes([pattern]) * length).hexdigest(), (
            f"the guest reads {off:#x}+{length:#x} back differently from the "
            f"{pattern:#x} it wrote there")
    if vm.transcript is not None:
        vm.transcript.log(f"guest: reads back {pattern:#x} over "
                          + ", ".join(f"{o:#x}+{n:#x}" for o, n in regions))


@pytest.mark.requires(qmp=["blockdev-snapshot-sync", "block-commit", "job-complete"])
def test_seed_scenario(qio: Case) -> None:
    """The reference bug's scenario with the guest writing at every step."""
    qio.log.add_filter(commit_job_size)  # racing writes vary what the job copies
    qio.img.create("base.qcow2", SIZE)

    qio.log.heading("bitmap on the base; the guest writes into the base")
    vm = qio.vm_on("base.qcow2", "base", guest=True, launch=True)
    vm.qmp_log("block-dirty-bitmap-add", node="base", name="bitmap0", persistent=True)
    guest_writes(vm, [(0, 0x10000), (0x2FF000, 0x2000)], 0x11)
    qio.check_live(vm, "base")

    qio.log.heading("external snapshot: the guest's writes land in the overlay")
    vm.qmp_log("blockdev-snapshot-sync", node_name="base", snapshot_node_name="top",
               snapshot_file=str(qio.path("top.qcow2")), format="qcow2")
    guest_writes(vm, [(0x10000, 0x200), (0x100000, 0x30000)], 0x22)
    qio.check_live(vm, "base")

    qio.log.heading("QEMU restart on the chain base <- top; the guest boots again")
    vm.shutdown()
    qio.check_disk("base.qcow2")
    vm = qio.vm_on("top.qcow2", "top", "vm1", backing=["base.qcow2"], guest=True, launch=True)
    qio.check_live(vm, "base")

    qio.log.heading("active commit of top into base, started while a guest write runs")
    racing = vm.guest.start_write(0x200000, 0x10000, 0x33)
    vm.qmp_log("block-commit", job_id="commit0", device="top", base_node="base")
    racing.wait()

    qio.log.heading("while the job mirrors: guest writes, and one racing job-complete")
    in_flight: list[PendingWrite] = []

    def while_ready() -> None:
        guest_writes(vm, [(0x280000, 0x8000)], 0x44)
        in_flight.append(vm.guest.start_write(0x3F0000, 0x10000, 0x55))

    assert vm.run_job("commit0", complete=True, on_ready=while_ready) is None
    in_flight[0].wait()
    qio.check_live(vm, "base")

    qio.log.heading("QEMU restart on the base alone; the guest writes into the base")
    vm.shutdown()
    qio.check_disk("base.qcow2")
    vm = qio.vm_on("base.qcow2", "base", "vm2", guest=True, launch=True)
    guest_writes(vm, [(0x20000, 0x10000), (0x180000, 0x1000)], 0x66)
    qio.show_bitmaps(vm, "base")
    qio.check_live(vm, "base")

    qio.log.heading("what the guest reads is what it wrote, across all of it")
    reads_back(vm, [(0, 0x10000)], 0x11)
    reads_back(vm, [(0x100000, 0x30000)], 0x22)
    reads_back(vm, [(0x200000, 0x10000)], 0x33)
    reads_back(vm, [(0x3F0000, 0x10000)], 0x55)


@pytest.mark.requires(qmp=["blockdev-backup", "transaction", "block-job-set-speed"])
def test_incremental_chain(qio: Case) -> None:
    """Full and incremental backups with the guest writing between and during them; each
    restore is compared with the source (qemu-img compare) and read by a guest."""
    vm = qio.vm_on("disk.qcow2", "disk", create=SIZE, guest=True, launch=True)
    sums: list[str] = []

    def backup_point() -> None:
        # the bytes the guest reads at backup len(sums)'s point in time
        sums.append(vm.guest.checksum(0, SIZE))

    qio.log.heading("the guest writes; full backup 0 and bitmap b0 in one transaction")
    guest_writes(vm, [(0, MiB), (0x200000, 0x40000)], 0x11)
    backup_point()
    chain = full_backup(qio, vm, "disk", "disk.qcow2", SIZE, 0,
                        bitmaps=[bitmap_add("disk", "b0", persistent=True)])

    qio.log.heading("the guest writes; incremental backup 1")
    guest_writes(vm, [(0x10000, 0x10000), (0x2F0000, 0x20000)], 0x22)
    backup_point()
    chain = incremental_backup(qio, vm, "disk", "disk.qcow2", SIZE, 1, chain)

    qio.log.heading("the guest writes; incremental backup 2, the guest writing during it")
    guest_writes(vm, [(0x30000, 0x10000), (0x380000, 0x10000)], 0x33)
    backup_point()
    chain = incremental_backup(
        qio, vm, "disk", "disk.qcow2", SIZE, 2, chain,
        during=lambda: guest_writes(vm, [(0x30000, 0x8000), (0x100000, 0x10000)], 0x44))

    qio.log.heading("incremental backup 3: the writes made during backup 2")
    backup_point()
    chain = incremental_backup(qio, vm, "disk", "disk.qcow2", SIZE, 3, chain)
    vm.shutdown()

    qio.log.heading("a guest boots on the restored images and reads them")
    args: list[str] = []
    for n in range(len(sums)):
        node = f"restore{n}"
        args += blockdev(qcow2_node(qio.path(f"restore-backup-{n}.qcow2"), node,
                                    read_only=True))
        args += ["-device", f"virtio-blk-pci,drive={node},id={node},serial={node}"]
    check = qio.vm("restored", args=args, guest=True)
    check.launch()
    for n, expected in enumerate(sums):
        got = check.guest.checksum(0, SIZE, device=f"restore{n}")
        assert got == expected, (f"restore {n}: the guest reads sha256 {got}, but read "
                                 f"{expected} from the source at backup {n}")


@pytest.mark.requires(qmp=["block-dirty-bitmap-add"])
def test_reboot_and_restart(qio: Case) -> None:
    """Guest writes around a guest reboot and a QEMU restart: the persistent bitmap has
    them all, live and on disk."""
    vm = qio.vm_on("disk.qcow2", "disk", create=SIZE, guest=True, launch=True)
    vm.qmp_log("block-dirty-bitmap-add", node="disk", name="b0", persistent=True)
    guest_writes(vm, [(0, 0x1000), (0x150000, 0x20000)], 0x11)
    vm.guest.sync()

    qio.log.heading("the guest reboots (QEMU keeps running) and writes again")
    vm.guest.reboot()
    guest_writes(vm, [(0x80000, 0x200)], 0x22)
    qio.check_live(vm, "disk")

    qio.log.heading("QEMU restarts (the bitmap is stored and loaded) and the guest writes")
    vm.restart()
    qio.show_bitmaps(vm, "disk")
    guest_writes(vm, [(0x3FF000, 0x1000)], 0x33)
    qio.check_live(vm, "disk")
    reads_back(vm, [(0, 0x1000), (0x150000, 0x20000)], 0x11)
    reads_back(vm, [(0x80000, 0x200)], 0x22)
