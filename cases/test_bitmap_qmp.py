"""QMP bitmap commands at their edges, where a crash would take every bitmap with it.

Known QEMU bugs are kept as non-strict xfails restricted to the exception they raise: on a
QEMU that has the bug the test is reported as ``xfail`` with the reason; on one that has it
fixed it reports ``XPASS``; any other failure is a real failure.
"""

from __future__ import annotations

import pytest

from harness.actions import action
from harness.backup import nbd_server_start
from harness.bitmaps import live_bitmaps
from harness.block import blockdev, qcow2_node
from harness.errors import CommandError, MachineExitError
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


def test_add_refusals(qio: Case) -> None:
    """Every way block-dirty-bitmap-add says no, each with its own sentence, and none of
    them leaves a bitmap behind: a raw node and a qcow2 v2 image cannot store a persistent
    bitmap; a 4 TiB disk cannot store one of 512-byte granules (the bitmap would need
    1 GiB; 8 MiB with the default granularity is fine); names over 1023 bytes are
    refused (by the qcow2 rules for a persistent one)."""
    qio.img.create("disk.qcow2", SIZE)
    qio.img.create("v2.qcow2", SIZE, "qcow2", "compat=0.10")
    qio.img.create("huge.qcow2", 4 << 40)
    qio.img.create("disk.raw", SIZE, "raw")
    vm = qio.vm(args=[*blockdev(qcow2_node(qio.path("disk.qcow2"), "drive0")),
                      *blockdev(qcow2_node(qio.path("v2.qcow2"), "v2")),
                      *blockdev(qcow2_node(qio.path("huge.qcow2"), "huge")),
                      *blockdev({"driver": "raw", "node-name": "raw0", "file": {
                          "driver": "file", "filename": str(qio.path("disk.raw"))}})],
                machine_type="none")
    vm.launch()
    vm.qmp_log("block-dirty-bitmap-add", node="drive0", name="a", persistent=True)
    refusals: list[tuple[dict[str, object], str]] = [
        (dict(node="drive0", name=""), "cannot be empty"),
        (dict(node="nosuch", name="b"), "nosuch"),
        (dict(node="drive0", name="b", granularity=1000), "power of 2"),
        (dict(node="drive0", name="b", granularity=256), "at least 512"),
        (dict(node="drive0", name="a"), "already exists"),
        (dict(node="drive0", name="a", persistent=True), "already exists"),
        (dict(node="raw0", name="b", persistent=True), "Can't store persistent bitmaps"),
        (dict(node="v2", name="b", persistent=True), "v2"),
        (dict(node="huge", name="b", granularity=512, persistent=True), "Too much space"),
    ]
    for args, error in refusals:
        vm.qmp_log("block-dirty-bitmap-add", args, expect_error=error)
    for persistent, error in ((False, "name too long"), (True, "exceeds maximum")):
        with pytest.raises(CommandError, match=error) as e:
            vm.qmp("block-dirty-bitmap-add", node="drive0", name="n" * 1024,
                   persistent=persistent)
        qio.log.log(f"block-dirty-bitmap-add of a name of 1024 bytes, persistent="
                    f"{persistent}: {e.value.desc.replace('n' * 1024, 'n...n')}")
    for cmd in ("block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                "block-dirty-bitmap-disable", "block-dirty-bitmap-remove"):
        vm.qmp_log(cmd, node="nosuch", name="a", expect_error="not found")
        vm.qmp_log(cmd, node="drive0", name="nosuch", expect_error="not found")
    # the same bitmaps QEMU can store are accepted: the limits are exactly there
    vm.qmp_log("block-dirty-bitmap-add", node="huge", name="b", persistent=True)
    vm.qmp_log("block-dirty-bitmap-add", node="raw0", name="b")
    names = {node: sorted(b.name for b in live_bitmaps(vm, node))
             for node in ("drive0", "v2", "huge", "raw0")}
    qio.log.log(f"bitmaps now: {names}")
    assert names == {"drive0": ["a"], "v2": [], "huge": ["b"], "raw0": ["b"]}
    vm.qmp_log("block-dirty-bitmap-remove", node="huge", name="b")
    vm.shutdown()
    assert [b.name for b in qio.show_image_bitmaps("disk.qcow2")] == ["a"]
    qio.check_disk("disk.qcow2")


@pytest.mark.requires(node_bitmaps=["block-dirty-bitmap-merge.bitmaps"])
def test_merge_across_nodes(qio: Case) -> None:
    """A source bitmap on another node merges when the disks have the same size; one on a
    disk of another size, or on a node that does not exist, is refused and the target is
    left as it was (the refusal comes after the first source was merged: it is undone)."""
    vm = vm_with_bitmaps(qio)
    for name, size in (("same", SIZE), ("small", SIZE // 2)):
        qio.img.create(f"{name}.qcow2", size)
        vm.qmp_log("blockdev-add", qcow2_node(qio.path(f"{name}.qcow2"), name))
        vm.qmp_log("block-dirty-bitmap-add", node=name, name="s", granularity=512)
        vm.qemu_io(name, "write 0x200000 0x200", log=True)
    before = vm.qmp("x-debug-block-dirty-bitmap-sha256", node="drive0", name="a")
    vm.qmp_log("block-dirty-bitmap-merge", node="drive0", target="a",
               bitmaps=["fine", {"node": "small", "name": "s"}],
               expect_error="different sizes")
    vm.qmp_log("block-dirty-bitmap-merge", node="drive0", target="a",
               bitmaps=["fine", {"node": "nosuch", "name": "s"}], expect_error="not found")
    vm.qmp_log("block-dirty-bitmap-merge", node="drive0", target="a",
               bitmaps=[{"node": "same", "name": "nosuch"}], expect_error="not found")
    after = vm.qmp("x-debug-block-dirty-bitmap-sha256", node="drive0", name="a")
    assert after == before, "a refused merge changed its target"
    vm.qmp_log("block-dirty-bitmap-merge", node="drive0", target="a",
               bitmaps=[{"node": "same", "name": "s"}])
    qio.check_live(vm, "drive0")
    states = {b.name: b.count for b in qio.show_bitmaps(vm, "drive0")}
    assert states == {"a": 0x20000, "fine": 0x1000}


def stored_b0(qio: Case, read_only: bool = False) -> VM:
    """disk.qcow2 with persistent b0 stored in it (so QEMU loads it from the image: the
    qcow2 driver then checks it on resize and on reopen) and dirty at 0x10000."""
    qio.img.create("disk.qcow2", SIZE)
    qio.img.run("bitmap", "--add", "disk.qcow2", "b0", log=True)
    qio.img.run("bitmap", "--add", "disk.qcow2", "other", log=True)
    qio.img.run("bitmap", "--disable", "disk.qcow2", "other", log=True)
    qio.io.run("-f", "qcow2", "-c", "write 0x10000 0x1000", "disk.qcow2", log=True)
    return qio.vm_on("disk.qcow2", read_only=read_only, launch=True)


@pytest.mark.requires(qmp=["nbd-server-start", "block-export-add"],
                      args=["block-export-add.bitmaps"])
def test_busy_bitmap_refusals(qio: Case) -> None:
    """A bitmap an NBD export offers to its clients is busy: nothing may change its bits
    or its life under a client reading it. Every command that would is refused with the
    same sentence, the disk cannot be resized (the export does not share that), and when
    the export is gone the bitmap is usable again and holds what it held."""
    vm = stored_b0(qio)
    vm.qmp_log("block-dirty-bitmap-disable", node="drive0", name="b0")
    nbd_server_start(vm, vm.socket_path.parent / "busy.nbd")
    vm.qmp_log("block-export-add", type="nbd", id="exp0", node_name="drive0",
               bitmaps=["b0"])
    (b0, _) = qio.show_bitmaps(vm, "drive0", hashes=False)
    assert b0.busy
    busy = "in use by another operation"
    for cmd in ("block-dirty-bitmap-enable", "block-dirty-bitmap-disable",
                "block-dirty-bitmap-clear", "block-dirty-bitmap-remove"):
        vm.qmp_log(cmd, node="drive0", name="b0", expect_error=busy)
    vm.qmp_log("block-dirty-bitmap-merge", node="drive0", target="b0", bitmaps=["other"],
               expect_error=busy)
    vm.qmp_log("block-dirty-bitmap-merge", node="drive0", target="other", bitmaps=["b0"],
               expect_error=busy)
    vm.qmp_log("transaction", actions=[
        action("block-dirty-bitmap-clear", node="drive0", name="other"),
        action("block-dirty-bitmap-remove", node="drive0", name="b0")], expect_error=busy)
    vm.qmp_log("block_resize", node_name="drive0", size=SIZE * 2, expect_error="resize")
    vm.qmp_log("block-export-del", id="exp0")
    vm.event_wait("BLOCK_EXPORT_DELETED", timeout=30.0)
    vm.qmp_log("nbd-server-stop")
    vm.qmp_log("block-dirty-bitmap-enable", node="drive0", name="b0")
    vm.qmp_log("block_resize", node_name="drive0", size=SIZE * 2)
    vm.qemu_io("drive0", f"write {SIZE + 0x10000:#x} 0x1000", log=True)
    states = {b.name: (b.count, b.busy) for b in qio.show_bitmaps(vm, "drive0")}
    assert states == {"b0": (0x20000, False), "other": (0, False)}


def test_read_only_bitmap_refusals(qio: Case) -> None:
    """On a read-only node the stored bitmaps are read-only: what would change the image
    (remove, clear, merge into) is refused; enable and disable only change QEMU's RAM and
    are allowed. A bitmap disabled there stays disabled through a read-write reopen and
    is stored without ``auto``: a write after the reopen is not in it."""
    vm = stored_b0(qio, read_only=True)
    ro = "readonly"
    vm.qmp_log("block-dirty-bitmap-remove", node="drive0", name="b0", expect_error=ro)
    vm.qmp_log("block-dirty-bitmap-clear", node="drive0", name="b0", expect_error=ro)
    vm.qmp_log("block-dirty-bitmap-merge", node="drive0", target="other", bitmaps=["b0"],
               expect_error=ro)
    vm.qmp_log("transaction", actions=[
        action("block-dirty-bitmap-remove", node="drive0", name="b0")], expect_error=ro)
    vm.qmp_log("block-dirty-bitmap-disable", node="drive0", name="b0")
    vm.qmp_log("block-dirty-bitmap-enable", node="drive0", name="other")
    qio.show_bitmaps(vm, "drive0", hashes=False)
    vm.blockdev_reopen(qcow2_node(qio.path("disk.qcow2"), "drive0"))
    qio.show_image_bitmaps("disk.qcow2", force_share=True)
    vm.qemu_io("drive0", "write 0x200000 0x1000", log=True)
    states = {b.name: (b.count, b.recording) for b in qio.show_bitmaps(vm, "drive0")}
    assert states == {"b0": (0x10000, False), "other": (0x10000, True)}
    vm.shutdown()
    flags = {b.name: "auto" in b.flags for b in qio.show_image_bitmaps("disk.qcow2")}
    assert flags == {"b0": False, "other": True}


def test_transaction_remove(qio: Case) -> None:
    """block-dirty-bitmap-remove inside a transaction that commits: the persistent bitmap
    is gone from RAM and from the image; the other action took effect too."""
    vm = stored_b0(qio)
    vm.qmp_log("transaction", actions=[
        action("block-dirty-bitmap-remove", node="drive0", name="b0"),
        action("block-dirty-bitmap-clear", node="drive0", name="other")])
    assert [b.name for b in qio.show_bitmaps(vm, "drive0", hashes=False)] == ["other"]
    assert [b.name for b in qio.show_image_bitmaps("disk.qcow2", force_share=True)] == [
        "other"]
    vm.shutdown()
    assert [b.name for b in qio.show_image_bitmaps("disk.qcow2")] == ["other"]


@pytest.mark.xfail(raises=AssertionError, strict=False, reason=(
    "QEMU bug seen in 7.2.22 and 10.0.2: block-dirty-bitmap-remove in a transaction "
    "deletes a persistent bitmap from the image in its prepare step "
    "(block_dirty_bitmap_remove -> bdrv_remove_persistent_dirty_bitmap); when another "
    "action fails, the abort puts the bitmap back in RAM only, so the failed transaction "
    "did change the image: a crash before the next store loses the bitmap the user was "
    "told still exists (a clean close stores it again)"))
def test_failed_transaction_keeps_removed_bitmap_on_disk(qio: Case) -> None:
    vm = stored_b0(qio)
    vm.qmp_log("transaction", actions=[
        action("block-dirty-bitmap-remove", node="drive0", name="b0"),
        action("block-dirty-bitmap-clear", node="drive0", name="nosuch")],
        expect_error="not found")
    assert [b.name for b in qio.show_bitmaps(vm, "drive0", hashes=False)] == ["b0", "other"]
    on_disk = [b.name for b in qio.show_image_bitmaps("disk.qcow2", force_share=True)]
    assert on_disk == ["b0", "other"], f"a failed transaction removed b0 from the " \
        f"image: it holds {on_disk}"


def test_remove_persistent_bitmap_never_stored(qio: Case) -> None:
    """A persistent bitmap added since the open is not in the image yet: removing it must
    succeed and leave the image's other bitmaps exactly as they are."""
    vm = stored_b0(qio)
    vm.qmp_log("block-dirty-bitmap-add", node="drive0", name="new", persistent=True)
    vm.qmp_log("block-dirty-bitmap-remove", node="drive0", name="new")
    assert [b.name for b in qio.show_image_bitmaps("disk.qcow2", force_share=True)] == [
        "b0", "other"]
    vm.shutdown()
    assert [b.name for b in qio.show_image_bitmaps("disk.qcow2")] == ["b0", "other"]
