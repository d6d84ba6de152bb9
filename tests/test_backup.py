"""harness.backup and the model's bitmap-mode rules, including proof that they can fail.

The model rules are checked on their own (no QEMU). The restore check and the exact
bitmap check run against real QEMU: a backup chain that restores correctly, then the
same chain with one cluster of the incremental overwritten (the restore check must name
its offset), a restored image with one sector changed, a bitmap clear the model was not
told about (missing ranges) and one it was told about wrongly (extra ranges).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from harness.actions import writes
from harness.backup import (
    Chain,
    Reference,
    compare,
    completed_job_size,
    create_target,
    expect_incomplete,
    failed_job_progress,
    received,
    reference,
    restore,
    target_node,
    verify_restore,
)
from harness.block import blockdev, qcow2_node
from harness.errors import ModelError, OracleFailure, RestoreMismatch
from harness.model import Extents, Model, SyncBitmapJob
from harness.session import Case
from harness.vm import VM

MiB = 1 << 20
SIZE = 4 * MiB
G = 0x10000


# -- the model's bitmap-mode rules (no QEMU) ----------------------------------------------


def model_with_job() -> tuple[Model, SyncBitmapJob]:
    m = Model()
    m.node("n", SIZE)
    m.add_bitmap("n", "b")
    m.write("n", 0x8000, 0x10000)          # granules 0x0 and 0x10000
    m.write("n", 0x200000, 0x200)          # granule 0x200000
    job = m.backup_begin("n", "b")
    m.write("n", 0x300000, 0x200)          # during the job: granule 0x300000
    return m, job


def dirty(m: Model) -> list[tuple[int, int]]:
    return list(m.bitmap("n", "b").required(SIZE))


START = [(0x0, 0x20000), (0x200000, G)]


@pytest.mark.parametrize("mode", ["on-success", "incremental", "always"])
def test_success_clears_the_bits_at_start_keeps_writes_during(mode: str) -> None:
    m, job = model_with_job()
    m.backup_end(job, mode, True)
    assert dirty(m) == [(0x300000, G)]


@pytest.mark.parametrize("mode,succeeded", [
    ("never", True), ("never", False), ("on-success", False), ("incremental", False),
])
def test_unchanged_outcomes_keep_start_and_writes_during(mode: str, succeeded: bool) -> None:
    m, job = model_with_job()
    m.backup_end(job, mode, succeeded)
    assert dirty(m) == [*START, (0x300000, G)]


def test_always_after_failure_keeps_what_the_target_did_not_receive() -> None:
    m, job = model_with_job()
    # the target got granule 0x0 whole and half of 0x10000: the half granule stays dirty
    m.backup_end(job, "always", False, Extents([(0x0, G + 0x8000)]))
    assert dirty(m) == [(0x10000, G), (0x200000, G), (0x300000, G)]


def test_always_after_failure_needs_the_received_extents() -> None:
    m, job = model_with_job()
    with pytest.raises(ModelError, match="needs the extents"):
        m.backup_end(job, "always", False)


def test_a_forgotten_backup_end_makes_the_oracle_stricter() -> None:
    m, _job = model_with_job()
    # the bitmap still requires its bits and the job-time write ...
    assert dirty(m) == [*START, (0x300000, G)]
    # ... and the leftover successor is a bitmap QEMU will not have after the job
    assert "b (successor during a backup job)" in m.nodes["n"].bitmaps


def test_unknown_mode_is_refused() -> None:
    m, job = model_with_job()
    with pytest.raises(ModelError, match="unknown bitmap-mode"):
        m.backup_end(job, "sometimes", True)


def test_disabled_sync_bitmap_gains_nothing_during_the_job() -> None:
    m = Model()
    m.node("n", SIZE)
    m.add_bitmap("n", "b", recording=False)
    job = m.backup_begin("n", "b")
    m.write("n", 0, 1)
    m.backup_end(job, "never", True)
    assert not m.bitmap("n", "b").required(SIZE)


# -- filters and chains ---------------------------------------------------------------------


def test_failed_job_progress_hides_only_a_failed_jobs_offset() -> None:
    failed = ('{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "j", "error": "Input/output '
              'error", "len": 393216, "offset": 262144, "speed": 0, "type": "backup"}}')
    ok = ('{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "j", "len": 393216, '
          '"offset": 393216, "speed": 0, "type": "backup"}}')
    assert '"offset": "PROGRESS"' in failed_job_progress(failed)
    assert '"len": 393216' in failed_job_progress(failed)
    assert failed_job_progress(ok) == ok


def test_completed_job_size_only_for_that_job_and_only_when_finished() -> None:
    f = completed_job_size("backup2")
    done = ('{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "backup2", "len": 524288, '
            '"offset": 524288, "speed": 0, "type": "backup"}}')
    assert '"len": "SIZE", "offset": "SIZE"' in f(done)
    short = done.replace('"offset": 524288', '"offset": 65536')
    assert f(short) == short
    other = done.replace("backup2", "backup1")
    assert f(other) == other


def test_chain_description() -> None:
    c = Chain(("full.qcow2",)).then("inc1.qcow2", partial=True).then("inc2.qcow2")
    assert c.describe() == "full <- inc1 (partial) <- inc2"
    assert c.top == "inc2.qcow2"


# -- against real QEMU ----------------------------------------------------------------------


@dataclass
class Setup:
    vm: VM
    chain: Chain
    ref: Reference


def one_incremental(case: Case, mode: str = "on-success", seen: bool = True) -> Setup:
    """src with data; full backup; bitmap b; writes; one incremental into inc1.qcow2.

    With ``seen=False`` the incremental is sent on the raw QMP channel, so the oracle
    never learns that the job cleared b."""
    case.img.create("src.qcow2", SIZE)
    vm = case.vm(args=blockdev(qcow2_node(case.path("src.qcow2"), "drive0")),
                 machine_type="none")
    vm.launch()
    writes(vm, "drive0", [(0, MiB)], 0x11)
    create_target(case.img, "full.qcow2", SIZE)
    vm.qmp("blockdev-add", target_node(case.path("full.qcow2"), "full"))
    vm.qmp("transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "b"}},
        {"type": "blockdev-backup", "data": {"job-id": "j0", "device": "drive0",
                                             "target": "full", "sync": "full",
                                             "auto-dismiss": False}}])
    assert vm.run_job("j0", log=False) is None
    vm.qmp("blockdev-del", node_name="full")
    writes(vm, "drive0", [(0x208000, 0x10000), (0x3F0000, 0x200)], 0x22)
    ref = reference(case, vm, "drive0", "src.qcow2", 1)
    create_target(case.img, "inc1.qcow2", SIZE, backing="full.qcow2")
    vm.qmp("blockdev-add", target_node(case.path("inc1.qcow2"), "inc1"))
    args = {"job-id": "j1", "device": "drive0", "target": "inc1", "sync": "bitmap",
            "bitmap": "b", "bitmap-mode": mode, "auto-dismiss": False}
    if seen:
        vm.qmp("blockdev-backup", args)
    else:
        assert "return" in vm.execute("blockdev-backup", args)
    assert vm.run_job("j1", log=False) is None
    vm.qmp("blockdev-del", node_name="inc1")
    return Setup(vm, Chain(("full.qcow2", "inc1.qcow2")), ref)


def test_restore_check_passes_then_catches_one_corrupted_cluster(case: Case) -> None:
    s = one_incremental(case)
    verify_restore(case, s.chain, s.ref, "backup-1")
    assert case.log.text().splitlines()[-1] == (
        "restore backup-1 (full <- inc1): identical to the source at backup 1")
    assert received(case.img, "inc1.qcow2") == Extents([(0x200000, 0x20000),
                                                        (0x3F0000, 0x10000)])
    # one cluster of the incremental is overwritten: the restore must differ exactly there
    case.io.io("inc1.qcow2", "write -P 0xee 0x210000 0x10000")
    with pytest.raises(RestoreMismatch) as err:
        verify_restore(case, s.chain, s.ref, "backup-1")
    msg = str(err.value)
    assert "mismatch at offset 0x210000" in msg
    assert "differing ranges [0x210000+0x10000] (65536 bytes)" in msg
    assert "full.qcow2 <- inc1.qcow2" in msg


def test_a_cluster_lost_from_the_incremental_is_caught(case: Case) -> None:
    """An incremental that lost a cluster it held (discarded: it now reads as zeroes,
    qcow2 does not let the backing file show through): the restore check names it."""
    s = one_incremental(case)
    case.io.io("inc1.qcow2", "discard 0x3f0000 0x10000")
    with pytest.raises(RestoreMismatch, match=r"offset 0x3f0000"):
        verify_restore(case, s.chain, s.ref, "backup-1")


def test_compare_lists_a_changed_sector_of_a_restored_image(case: Case) -> None:
    s = one_incremental(case)
    restored = restore(case, s.chain, "backup-1")
    assert compare(case.img, restored, s.ref.image).identical
    case.io.io(restored, "write -P 0xee 0x210400 0x200")
    cmp = compare(case.img, restored, s.ref.image)
    assert not cmp.identical
    assert cmp.first_offset == 0x210400
    assert cmp.differing == Extents([(0x210400, 0x200)])


def test_expect_incomplete_refuses_a_complete_chain(case: Case) -> None:
    s = one_incremental(case)
    with pytest.raises(RestoreMismatch, match=r"identical .* although its job did not finish"):
        expect_incomplete(case, s.chain, s.ref, "backup-1")


def test_a_clear_the_model_was_not_told_about_is_caught(case: Case) -> None:
    """The job cleared b (on-success), but the model still requires the old bits."""
    s = one_incremental(case, seen=False)
    with pytest.raises(OracleFailure, match=r"missing \[0x200000\+0x20000, 0x3f0000\+0x10000\]"):
        case.oracle.check_exact(s.vm, "drive0", ["b"], "after backup 1")
    s.vm.kill()


def test_a_clear_that_did_not_happen_is_caught(case: Case) -> None:
    """The job ran with bitmap-mode=never, but the model is made to believe the bits were
    cleared (an explicit edit of the model): QEMU's bitmap keeps bits the model says
    were cleared; the exact check fails on the extras."""
    s = one_incremental(case, mode="never")
    case.oracle.model(s.vm).clear("drive0", "b")
    with pytest.raises(OracleFailure, match=r"model says are clean \(a backup cleared them, "
                                            r"or the image never held them\): extra "
                                            r"\[0x200000\+0x20000, 0x3f0000\+0x10000\]"):
        case.oracle.check_exact(s.vm, "drive0", ["b"], "after backup 1")
    s.vm.kill()


def test_summary_mode_checks_the_same_and_hides_ranges(case: Case) -> None:
    s = one_incremental(case, seen=False)
    case.oracle.ranges_vary(s.vm, "drive0", "b", "they vary")
    with pytest.raises(OracleFailure, match=r"missing \[0x200000\+0x20000"):
        case.oracle.check_exact(s.vm, "drive0", ["b"], "after backup 1")
    s.vm.kill()
    assert case.log.text().splitlines()[-1] == (
        "oracle (after backup 1): drive0/b: INCOMPLETE (they vary)")
