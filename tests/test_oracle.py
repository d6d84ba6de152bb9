"""The oracle against real QEMU, including the proof that it can fail.

Writes are hidden from a bitmap on purpose (disabled over QMP without telling the model,
cleared offline with qemu-img): the checks must fail and name the missing ranges.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.bitmaps import live_bitmaps, live_ranges, ranges_count, ranges_sha256, sha256
from harness.errors import MachineExitError, OracleFailure, QMPError
from harness.machine import Machine, blockdev, qcow2_node
from harness.session import Case, Environment

MiB = 1 << 20


@pytest.fixture(scope="module")
def env() -> Environment:
    return Environment.discover({}, None, "tcg", os.environ)


@pytest.fixture
def case(env: Environment, tmp_path: Path) -> Iterator[Case]:
    c = Case(env, tmp_path)
    yield c
    assert c.close(failed=False) == []


def start(case: Case) -> Machine:
    case.img.create("disk.qcow2", 8 * MiB)
    case.model.node("drive0", 8 * MiB)
    vm = case.vm(args=blockdev(qcow2_node(case.path("disk.qcow2"), "drive0")),
                 machine_type="none")
    vm.launch()
    vm.qmp("block-dirty-bitmap-add", node="drive0", name="b", persistent=True)
    case.model.add_bitmap("drive0", "b", persistent=True)
    return vm


def test_complete_bitmap_passes_live_and_on_disk(case: Case) -> None:
    vm = start(case)
    case.write(vm, "drive0", 0x10000, 0x1000)
    case.write(vm, "drive0", 0x7F0000, 0x10000)
    (v,) = case.check_live(vm, "drive0")
    assert list(v.actual) == [(0x10000, 0x10000), (0x7F0000, 0x10000)]
    vm.shutdown()
    (d,) = case.check_disk("disk.qcow2", "drive0")
    assert d.actual == v.actual


def test_write_hidden_by_disable_is_caught_live_and_on_disk(case: Case) -> None:
    vm = start(case)
    case.write(vm, "drive0", 0, 0x1000)
    vm.qmp("block-dirty-bitmap-disable", node="drive0", name="b")
    case.write(vm, "drive0", 0x300000, 0x20000)
    with pytest.raises(OracleFailure, match=r"missing \[0x300000\+0x20000\]"):
        case.check_live(vm, "drive0")
    vm.shutdown()
    with pytest.raises(OracleFailure, match=r"on disk.*missing \[0x300000\+0x20000\]"):
        case.check_disk("disk.qcow2", "drive0")


def test_offline_clear_is_caught(case: Case) -> None:
    vm = start(case)
    case.write(vm, "drive0", 0x100000, 0x800)
    vm.shutdown()
    case.check_disk("disk.qcow2", "drive0")
    case.img.run("bitmap", "--clear", "disk.qcow2", "b")
    with pytest.raises(OracleFailure, match=r"missing \[0x100000\+0x10000\] \(65536 bytes\)"):
        case.check_disk("disk.qcow2", "drive0")


def test_crash_leaves_bitmap_inconsistent_not_incomplete(case: Case) -> None:
    vm = start(case)
    vm.shutdown()
    vm.launch()
    case.write(vm, "drive0", 0, 0x1000)
    vm.kill()
    (v,) = case.check_disk("disk.qcow2", "drive0")
    assert v.inconsistent and v.ok


def test_removed_bitmap_is_reported(case: Case) -> None:
    vm = start(case)
    vm.qmp("block-dirty-bitmap-remove", node="drive0", name="b")
    with pytest.raises(OracleFailure, match=r"'b' on 'drive0' .* is gone"):
        case.check_live(vm, "drive0")


def test_views_must_agree(case: Case) -> None:
    """check_live cross-checks count and sha256 against the NBD ranges; a count that
    disagrees (as a broken QEMU or a broken NBD view would give) fails."""
    vm = start(case)
    case.write(vm, "drive0", 0x20000, 0x20001)
    (b,) = live_bitmaps(vm, "drive0")
    ranges = live_ranges(vm, "drive0", "b", case.img)
    assert ranges == [(0x20000, 0x30000)]
    assert ranges_count(ranges, b.granularity) == b.count == 0x30000
    assert ranges_sha256(ranges, b.granularity, 8 * MiB) == sha256(vm, "drive0", "b")
    assert ranges_sha256(ranges[:0], b.granularity, 8 * MiB) != sha256(vm, "drive0", "b")
    wrong = dataclasses.replace(b, count=b.count - 0x10000)
    with pytest.raises(OracleFailure, match="views disagree: count 131072"):
        case._views_agree(vm, "drive0", wrong, ranges, "test")


class _KillingImg:
    """qemu-img that kills the VM (SIGKILL, unasked) just before it reads the NBD view,
    as when QEMU crashes while the oracle reads a bitmap."""

    def __init__(self, case: Case, vm: Machine) -> None:
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
    with pytest.raises(QMPError, match="no-such"):
        vm.undo("block-dirty-bitmap-remove", node="drive0", name="no-such")
    vm.shutdown()
    vm.undo("block-dirty-bitmap-remove", node="drive0", name="b")  # stopped: nothing to undo
