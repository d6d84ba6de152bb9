"""The oracle against real QEMU, including the proof that it can fail.

The oracle follows every command a case sends, so to hide writes from a bitmap on purpose
these tests go around it: a disable sent on the raw QMP channel (``Machine.execute``,
which the oracle does not see), a clear done offline behind its back. The checks must
then fail and name the missing ranges. Also: a command the oracle cannot model is
refused with one sentence before QEMU sees it, and a command QEMU refuses leaves the
model as it was.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest

from harness.actions import writes
from harness.bitmaps import live_bitmaps, live_ranges, ranges_count, ranges_sha256, sha256
from harness.block import blockdev, qcow2_node
from harness.errors import CommandError, MachineExitError, OracleFailure, UnmodelledCommand
from harness.session import Case
from harness.tools import QemuImg
from harness.vm import VM

MiB = 1 << 20


def start(case: Case) -> VM:
    case.img.create("disk.qcow2", 8 * MiB)
    vm = case.vm(args=blockdev(qcow2_node(case.path("disk.qcow2"), "drive0")),
                 machine_type="none")
    vm.launch()
    vm.qmp("block-dirty-bitmap-add", node="drive0", name="b", persistent=True)
    return vm


def write(vm: VM, offset: int, length: int) -> None:
    writes(vm, "drive0", [(offset, length)])


def test_complete_bitmap_passes_live_and_on_disk(case: Case) -> None:
    vm = start(case)
    write(vm, 0x10000, 0x1000)
    write(vm, 0x7F0000, 0x10000)
    (v,) = case.check_live(vm, "drive0")
    assert list(v.actual) == [(0x10000, 0x10000), (0x7F0000, 0x10000)]
    vm.shutdown()
    (d,) = case.check_disk("disk.qcow2")
    assert d.actual == v.actual


def test_write_hidden_by_disable_is_caught_live_and_on_disk(case: Case) -> None:
    vm = start(case)
    write(vm, 0, 0x1000)
    vm.execute("block-dirty-bitmap-disable", {"node": "drive0", "name": "b"})
    write(vm, 0x300000, 0x20000)
    with pytest.raises(OracleFailure, match=r"missing \[0x300000\+0x20000\]"):
        case.check_live(vm, "drive0")
    with pytest.raises(OracleFailure, match=r"before shutdown.*missing \[0x300000\+0x20000\]"):
        vm.shutdown()  # the automatic check before the shutdown fails, QEMU stays up
    with pytest.raises(OracleFailure, match=r"after shutdown.*missing \[0x300000\+0x20000\]"):
        vm.shutdown(check=False)  # QEMU stops; the automatic on-disk check fails
    with pytest.raises(OracleFailure, match=r"on disk.*missing \[0x300000\+0x20000\]"):
        case.check_disk("disk.qcow2")


def test_offline_clear_is_caught(case: Case) -> None:
    vm = start(case)
    write(vm, 0x100000, 0x800)
    vm.shutdown()
    case.check_disk("disk.qcow2")
    # behind the oracle's back: qemu-img not through the case's tool object
    QemuImg(case.img.path, case.scratch).run("bitmap", "--clear", "disk.qcow2", "b")
    with pytest.raises(OracleFailure, match=r"missing \[0x100000\+0x10000\] \(65536 bytes\)"):
        case.check_disk("disk.qcow2")


def test_crash_leaves_bitmap_inconsistent_not_incomplete(case: Case) -> None:
    vm = start(case)
    vm.shutdown()
    vm.launch()
    write(vm, 0, 0x1000)
    vm.kill()
    (v,) = case.check_disk("disk.qcow2")
    assert v.inconsistent and v.ok


def test_removed_bitmap_is_reported(case: Case) -> None:
    vm = start(case)
    vm.execute("block-dirty-bitmap-remove", {"node": "drive0", "name": "b"})
    with pytest.raises(OracleFailure, match=r"'b' on 'drive0' .* is gone"):
        case.check_live(vm, "drive0")
    vm.kill()


def test_views_must_agree(case: Case) -> None:
    """check_live cross-checks count and sha256 against the NBD ranges; a count that
    disagrees (as a broken QEMU or a broken NBD view would give) fails."""
    vm = start(case)
    write(vm, 0x20000, 0x20001)
    (b,) = live_bitmaps(vm, "drive0")
    ranges = live_ranges(vm, "drive0", "b", case.img)
    assert ranges == [(0x20000, 0x30000)]
    assert ranges_count(ranges, b.granularity) == b.count == 0x30000
    assert ranges_sha256(ranges, b.granularity, 8 * MiB) == sha256(vm, "drive0", "b")
    assert ranges_sha256(ranges[:0], b.granularity, 8 * MiB) != sha256(vm, "drive0", "b")
    wrong = dataclasses.replace(b, count=b.count - 0x10000)
    node = case.oracle.model(vm).nodes["drive0"]
    with pytest.raises(OracleFailure, match="views disagree: count 131072"):
        case.oracle._views_agree(vm, node, "b", wrong.count, b.granularity, ranges, "test")
    vm.shutdown()


class _KillingImg:
    """qemu-img that kills the VM (SIGKILL, unasked) just before it reads the NBD view,
    as when QEMU crashes while the oracle reads a bitmap."""

    def __init__(self, case: Case, vm: VM) -> None:
        self.case, self.vm = case, vm

    def json(self, *args: str) -> object:
        assert self.vm.pid is not None
        os.kill(self.vm.pid, signal.SIGKILL)
        os.waitid(os.P_PID, self.vm.pid, os.WEXITED | os.WNOWAIT)
        return self.case.img.json(*args)


def test_death_during_live_ranges_is_reported_as_the_death(case: Case) -> None:
    """The cleanups in live_ranges must not raise "is not running" over QEMU's death."""
    vm = start(case)
    with pytest.raises(MachineExitError) as info:
        live_ranges(vm, "drive0", "b", _KillingImg(case, vm))  # type: ignore[arg-type]
    assert "killed by SIGKILL" in str(info.value)
    assert "died when the case did not ask it to" in str(info.value)
    assert vm.state == "stopped"


def test_undo_keeps_the_error_on_its_way_out(case: Case) -> None:
    """An undo that QEMU refuses while another error propagates leaves that error."""
    vm = start(case)
    with pytest.raises(OracleFailure, match="the body"):
        try:
            raise OracleFailure("the body")
        finally:
            vm.undo("block-dirty-bitmap-remove", node="drive0", name="no-such")
    with pytest.raises(CommandError, match="no-such"):
        vm.undo("block-dirty-bitmap-remove", node="drive0", name="no-such")
    vm.shutdown()
    vm.undo("block-dirty-bitmap-remove", node="drive0", name="b")  # stopped: nothing to undo


def test_an_unmodelled_command_fails_with_one_sentence_before_qemu_sees_it(
        case: Case) -> None:
    """block-stream copies data into a node; the oracle does not model it."""
    vm = start(case)
    with pytest.raises(UnmodelledCommand) as err:
        vm.qmp("block-stream", job_id="stream0", device="drive0")
    message = str(err.value)
    assert "\n" not in message and message.startswith("block-stream (vm 'vm0')"), message
    assert vm.qmp("query-jobs") == [], "QEMU got the command anyway"
    with pytest.raises(UnmodelledCommand, match=r"^HMP command 'commit drive0'"):
        vm.hmp("commit drive0")
    with pytest.raises(UnmodelledCommand, match=r"^qemu-io command 'truncate 0'"):
        vm.qemu_io("drive0", "truncate 0")
    vm.shutdown()


def test_a_refused_command_leaves_the_model_unchanged(case: Case) -> None:
    """QEMU refuses a merge from an unknown bitmap (and a remove on a read-only node):
    the model must not apply them, so the later checks still require what it had."""
    vm = start(case)
    write(vm, 0x10000, 0x1000)
    vm.qmp("block-dirty-bitmap-add", node="drive0", name="empty", disabled=True)
    with pytest.raises(CommandError, match="not found"):
        vm.qmp("block-dirty-bitmap-merge", node="drive0", target="empty",
               bitmaps=["b", "nosuch"])
    model = case.oracle.model(vm)
    assert not model.bitmap("drive0", "empty").seen, "a refused merge reached the model"
    vm.blockdev_reopen(qcow2_node(case.path("disk.qcow2"), "drive0", read_only=True),
                       log=False)
    with pytest.raises(CommandError, match="readonly"):
        vm.qmp("block-dirty-bitmap-remove", node="drive0", name="b")
    assert "b" in model.nodes["drive0"].bitmaps, "a refused remove reached the model"
    (v, _) = case.check_live(vm, "drive0")
    assert list(v.required) == [(0x10000, 0x10000)]
    vm.shutdown()


def test_writes_through_a_device_land_in_the_active_layer(case: Case) -> None:
    """The oracle follows the graph: after a snapshot the device writes into the overlay,
    and its bitmaps, not the base's, must have the write."""
    case.img.create("base.qcow2", 8 * MiB)
    vm = case.vm(args=[*blockdev(qcow2_node(case.path("base.qcow2"), "base")),
                       "-device", "virtio-blk-pci,drive=base,id=disk0"])
    vm.launch()
    vm.qmp("block-dirty-bitmap-add", node="base", name="b")
    writes(vm, "disk0/virtio-backend", [(0, 0x1000)], device=True)
    vm.qmp("blockdev-snapshot-sync", node_name="base", snapshot_file=str(case.path("top.qcow2")),
           snapshot_node_name="top", format="qcow2")
    vm.qmp("block-dirty-bitmap-add", node="top", name="t")
    writes(vm, "disk0/virtio-backend", [(0x100000, 0x1000)], device=True)
    (vb,) = case.check_live(vm, "base")
    (vt,) = case.check_live(vm, "top")
    assert list(vb.required) == [(0, 0x10000)] and list(vt.required) == [(0x100000, 0x10000)]
    vm.shutdown()


def test_a_change_in_ram_on_a_read_only_node_is_not_on_disk_after_a_crash(
        case: Case) -> None:
    """QEMU lets a read-only bitmap be disabled or enabled, in RAM only: the image keeps
    the state stored when the node went read-only, which is what loads after a crash."""
    vm = start(case)
    vm.blockdev_reopen(qcow2_node(case.path("disk.qcow2"), "drive0", read_only=True))
    vm.qmp("block-dirty-bitmap-disable", node="drive0", name="b")
    vm.kill()
    vm.launch()
    [v] = case.check_live(vm, "drive0")
    assert v.ok and not v.inconsistent
    assert case.oracle.model(vm).bitmap("drive0", "b").recording
    vm.shutdown()


def test_a_bitmap_loaded_inconsistent_stays_in_use_after_a_clean_quit(case: Case) -> None:
    """QEMU never stores a bitmap it loaded inconsistent: it stays in use in the image,
    so ``convert --skip-broken-bitmaps`` leaves it behind."""
    vm = start(case)
    write(vm, 0, 0x1000)
    vm.restart()  # b is stored, and in use again while QEMU runs
    vm.kill()
    vm.launch()   # b loads inconsistent
    vm.shutdown()
    assert case.oracle.image("disk.qcow2").in_use == {"b"}
    case.img.run("convert", "-O", "qcow2", "--bitmaps", "--skip-broken-bitmaps",
                 "disk.qcow2", "copy.qcow2")
    assert case.oracle.image("copy.qcow2").bitmaps == {}
    assert case.check_disk("copy.qcow2") == []


def test_a_discard_on_a_fleecing_view_does_not_reach_the_disk(case: Case) -> None:
    """A discard sent to a ``snapshot-access`` node drops that area from the view (and
    discards the copy in the fleecing image); the disk under the filter is not touched,
    so its bitmap stays clean, exactly."""
    case.img.create("disk.qcow2", 8 * MiB)
    case.img.create("fleece.qcow2", 8 * MiB)
    vm = case.vm(args=blockdev(qcow2_node(case.path("disk.qcow2"), "drive0", discard="unmap")),
                 machine_type="none")
    vm.launch()
    vm.qmp("block-dirty-bitmap-add", node="drive0", name="b")
    vm.qmp("blockdev-add", qcow2_node(case.path("fleece.qcow2"), "fleece", backing=None,
                                      discard="unmap"))
    vm.qmp("blockdev-add", driver="copy-before-write", node_name="cbw", file="drive0",
           target="fleece", discard="unmap")
    vm.qmp("blockdev-add", driver="snapshot-access", node_name="view", file="cbw",
           discard="unmap")
    vm.qemu_io("view", "discard 0 0x10000")
    case.oracle.check_exact(vm, "drive0", ["b"], "after a discard on the view")
    vm.qemu_io("cbw", "discard 0x100000 0x10000")  # through the filter: it reaches the disk
    (v,) = case.oracle.check_exact(vm, "drive0", ["b"], "after a discard through the filter")
    assert list(v.actual) == [(0x100000, 0x10000)]
    vm.shutdown()
