"""Bitmap migration as the oracle models it: the pure rules, then the oracle on real QEMU.

The rules (harness/migration.py) on their own: names and aliases, persistence and its
transforms, nodes that cannot migrate. Then two QEMU processes: a write hidden from the
oracle on the source (a disable sent on the raw channel) must be caught on the
destination, and what the oracle cannot follow is refused before QEMU sees it.
"""

from __future__ import annotations

import pytest

from harness.actions import writes
from harness.block import blockdev, qcow2_node
from harness.errors import OracleFailure, UnmodelledCommand
from harness.migration import Sent, received, to_send, uri_of
from harness.model import Extents, ModelBitmap
from harness.session import Case
from harness.vm import VM

MiB = 1 << 20


def bitmap(name: str, persistent: bool = False, recording: bool = True) -> ModelBitmap:
    return ModelBitmap(name, 65536, recording, persistent, Extents([(0, 0x1000)]))


def test_every_named_bitmap_travels_under_its_own_names() -> None:
    nodes = {"drive0": {"a": bitmap("a", True), "b": bitmap("b", recording=False)},
             "#block123": {"c": bitmap("c")}, "empty": {}}
    sent = to_send(nodes, None)
    assert [(s.node, s.name, s.persistent) for s in sent] == [
        ("drive0", "a", True), ("drive0", "b", False)]
    landed = received(sent, None)
    assert [(n, b.name, b.persistent, b.recording) for n, b in landed] == [
        ("drive0", "a", True, True), ("drive0", "b", False, False)]
    sent[0].bitmap.seen.add(0x100000, 1)
    assert list(nodes["drive0"]["a"].seen) == [(0, 0x1000)], "to_send must copy"


def test_a_mapping_renames_filters_and_transforms() -> None:
    src_map = [{"node-name": "drive0", "alias": "disk",
                "bitmaps": [{"name": "a", "alias": "A",
                             "transform": {"persistent": False}}]}]
    dst_map = [{"node-name": "target0", "alias": "disk",
                "bitmaps": [{"name": "renamed", "alias": "A"}]}]
    nodes = {"drive0": {"a": bitmap("a", True), "unlisted": bitmap("u", True)},
             "other": {"o": bitmap("o")}}
    sent = to_send(nodes, src_map)
    assert [(s.node, s.name, s.persistent) for s in sent] == [("disk", "A", False)]
    assert [(n, b.name, b.persistent) for n, b in received(sent, dst_map)] == [
        ("target0", "renamed", False)]
    back = [{"node-name": "target0", "alias": "disk",
             "bitmaps": [{"name": "renamed", "alias": "A", "transform": {"persistent": True}}]}]
    assert [b.persistent for _, b in received(sent, back)] == [True]


def test_an_alias_the_destination_does_not_know_comes_back_unplaced() -> None:
    sent = [Sent("disk", "A", bitmap("a"), False)]
    dst_map = [{"node-name": "target0", "alias": "other", "bitmaps": []}]
    assert [n for n, _ in received(sent, dst_map)] == [""]


def test_uri_of_reads_both_spellings() -> None:
    assert uri_of({"uri": "unix:/s"}) == "unix:/s"
    assert uri_of({"channels": [{"channel-type": "main", "addr": {
        "transport": "socket", "type": "unix", "path": "/s"}}]}) == "unix:/s"
    assert uri_of({"channels": []}) is None


# -- the oracle following two real QEMU processes ------------------------------------------


def pair(case: Case) -> tuple[VM, VM, str]:
    """A source with bitmap b on drive0 and a destination on the same image."""
    case.img.create("disk.qcow2", 8 * MiB)
    uri = f"unix:{case.sockdir / 'mig.sock'}"
    args = blockdev(qcow2_node(case.path("disk.qcow2"), "drive0"))
    src = case.vm("src", args=args, machine_type="none")
    dst = case.vm("dst", args=[*args, "-incoming", uri], machine_type="none")
    src.launch()
    dst.launch()
    caps = [{"capability": "events", "state": True},
            {"capability": "dirty-bitmaps", "state": True}]
    for vm in (src, dst):
        vm.qmp("migrate-set-capabilities", capabilities=caps)
    src.qmp("block-dirty-bitmap-add", node="drive0", name="b", persistent=True)
    return src, dst, uri


def migrate(src: VM, dst: VM, uri: str) -> None:
    src.qmp("migrate", uri=uri)
    for vm in (src, dst):
        vm.event_wait("MIGRATION", match=lambda e: e["data"]["status"] == "completed")


def test_a_write_the_source_hid_is_caught_on_the_destination(case: Case) -> None:
    src, dst, uri = pair(case)
    writes(src, "drive0", [(0, 0x1000)])
    src.execute("block-dirty-bitmap-disable", {"node": "drive0", "name": "b"})
    writes(src, "drive0", [(0x200000, 0x1000)])
    migrate(src, dst, uri)
    assert "b" in case.oracle.model(src).nodes["drive0"].bitmaps, "the source keeps it"
    with pytest.raises(OracleFailure, match=r"\(live\).*missing \[0x200000\+0x10000\]"):
        case.check_live(dst, "drive0")
    src.shutdown()
    dst.kill()


def test_a_bitmap_that_arrives_disabled_is_caught_before_any_write(case: Case) -> None:
    """The enabled state is checked too, not only the contents: a bitmap that stopped
    recording is wrong before the write it will miss."""
    src, dst, uri = pair(case)
    writes(src, "drive0", [(0, 0x1000)])
    migrate(src, dst, uri)
    dst.execute("block-dirty-bitmap-disable", {"node": "drive0", "name": "b"})
    with pytest.raises(OracleFailure, match=r"^bitmap 'b' on 'drive0' \(live\): it is not "
                       r"recording, the model says enabled$"):
        case.check_live(dst, "drive0")
    src.shutdown()
    dst.kill()


def test_a_write_to_the_inactive_source_is_refused(case: Case) -> None:
    src, dst, uri = pair(case)
    migrate(src, dst, uri)
    with pytest.raises(UnmodelledCommand, match=r"^a qemu-io write to 'drive0' of vm 'src'"):
        writes(src, "drive0", [(0, 0x1000)])
    src.shutdown()
    dst.shutdown()


def test_what_the_oracle_cannot_follow_is_refused(case: Case) -> None:
    src, dst, uri = pair(case)
    with pytest.raises(UnmodelledCommand, match="no VM of this case waits for it"):
        src.qmp("migrate", uri=f"{uri}.elsewhere")
    if any(c["capability"] == "block" for c in src.qmp("query-migrate-capabilities")):
        with pytest.raises(UnmodelledCommand, match="capability 'block'"):
            src.qmp("migrate-set-capabilities",
                    capabilities=[{"capability": "block", "state": True}])
    assert src.qmp("query-migrate") == {}, "QEMU got the command anyway"
    src.shutdown()
    dst.kill()


# -- a mirror into another VM's NBD export ---------------------------------------------


def exporter(case: Case) -> tuple[VM, VM, str]:
    """``dst`` exports its drive0 (bitmap b, recording) writable; ``src`` has a device on
    its drive0 with data, and an NBD client node ``target0`` on dst's export."""
    case.img.create("src.qcow2", 8 * MiB)
    case.img.create("dst.qcow2", 8 * MiB)
    src = case.vm("src", args=[*blockdev(qcow2_node(case.path("src.qcow2"), "drive0")),
                               "-device", "virtio-blk-pci,drive=drive0,id=disk0"])
    dst = case.vm("dst", args=blockdev(qcow2_node(case.path("dst.qcow2"), "drive0")),
                  machine_type="none")
    src.launch()
    dst.launch()
    sock = str(case.sockdir / "nbd.sock")
    dst.qmp("block-dirty-bitmap-add", node="drive0", name="b")
    dst.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    dst.qmp("block-export-add", type="nbd", id="e0", node_name="drive0", writable=True)
    writes(src, "disk0/virtio-backend", [(0x100000, 0x1000)], device=True)
    src.qmp("blockdev-add", driver="nbd", node_name="target0",
            server={"type": "unix", "path": sock}, export="drive0")
    return src, dst, sock


def mirror(src: VM, complete: bool) -> None:
    src.qmp("blockdev-mirror", job_id="m0", device="drive0", target="target0", sync="full")
    src.event_wait("BLOCK_JOB_READY")
    if complete:
        src.qmp("job-complete", id="m0")
    else:
        src.qmp("block-job-cancel", device="m0")
    src.event_wait("BLOCK_JOB_COMPLETED")


def test_a_mirror_writes_into_the_exporting_vm(case: Case) -> None:
    """What the mirror copies lands in dst's node: dst's bitmap must have it; hidden
    from the oracle (b disabled on the raw channel first), it is missed and caught."""
    src, dst, _ = exporter(case)
    mirror(src, complete=False)
    verdicts = case.check_live(dst, "drive0")
    assert list(verdicts[0].required) == [(0x100000, 0x10000)]
    assert list(case.oracle.model(src).nodes["target0"].bitmaps) == []
    dst.qmp("block-dirty-bitmap-clear", node="drive0", name="b")
    dst.execute("block-dirty-bitmap-disable", {"node": "drive0", "name": "b"})
    src.qmp("blockdev-mirror", job_id="m1", device="drive0", target="target0", sync="full")
    src.event_wait("BLOCK_JOB_READY")
    src.qmp("block-job-cancel", device="m1")
    src.event_wait("BLOCK_JOB_COMPLETED")
    with pytest.raises(OracleFailure, match=r"missing \[0x100000\+0x10000\]"):
        case.check_live(dst, "drive0")
    src.shutdown()
    dst.kill()


@pytest.mark.parametrize("complete", [True, False], ids=["job-complete", "block-job-cancel"])
def test_only_job_complete_switches_the_device_to_the_target(case: Case,
                                                             complete: bool) -> None:
    """A ready mirror ends "completed" both ways; only job-complete makes the device
    write into the target (here: dst's node, through NBD)."""
    src, dst, _ = exporter(case)
    mirror(src, complete)
    dst.qmp("block-dirty-bitmap-clear", node="drive0", name="b")
    writes(src, "disk0/virtio-backend", [(0x300000, 0x1000)], device=True)
    verdicts = case.check_live(dst, "drive0")
    assert list(verdicts[0].required) == ([(0x300000, 0x10000)] if complete else [])
    src.shutdown()
    dst.shutdown()


def test_a_tool_may_not_write_through_a_writable_export(case: Case) -> None:
    src, dst, sock = exporter(case)
    uri = f"nbd+unix:///drive0?socket={sock}"
    with pytest.raises(UnmodelledCommand, match="writable NBD export of vm 'dst'"):
        case.io.io(uri, "write 0 4096", fmt=None)
    case.io.run("-r", "-c", "read 0 4096", uri)
    src.shutdown()
    dst.shutdown()
